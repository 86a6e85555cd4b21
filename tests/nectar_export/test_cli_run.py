"""`nectar-export run` and `chat` on the tiny bundles, in subprocesses (`python -m nectar_runtime` and the
no-torch guarantee: tests/runtime/test_main.py)."""

from __future__ import annotations

from tests.helpers import TIMING, run_cli


def test_run_prints_the_answer_then_the_timing_line(nectar_bundle):
    done = run_cli("run", str(nectar_bundle), "--prompt", "What is a decorator?", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert TIMING.match(done.stdout.strip().splitlines()[-1])
    assert "over 7 steps, 8 tokens" in done.stdout or "finish: stop" in done.stdout


def test_run_stream_and_sampling_flags(full_bundle):
    args = ["run", str(full_bundle), "--prompt", "What is a decorator?", "--max-new-tokens", "6", "--stream",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "3"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    answer = lambda out: out.stdout.rsplit("\n[ort-cpu]", 1)[0]         # noqa: E731
    assert answer(first) == answer(second)


def test_run_errors_are_one_line_with_exit_2(nectar_bundle, tmp_path):
    cases = [(["--prompt", ""], "empty"), (["--prompt", "word " * 600], "window"),
             (["--prompt", "hi", "--backend", "ort-cuda"], "onnxruntime-gpu"),
             (["--prompt", "hi", "--backend", "tensorrt"], "nectar-export build"),
             (["--prompt", "hi", "--top-p", "0"], "top_p")]
    for args, word in cases:
        done = run_cli("run", str(nectar_bundle), *args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], (args, done.stderr)
    done = run_cli("run", str(tmp_path), "--prompt", "hi")
    assert done.returncode == 2 and "is not a bundle" in done.stderr


def test_chat_answers_each_line_until_an_empty_one(nectar_bundle):
    done = run_cli("chat", str(nectar_bundle), "--max-new-tokens", "4",
                   input="What is a list?\n" + "word " * 600 + "\nAnd a tuple?\n\nnever asked\n")
    assert done.returncode == 0, done.stderr
    timings = [line for line in done.stdout.splitlines() if TIMING.match(line)]
    assert len(timings) == 2                                 # the over-long question gets an error, not an exit
    assert done.stderr.count("error: ") == 1 and "window" in done.stderr
