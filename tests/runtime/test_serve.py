"""nectar_runtime.serve as a real server in a subprocess on 127.0.0.1, queried with the openai client and raw httpx2:
the same tokens as the Generator and `nectar-export run`, streaming, concurrent clients, two packs on one base
answering as their single-file bundles, every bad request's 4xx in OpenAI's error shape, the full queue's 429,
disconnects, timeouts, /metrics, start errors and no torch."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nectar_runtime.generator import Generator, Result
from nectar_runtime.sampling import Sampling
from tests.helpers import Raw, dump, run_cli, serving, stop_process

QUESTIONS = ["What does the with statement do?", "How do I open a file?", "What is a decorator?", "Hi"]
LONG = QUESTIONS[0]             # its greedy answer fills the window (498 tokens, about 1 s on 2 cores)
ANSWER = 24


@pytest.fixture(scope="module")
def greedy(bundles) -> dict[tuple[str, str], Result]:
    """The Generator's greedy answers of ANSWER tokens, per (model id, question)."""
    answers = {}
    for kind in ("nectar", "full"):
        with Generator(bundles[kind]) as generator:
            for question in QUESTIONS:
                answers[kind, question] = generator.generate(question, Sampling(max_new_tokens=ANSWER))
    return answers


@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory):
    """Both bundles as two model ids (two documents), defaults otherwise; -X importtime logs every import."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serving("--bundle", f"nectar={bundles['nectar']}", "--bundle", f"full={bundles['full']}", "--port", "0",
                 log=log, python=("-X", "importtime")) as served:
        yield served


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client: openai.OpenAI, model: str, question: str, **options: Any) -> Any:
    messages = [{"role": "system", "content": "ignored"}, {"role": "user", "content": question}]
    return client.chat.completions.create(model=model, messages=messages, **options)


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by Prometheus' own parser: {(name, sorted labels): value}."""
    text = httpx2.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(values: dict, name: str, **labels: str) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.01)


def finish_of(result: Result) -> str:
    return "stop" if result.finish == "stop" else "length"


# --- answers ---

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["nectar", "full"]
    card = client.models.retrieve("full")
    assert card.id == "full" and card.model_extra["kind"] == "full" and card.model_extra["window"] == 512
    health = httpx2.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_greedy_answers_equal_the_generators(client, greedy):
    for (model, question), expected in greedy.items():
        reply = ask(client, model, question, max_tokens=ANSWER, temperature=0)
        assert reply.choices[0].message.content == expected.text
        assert reply.choices[0].finish_reason == finish_of(expected)
        usage = reply.usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(expected.prompt_ids), len(expected.token_ids))
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.model_extra["prefill_ms"] > 0 and usage.model_extra["ms_per_token"] > 0
        assert usage.model_extra["queue_ms"] >= 0
    assert all(greedy["nectar", q].text != greedy["full", q].text for q in QUESTIONS)    # two documents


def test_the_answer_equals_nectar_export_runs(client, nectar_bundle):
    done = run_cli("run", str(nectar_bundle), "--prompt", QUESTIONS[1], "--max-new-tokens", str(ANSWER))
    assert done.returncode == 0, done.stderr
    text = done.stdout[:done.stdout.rstrip("\n").rfind("\n")]          # the answer, then the timing line
    assert ask(client, "nectar", QUESTIONS[1], max_tokens=ANSWER, temperature=0).choices[0].message.content == text


def test_sampling_follows_the_request(client, nectar_bundle):
    with Generator(nectar_bundle) as generator:
        expected = generator.generate(QUESTIONS[2], Sampling(16, temperature=0.9, top_k=40, top_p=0.95, seed=11))
    reply = ask(client, "nectar", QUESTIONS[2], max_completion_tokens=16, temperature=0.9, top_p=0.95, seed=11,
                extra_body={"top_k": 40})
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)


def test_a_stream_joins_to_the_whole_answer(client, greedy):
    for model in ("nectar", "full"):
        expected = greedy[model, QUESTIONS[1]]
        chunks = list(ask(client, model, QUESTIONS[1], max_tokens=ANSWER, temperature=0, stream=True,
                          stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
        assert chunks[-2].choices[0].finish_reason == finish_of(expected)
        assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(expected.token_ids)
        assert chunks[-1].usage.model_extra["prefill_ms"] > 0


def test_eight_concurrent_clients_get_their_own_answers(server, greedy):
    jobs = [(model, question, i % 2 == 0) for i, (model, question) in enumerate(greedy)]       # 8: both models
    assert len(jobs) == 8

    def one(job: tuple[str, str, bool]) -> str:
        model, question, stream = job
        own = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = ask(own, model, question, max_tokens=ANSWER, temperature=0, stream=stream)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, jobs))
    assert answers == [greedy[model, question].text for model, question, _ in jobs]


def test_max_tokens_is_capped_by_the_window(client, nectar_bundle):
    with Generator(nectar_bundle) as generator:
        whole = generator.generate(QUESTIONS[3], Sampling(max_new_tokens=10_000))
    assert whole.finish == "window"
    reply = ask(client, "nectar", QUESTIONS[3], max_tokens=10**9, temperature=0)
    assert reply.usage.completion_tokens == len(whole.token_ids) == 512 - len(whole.prompt_ids) + 1
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content == whole.text


def test_stop_strings_cut_the_answer(client, greedy):
    expected = greedy["nectar", QUESTIONS[2]].text
    stop = expected[10:14]
    cut = expected[:expected.find(stop)]
    reply = ask(client, "nectar", QUESTIONS[2], max_tokens=ANSWER, temperature=0, stop=[stop, "\x00never"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (cut, "stop")
    chunks = ask(client, "nectar", QUESTIONS[2], max_tokens=ANSWER, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut


# --- bad requests ---

W = QUESTIONS[0]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "nectar", "messages": [{"role": "user", "content": W}], **fields}


def asked(content: Any) -> dict[str, Any]:
    return chat(messages=[{"role": "user", "content": content}])


BAD = {   # what is sent: (status, param, code)
    "unknown model": (chat(model="nope"), 404, "model", "model_not_found"),
    "model not a string": (chat(model=5), 400, "model", "invalid_value"),
    "no messages": ({"model": "nectar"}, 400, "messages", "invalid_value"),
    "empty messages": (chat(messages=[]), 400, "messages", "invalid_value"),
    "messages not a list": (chat(messages="hi"), 400, "messages", "invalid_value"),
    "no user message": (chat(messages=[{"role": "system", "content": "be brief"}]), 400, "messages", None),
    "last message not the user's": (chat(messages=[{"role": "user", "content": W},
                                                   {"role": "assistant", "content": "ok"}]),
                                    400, "messages[1].role", None),
    "unknown role": (chat(messages=[{"role": "wizard", "content": W}]), 400, "messages[0].role", "invalid_value"),
    "empty question": (asked("  "), 400, "messages[0].content", None),
    "content a number": (asked(5), 400, "messages[0].content", None),
    "an image part": (asked([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]), 400,
                      "messages[0].content[0]", None),
    "a lone surrogate": (asked(Raw('"\\ud800?"')), 400, "messages[0].content", None),
    "prompt past the window": (asked("word " * 1000), 400, "messages", "context_length_exceeded"),
    "temperature below 0": (chat(temperature=-0.1), 400, "temperature", "invalid_value"),
    "temperature above 2": (chat(temperature=2.5), 400, "temperature", "invalid_value"),
    "temperature a string": (chat(temperature="hot"), 400, "temperature", "invalid_value"),
    "temperature a bool": (chat(temperature=True), 400, "temperature", "invalid_value"),
    "temperature NaN": (chat(temperature=Raw("NaN")), 400, None, "invalid_json"),
    "top_p 0": (chat(top_p=0), 400, "top_p", "invalid_value"),
    "top_p above 1": (chat(top_p=1.5), 400, "top_p", "invalid_value"),
    "top_k negative": (chat(top_k=-1), 400, "top_k", "invalid_value"),
    "max_tokens 0": (chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    "max_tokens negative": (chat(max_tokens=-3), 400, "max_tokens", "invalid_value"),
    "max_tokens a float": (chat(max_tokens=1.5), 400, "max_tokens", "invalid_value"),
    "max_tokens a string": (chat(max_tokens="10"), 400, "max_tokens", "invalid_value"),
    "max_completion_tokens 0": (chat(max_completion_tokens=0), 400, "max_completion_tokens", "invalid_value"),
    "seed negative": (chat(seed=-1), 400, "seed", "invalid_value"),
    "seed past int64": (chat(seed=2**64), 400, "seed", "invalid_value"),
    "a 5000-digit number": (chat(max_tokens=Raw("9" * 5000)), 400, None, "invalid_json"),
    "n 2": (chat(n=2), 400, "n", "unsupported_value"),
    "logprobs": (chat(logprobs=True), 400, "logprobs", "unsupported_value"),
    "stop of 5 strings": (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    "stop a number": (chat(stop=3), 400, "stop", None),
    "stop empty": (chat(stop=""), 400, "stop", None),
    "stream a string": (chat(stream="yes"), 400, "stream", "invalid_value"),
    "stream_options a list": (chat(stream=True, stream_options=[1]), 400, "stream_options", "invalid_value"),
    "malformed JSON": (Raw('{"model": '), 400, None, "invalid_json"),
    "empty body": (Raw(""), 400, None, "invalid_json"),
    "a JSON list": (Raw("[]"), 400, None, "invalid_json"),
    "a JSON string": (Raw('"hello"'), 400, None, "invalid_json"),
    "not UTF-8": (Raw("\udcff"), 400, None, "invalid_json"),
    "nested 100000 deep": (chat(stop=Raw("[" * 100_000 + "]" * 100_000)), 400, None, "invalid_json"),
}


def check_error(response: httpx2.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """The response is `status` with OpenAI's error shape (and the param and code, where given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert "Traceback" not in response.text
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_gets_a_4xx_and_openais_error_shape(server, case):
    body, status, param, code = BAD[case]
    response = httpx2.post(f"{server.url}/v1/chat/completions", content=dump(body), timeout=30,
                           headers={"Content-Type": "application/json"})
    check_error(response, status, param, code)


def test_routes_and_sizes_refused_in_the_same_shape(server):
    url = f"{server.url}/v1/chat/completions"
    check_error(httpx2.get(url, timeout=10), 405)
    check_error(httpx2.get(f"{server.url}/v1/nothing", timeout=10), 404)
    check_error(httpx2.get(f"{server.url}/v1/models/nope", timeout=10), 404, "model", "model_not_found")
    check_error(httpx2.post(url, content=dump(asked("x" * (2 << 20))), timeout=30), 413, None, "request_too_large")
    plain = httpx2.post(url, content=dump(chat(max_tokens=2, temperature=0)), timeout=30,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})   # what curl -d sends
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 2


def test_the_openai_client_reads_the_errors(client):
    with pytest.raises(openai.NotFoundError) as missing:
        ask(client, "nope", W)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        ask(client, "nectar", W, temperature=5)
    assert bad.value.param == "temperature"


# --- metrics, and what the server imports ---

def test_metrics_parse_and_count(server, client):
    before = metrics(server.url)
    reply = ask(client, "full", QUESTIONS[1], max_tokens=7, temperature=0)
    with pytest.raises(openai.BadRequestError):
        ask(client, "full", QUESTIONS[1], top_p=7)
    after = metrics(server.url)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("nectar_requests_total", model="full", status="200") == 1
    assert delta("nectar_requests_total", model="", status="400") == 1        # refused before its model was read
    assert delta("nectar_completion_tokens_total", model="full") == reply.usage.completion_tokens == 7
    assert delta("nectar_prompt_tokens_total", model="full") == reply.usage.prompt_tokens
    assert delta("nectar_generations_total", model="full", finish="length") == 1
    assert delta("nectar_prefill_milliseconds_count", model="full") == 1
    assert delta("nectar_token_milliseconds_count", model="full") == 6                # the last token is not fed
    assert sample(after, "nectar_token_milliseconds_bucket", model="full", le="+Inf") > 0
    for backend in ("nectar", "full"):
        assert sample(after, "nectar_queue_depth", backend=backend) == 0
        assert ("nectar_running", (("backend", backend),)) in after


def test_the_server_imports_neither_torch_nor_transformers(server, client):
    ask(client, "nectar", W, max_tokens=2, stream=True).close()
    imported = {line.split("|")[-1].strip().split(".")[0] for line in server.stderr().splitlines()
                if line.startswith("import time:")}
    assert {"fastapi", "uvicorn", "nectar_runtime", "onnxruntime"} <= imported
    assert not imported & {"torch", "transformers", "nectar_export", "nectar_graphs"}, imported & {"torch", "transformers", "nectar_export", "nectar_graphs"}


# --- a queue of 1: 429, and clients that leave ---

@pytest.fixture(scope="module")
def tight(nectar_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-tight") / "server.log"
    with serving("--bundle", f"nectar={nectar_bundle}", "--queue", "1", "--port", "0", log=log) as served:
        yield served


def long_body(stream: bool, **fields: Any) -> dict[str, Any]:
    return chat(max_tokens=10_000, temperature=0, stream=stream, **fields)


def first_chunks(lines, count: int) -> None:
    """Read `count` data lines of an event stream (the generation is then under way); the caller keeps `lines`."""
    seen = 0
    for line in lines:
        seen += line.startswith("data: ")
        if seen == count:
            return
    pytest.fail("the stream ended early")


def test_a_full_queue_gets_429_with_retry_after(tight, greedy):
    url, answers = f"{tight.url}/v1/chat/completions", {}
    with httpx2.Client(timeout=60) as http, http.stream("POST", url, json=long_body(True)) as running:
        lines = running.iter_lines()          # kept: a line iterator dropped early closes the response
        first_chunks(lines, 2)                                                            # A generates
        waiting = threading.Thread(target=lambda: answers.setdefault(
            "b", httpx2.post(url, json=chat(max_tokens=ANSWER, temperature=0), timeout=60)))
        waiting.start()                                                                   # B waits
        wait_for(lambda: sample(metrics(tight.url), "nectar_queue_depth", backend="nectar") == 1)
        refused = httpx2.post(url, json=chat(max_tokens=4), timeout=10)                    # C: no room
        check_error(refused, 429, None, "queue_full")
        assert refused.headers["Retry-After"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
    waiting.join(60)                                                                      # A left: B runs
    assert answers["b"].json()["choices"][0]["message"]["content"] == greedy["nectar", W].text
    assert sample(metrics(tight.url), "nectar_requests_total", model="nectar", status="429") == 1


def test_a_client_that_leaves_stops_its_generation(tight):
    url = f"{tight.url}/v1/chat/completions"
    for leave in ("stream", "timeout"):
        before = metrics(tight.url)
        if leave == "stream":
            with httpx2.stream("POST", url, json=long_body(True), timeout=60) as response:
                lines = response.iter_lines()
                first_chunks(lines, 3)                                                    # then it closes
        else:
            with pytest.raises(httpx2.TimeoutException):                               # what a client's timeout does
                httpx2.post(url, json=long_body(False), timeout=0.2)

        def cancelled() -> float:
            return sample(metrics(tight.url), "nectar_generations_total", model="nectar", finish="cancelled")

        wait_for(lambda: cancelled() == sample(before, "nectar_generations_total", model="nectar",
                                               finish="cancelled") + 1)
        made = sample(metrics(tight.url), "nectar_completion_tokens_total", model="nectar") - \
            sample(before, "nectar_completion_tokens_total", model="nectar")
        assert 0 < made < 300, made                    # the whole answer is 498 tokens
        assert sample(metrics(tight.url), "nectar_running", backend="nectar") == 0


# --- a 0.4 s timeout ---

@pytest.fixture(scope="module")
def hurried(nectar_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-hurried") / "server.log"
    with serving("--bundle", f"nectar={nectar_bundle}", "--timeout", "0.4", "--port", "0", log=log) as served:
        yield served


def test_a_request_past_the_timeout_gets_504(hurried):
    url = f"{hurried.url}/v1/chat/completions"
    with ThreadPoolExecutor(2) as pool:                     # the second one times out while it waits
        late = list(pool.map(lambda _: httpx2.post(url, json=long_body(False), timeout=30), range(2)))
    for response in late:
        check_error(response, 504, None, "timeout")
    quick = httpx2.post(url, json=chat(max_tokens=3), timeout=30)
    assert quick.status_code == 200
    streamed = openai.OpenAI(base_url=f"{hurried.url}/v1", api_key="unused", max_retries=0)
    pieces = []
    with pytest.raises(openai.APIError, match="timeout"):          # the stream's last event is the error
        for chunk in ask(streamed, "nectar", W, max_tokens=10_000, temperature=0, stream=True):
            pieces.append(chunk)
    assert len(pieces) > 10
    assert sample(metrics(hurried.url), "nectar_generations_total", model="nectar", finish="timeout") == 3


def test_sigterm_stops_the_server_with_status_0(hurried):
    hurried.proc.send_signal(signal.SIGTERM)
    assert hurried.proc.wait(30) == 0


# --- two packs on one base ---

@pytest.fixture(scope="module")
def packed(packs, tmp_path_factory):
    """Two documents' packs on one base: one worker, a pack switch whenever the other one is asked."""
    log = tmp_path_factory.mktemp("serve-packs") / "server.log"
    with serving("--base", str(packs["base"]), "--pack", f"manual={packs['manual']}", "--pack",
                 f"whole={packs['whole']}", "--port", "0", log=log) as served:
        yield served


def test_two_packs_answer_as_their_single_file_bundles(packed, packs, nectar_bundle):
    single = {"manual": nectar_bundle, "whole": packs["whole_bundle"]}     # the same artifacts, exported whole
    expected = {}
    for model, bundle in single.items():
        with Generator(bundle) as generator:
            for question in QUESTIONS:
                expected[model, question] = generator.generate(question, Sampling(max_new_tokens=ANSWER)).text
    assert all(expected["manual", q] != expected["whole", q] for q in QUESTIONS)
    client = openai.OpenAI(base_url=f"{packed.url}/v1", api_key="unused", max_retries=0, timeout=60)
    cards = {m.id: m.model_extra for m in client.models.list()}
    assert list(cards) == ["manual", "whole"] and {c["kind"] for c in cards.values()} == {"pack"}
    assert len({c["backend"] for c in cards.values()}) == 1                         # one worker for both
    switched = ask(client, "whole", QUESTIONS[0], max_tokens=ANSWER, temperature=0)   # "manual" was bound first
    assert switched.choices[0].message.content == expected["whole", QUESTIONS[0]]
    assert 0 < switched.usage.model_extra["pack_switch_ms"] < 100

    def one(job: tuple[str, str, bool]) -> str:
        model, question, stream = job
        reply = ask(client, model, question, max_tokens=ANSWER, temperature=0, stream=stream)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
        return reply.choices[0].message.content

    jobs = [(model, question, i % 3 == 0) for i, (model, question) in enumerate(expected)]
    with ThreadPoolExecutor(8) as pool:                       # interleaved: the worker switches back and forth
        assert list(pool.map(one, jobs)) == [expected[model, question] for model, question, _ in jobs]
    values = metrics(packed.url)
    assert sample(values, "nectar_pack_switch_milliseconds_count", backend="base:base") >= 2


# --- start errors ---

def start(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nectar_runtime.serve", *flags], capture_output=True, text=True,
                          timeout=60)


def test_start_errors_are_one_line_and_exit_2(nectar_bundle, packs, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {f"cannot listen on 127.0.0.1:{port}": ("--bundle", f"a={nectar_bundle}", "--port", str(port)),
                 "cannot load a": ("--bundle", f"a={tmp_path}", "--port", "0"),
                 "model ids must be unique": ("--bundle", f"a={nectar_bundle}", "--bundle", f"a={nectar_bundle}"),
                 "--pack needs --base": ("--pack", f"a={tmp_path}"),
                 "cannot load pack b": ("--base", str(packs["base"]), "--pack", f"a={packs['manual']}", "--pack",
                                        f"b={nectar_bundle}", "--port", "0"),
                 "nothing to serve": (),
                 "--queue must be": ("--bundle", f"a={nectar_bundle}", "--queue", "-1"),
                 "--timeout must be": ("--bundle", f"a={nectar_bundle}", "--timeout", "nan")}
        for expected, flags in cases.items():
            done = start(*flags)
            assert done.returncode == 2 and done.stderr.startswith(f"error: {expected}"), (flags, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1 and not done.stdout


def test_nectar_export_serve_takes_the_same_flags():
    done = subprocess.run([sys.executable, "-m", "nectar_export.cli", "serve", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: nectar-export serve")
    for flag in ("--bundle", "--base", "--pack", "--host", "--port", "--backend", "--queue", "--timeout",
                 "--replicas", "--no-hash-check"):
        assert flag in done.stdout
