"""`nectar-export run` and `chat` on the tiny bundles, in subprocesses (`python -m nectar_runtime` and the
no-torch guarantee: tests/runtime/test_main.py)."""

from __future__ import annotations

import onnxruntime as ort

from nectar_runtime.generator import Generator
from nectar_runtime.sampling import Sampling
from tests.helpers import TIMING, run_cli


def test_run_prints_the_answer_then_the_timing_line(nectar_bundle):
    done = run_cli("run", str(nectar_bundle), "--prompt", "What is a decorator?", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    answer, timing = done.stdout.rstrip("\n").rsplit("\n", 1)
    with Generator(nectar_bundle) as generator:                # the runtime's own greedy answer
        expected = generator.generate("What is a decorator?", Sampling(max_new_tokens=8))
    assert TIMING.match(timing) and timing.endswith(f"{len(expected.token_ids)} tokens, finish: {expected.finish}")
    assert answer == expected.text and answer.strip()


def test_run_stream_and_sampling_flags(full_bundle):
    args = ["run", str(full_bundle), "--prompt", "What is a decorator?", "--max-new-tokens", "6", "--stream",
            "--temperature", "0.9", "--top-k", "50", "--top-p", "0.9", "--seed", "3"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    answer = lambda out: out.stdout.rsplit("\n[ort-cpu]", 1)[0]         # noqa: E731
    with Generator(full_bundle) as generator:
        sampled = generator.generate("What is a decorator?", Sampling(max_new_tokens=6, temperature=0.9, top_k=50,
                                                                      top_p=0.9, seed=3))
        greedy = generator.generate("What is a decorator?", Sampling(max_new_tokens=6))
    assert answer(first) == answer(second) == sampled.text != greedy.text     # the flags reach the sampler


def test_run_errors_are_one_line_with_exit_2(nectar_bundle, tmp_path):
    cases = [(["--prompt", ""], "empty"), (["--prompt", "word " * 600], "window"),
             (["--prompt", "hi", "--backend", "tensorrt"], "nectar-export build"),
             (["--prompt", "hi", "--top-p", "0"], "top_p"),
             (["--prompt", "hi", "--temperature", "nan"], "temperature must be a finite number"),   # issue 18
             (["--prompt", "hi", "--seed", "-1"], "seed must be >= 0")]
    if "CUDAExecutionProvider" not in ort.get_available_providers():          # elsewhere ort-cuda runs
        cases.append((["--prompt", "hi", "--backend", "ort-cuda"], "onnxruntime-gpu"))
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


def test_invalid_utf8_is_one_error_line_and_does_not_end_a_chat(nectar_bundle):
    """Issue 18: undecodable bytes in a question gave a traceback and ended the chat session."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "nectar_export.cli", "chat", str(nectar_bundle), "--max-new-tokens",
                           "4"], input=b"caf\xe9 \xff?\nWhat is a list?\n\n", capture_output=True, timeout=600)
    stderr = done.stderr.decode()
    assert done.returncode == 0 and "Traceback" not in stderr, stderr[-1500:]
    assert stderr.count("error: ") == 1 and "not valid UTF-8" in stderr
    assert len([line for line in done.stdout.decode().splitlines() if TIMING.match(line)]) == 1
    done = subprocess.run([sys.executable.encode(), b"-m", b"nectar_export.cli", b"run", str(nectar_bundle).encode(),
                           b"--prompt", b"caf\xe9?"], capture_output=True, timeout=600)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "not valid UTF-8" in lines[0], done.stderr[-1500:]


def test_every_load_checks_sha256_unless_told_not_to(bundle_copy):
    """Issue 18: a weight zeroed in place (same size) ran with exit 0; run, chat and the edge entry point now hash
    every file at load, and --no-hash-check skips only that."""
    import subprocess
    import sys

    path = bundle_copy / "model.onnx"
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        fh.write(b"\0" * 4096)
    edge = [sys.executable, "-m", "nectar_runtime", str(bundle_copy), "--prompt", "Hi", "--max-new-tokens", "2"]
    for done in (run_cli("run", str(bundle_copy), "--prompt", "Hi"), run_cli("chat", str(bundle_copy), input="Hi\n"),
                 subprocess.run(edge, capture_output=True, text=True, timeout=600)):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and "model.onnx does not match its sha256" in lines[0], \
            done.stderr[-1500:]
    for done in (run_cli("run", str(bundle_copy), "--prompt", "Hi", "--max-new-tokens", "2", "--no-hash-check"),
                 subprocess.run(edge + ["--no-hash-check"], capture_output=True, text=True, timeout=600)):
        assert done.returncode == 0 and TIMING.match(done.stdout.strip().splitlines()[-1]), done.stderr[-1500:]
