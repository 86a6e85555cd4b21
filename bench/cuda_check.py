"""ort-cuda against ort-cpu on the same bundles: same greedy tokens, logit gaps, median ms/token of each.

Run on a GPU host with onnxruntime-gpu (it serves both providers):
    python bench/cuda_check.py BUNDLE... [--tokens 32] [--out results.json]
The CPU run picks each next token; the CUDA run is fed the same tokens, so the logits compare step by step.
No torch: only nectar_runtime, numpy and onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from nectar_runtime.backends import make_backend
from nectar_runtime.bundle import load_bundle
from nectar_runtime.generator import load_tokenizer


def run(backend, prompt: list[int], feed: list[int] | None, tokens: int) -> tuple[list[np.ndarray], list[int], list[float]]:
    """Prefill then `tokens` steps; feeds `feed` when given, else its own greedy picks."""
    backend.reset(1)
    logits = [backend.step(np.array([prompt], dtype=np.int64))]
    picks, times = [], []
    for i in range(tokens):
        token = feed[i] if feed is not None else int(logits[-1].argmax())
        picks.append(token)
        start = time.perf_counter()
        logits.append(backend.step(np.array([[token]], dtype=np.int64)))
        times.append((time.perf_counter() - start) * 1e3)
    return logits, picks, times


def check(path: str, question: str, tokens: int) -> dict:
    bundle = load_bundle(path)
    prompt = load_tokenizer(bundle).encode(bundle.prompt_text(question), add_special_tokens=False).ids
    out = {"bundle": path, "kind": bundle.kind, "precision": bundle.manifest.precision, "n": bundle.manifest.n}
    with make_backend(bundle, "ort-cpu") as cpu:
        ref, picks, cpu_ms = run(cpu, prompt, None, tokens)
    with make_backend(bundle, "ort-cuda") as gpu:
        run(gpu, prompt, picks, 4)                                   # warm-up
        got, _, gpu_ms = run(gpu, prompt, picks, tokens)
    gaps = [float(np.abs(a - b).max()) for a, b in zip(got, ref)]
    same = [int(a.argmax()) == int(b.argmax()) for a, b in zip(got, ref)]
    out.update(steps=len(gaps), top1_match=sum(same) / len(same), max_abs_logit_diff=max(gaps),
               cpu_ms_per_token=statistics.median(cpu_ms), cuda_ms_per_token=statistics.median(gpu_ms))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--question", default="What does the with statement do?")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = [check(b, args.question, args.tokens) for b in args.bundles]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
