"""Where a static-cache bundle's decode step spends its time on ort-cuda: the host's share, and every GPU kernel.

ONNX Runtime's own profiler times nodes only without the CUDA graph, where launch overhead hides what the
kernels cost. Here the step runs as the benchmark runs it (CUDA graph replay through `OrtCudaBackend`), and
CUPTI, through torch's profiler, records each kernel the replay executes, whoever launched it. Per bundle:

- `step_ms`: median wall time of `backend.step` for one token, `backend.last_step.ms` (what
  bench/decode_latency.py reports);
- `host_ms`: medians of its parts: writing the three small inputs (`update_inputs`), the graph replay with
  its synchronization (`run`), and copying the logits to the host (`fetch_logits`);
- `one_step`: the kernels of one replay: their count, the span from the first start to the last end, the
  busy time (the sum of durations) and the gaps between kernels;
- `by_class` and `by_kernel`: busy microseconds per replay, grouped by kind of kernel and by kernel name.

Each bundle is measured in a child process: CUPTI stays attached after a trace and slows what the same
process runs next. Run on a GPU host with torch (CUDA) and onnxruntime-gpu:
    python bench/step_trace.py BUNDLE... [--out bench/results] [--name step_trace]
Writes NAME.json and NAME.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import harness              # bench/harness.py, beside this script

HOST_PARTS = ("update_inputs", "run", "fetch_logits")      # what ort-cuda times inside a one-token static step
STEP_GAP_US = 50.0               # host work between two replays leaves at least this much idle time
CLASSES = (                      # (class, substrings of the kernel name), first match wins
    ("attention", ("flash_fwd", "fmha", "xqa", "GroupQueryAttention", "UnpackRoPEAppend")),   # the fused graph's
    ("rotary", ("Rotary",)),
    ("gemm", ("gemm", "nvjet", "splitKreduce", "cutlass")),
    ("norm", ("LayerNorm", "RMSNorm")),
    ("softmax", ("softmax",)),
    ("split_concat", ("Split", "Concat")),
    ("scatter_gather", ("Scatter", "Gather")),
    ("copy", ("memcpy", "Transpose", "FillFromDataPtr")),
    ("elementwise", ("ElementWise", "Range")),
)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for label, keys in CLASSES:
        if any(k.lower() in lowered for k in keys):
            return label
    return "other"


def split_steps(kernels: list[dict[str, Any]], gap_us: float = STEP_GAP_US) -> list[list[dict[str, Any]]]:
    """Chrome-trace kernel events (name, ts, dur in us) sorted by start, cut where the GPU idles > gap_us."""
    groups: list[list[dict[str, Any]]] = []
    for event in sorted(kernels, key=lambda e: e["ts"]):
        if groups and event["ts"] - (groups[-1][-1]["ts"] + groups[-1][-1]["dur"]) <= gap_us:
            groups[-1].append(event)
        else:
            groups.append([event])
    return groups


def summarize_step(step: list[dict[str, Any]]) -> dict[str, Any]:
    """One replay's kernels: count, span, busy time, gaps, and busy time by class and by kernel name."""
    span = step[-1]["ts"] + step[-1]["dur"] - step[0]["ts"]
    busy = sum(e["dur"] for e in step)
    by_class: dict[str, float] = {}
    by_kernel: dict[str, list[float]] = {}
    for e in step:
        label = kernel_class(e["name"])
        by_class[label] = by_class.get(label, 0.0) + e["dur"]
        entry = by_kernel.setdefault(e["name"][:100], [0, 0.0])
        entry[0] += 1
        entry[1] += e["dur"]
    return {"one_step": {"kernels": len(step), "span_us": round(span, 1), "busy_us": round(busy, 1),
                         "gaps_us": round(span - busy, 1)},
            "by_class": {k: round(v, 1) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "by_kernel": sorted(([k, c, round(d, 1)] for k, (c, d) in by_kernel.items()), key=lambda x: -x[2])}


def timed_steps(backend: Any, token: Iterator[int], count: int) -> tuple[list[float], dict[str, list[float]]]:
    """`count` one-token steps, each timed whole and in its parts, as the backend times them (`last_step`)."""
    import numpy as np

    steps: list[float] = []
    parts: dict[str, list[float]] = {name: [] for name in HOST_PARTS}
    for _ in range(count):
        backend.step(np.array([[next(token)]], dtype=np.int64))
        steps.append(backend.last_step.ms)
        for name in parts:
            parts[name].append(backend.last_step.parts[name])
    return steps, parts


def measure(path: Path, warmup: int, tokens: int, traced: int, trace_file: Path) -> dict[str, Any]:
    """One bundle in this process: step and host-part medians, then a CUPTI trace of `traced` steps."""
    import numpy as np
    import torch                          # before onnxruntime: its CUDA libraries, and CUPTI through kineto
    from torch.profiler import ProfilerActivity, profile

    from nectar_runtime.backends import make_backend
    from nectar_runtime.bundle import load_bundle

    if not torch.cuda.is_available():
        raise SystemExit("step_trace: no CUDA device here; run it on a GPU host")
    bundle = load_bundle(path)
    if not bundle.static:
        raise SystemExit(f"step_trace: {path} has the dynamic cache layout; the CUDA graph needs a static one")
    if 64 + warmup + tokens + traced > bundle.manifest.max_new_tokens:
        raise SystemExit(f"step_trace: {path}'s window of {bundle.manifest.max_new_tokens} tokens is too short")
    token = iter(range(200, 200 + warmup + tokens + traced))
    with make_backend(bundle, "ort-cuda") as backend:
        backend.reset(1)
        backend.step(np.arange(100, 164, dtype=np.int64)[None])               # a 64-token question
        for _ in range(warmup):                                                # capture, then warm replays
            backend.step(np.array([[next(token)]], dtype=np.int64))
        steps, parts = timed_steps(backend, token, tokens)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(traced):
                backend.step(np.array([[next(token)]], dtype=np.int64))
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_file))
    events = json.loads(trace_file.read_text())["traceEvents"]
    trace_file.unlink()
    steps_seen = split_steps([e for e in events if e.get("cat") == "kernel"])
    if len(steps_seen) < 3:
        raise SystemExit(f"step_trace: the trace holds {len(steps_seen)} replays; expected {traced}")
    middle = max(steps_seen[1:-1], key=len)                                     # a whole replay, not an edge
    return {"bundle": str(path), "kind": bundle.kind, "n": bundle.manifest.n, "layers": bundle.manifest.layers,
            "step_ms": round(statistics.median(steps), 4),
            "host_ms": {k: round(statistics.median(v), 4) for k, v in parts.items()},
            "replays_traced": len(steps_seen), **summarize_step(middle)}


def plot(rows: list[dict[str, Any]], gpu: str, png: Path) -> None:
    """Stacked bars: one replay's busy microseconds per class of kernel, one bar per bundle."""
    plt = harness.pyplot()
    labels = [f"{r['kind']} n={r['n']}" for r in rows]
    classes = list(dict.fromkeys(c for r in rows for c in r["by_class"]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    bottom = [0.0] * len(rows)
    for label in classes:
        values = [r["by_class"].get(label, 0.0) / 1e3 for r in rows]
        ax.bar(labels, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{r['one_step']['kernels']} kernels\nstep {r['step_ms']:.2f} ms", ha="center",
                va="bottom", fontsize=8)
    ax.set_ylabel("busy ms per replayed step")
    ax.set_ylim(0, max(bottom) * 1.25)
    ax.set_title(f"decode step kernels by class, ort-cuda CUDA graph, {gpu}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="step_trace", description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    p.add_argument("--name", default="step_trace", help="File stem of the JSON and PNG.")
    p.add_argument("--warmup", type=int, default=24)
    p.add_argument("--tokens", type=int, default=64, help="Steps timed whole, then as many timed in parts.")
    p.add_argument("--traced", type=int, default=6, help="Steps under the kernel trace.")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        row = measure(args.bundles[0], args.warmup, args.tokens, args.traced,
                      Path(os.environ.get("TMPDIR", "/tmp")) / f"step_trace-{os.getpid()}.json")
        print(json.dumps(row))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("step_trace: no CUDA device here; run it on a GPU host", file=sys.stderr)
        return 2
    rows = []
    for path in args.bundles:
        cmd = harness.python_cmd(__file__, path, "--child", "--warmup", args.warmup, "--tokens", args.tokens,
                                 "--traced", args.traced)
        try:
            rows.append(harness.run_json_child(cmd))
        except harness.ChildError as exc:
            print(f"step_trace: {path}: {exc.last}", file=sys.stderr)
            return 1
        print(json.dumps({k: rows[-1][k] for k in ("bundle", "step_ms", "host_ms", "one_step", "by_class")}),
              flush=True)
    gpu = torch.cuda.get_device_name(0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=1))
    plot(rows, gpu, args.out / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
