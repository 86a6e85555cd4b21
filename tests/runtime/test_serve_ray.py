"""`serve --replicas 2`: the same app as two Ray Serve replicas on a local Ray that the command starts; both
replicas answer with the Generator's tokens, and a SIGTERM stops Ray with every process it started."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import openai
import pytest

from nectar_runtime.generator import Generator
from nectar_runtime.sampling import Sampling
from tests.helpers import serving, stop_process

pytest.importorskip("ray.serve", reason="Ray Serve is the serve extra (make install installs it)")

QUESTIONS = ["What does the with statement do?", "How do I open a file?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def children() -> dict[int, int]:
    """{pid: parent pid} of every process on the machine, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> set[int]:
    parents, found, frontier = children(), set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def ray_tmp():
    """Ray's session folder, short (its sockets' paths must fit 107 bytes) and removed afterwards."""
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_two_ray_serve_replicas_answer_and_leave_no_process(bundles, tmp_path, ray_tmp):
    expected = {}
    for model in ("nectar", "full"):
        with Generator(bundles[model]) as generator:
            for question in QUESTIONS:
                expected[model, question] = generator.generate(question, Sampling(max_new_tokens=16)).text
    flags = ("--bundle", f"nectar={bundles['nectar']}", "--bundle", f"full={bundles['full']}", "--replicas", "2",
             "--port", str(free_port()))
    with serving(*flags, log=tmp_path / "ray.log", ready_s=180, env={"RAY_TMPDIR": ray_tmp}) as served:
        started = descendants(served.proc.pid)
        replicas = {httpx2.get(f"{served.url}/health", timeout=30).json()["pid"] for _ in range(40)}
        assert len(replicas) == 2, replicas

        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(job: tuple[str, str, bool]) -> str:
            model, question, stream = job
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                   max_tokens=16, temperature=0, stream=stream)
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
            return reply.choices[0].message.content

        jobs = [(model, question, i % 2 == 1) for i, (model, question) in enumerate(expected)] * 2
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, jobs)) == [expected[model, question] for model, question, _ in jobs]
        assert stop_process(served.proc, wait_s=60) == 0
    assert len(started) >= 4                     # gcs, raylet, the replicas and Serve's own actors at least
    deadline = time.monotonic() + 30
    while (left := {pid for pid in started if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray left processes behind: {sorted(left)}"
