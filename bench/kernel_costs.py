"""What one kernel of a decode step costs inside a CUDA graph: the numbers behind the step graph's design.

A Qwen3-1.7B decode step at batch 1 is a chain of small kernels. Here each kind of kernel the step graph
runs is captured 28 times (once per layer) in a torch CUDA graph, the graph is replayed 200 times, and the
mean time per kernel is reported in microseconds:

- tiny kernels: an Add and a SiLU on one layer's head activations [1, 1, Hkv, G, width], the copy that
  moves one token's new key to the cache layout (ORT launches a Transpose kernel for it), a softmax over the pair and 600 slots;
- the fitted heads' batched products [1, 1, Hkv, G, K] @ [Hkv, K, N], for the three layers of the joint
  MLP pair as the step graph runs them (widths with the carried columns, "carried_l*") and without them
  ("plain_l*"), with the hidden width of the H200 run's heads (177 per KV head);
- the query-key product over S slots;
- the model's own projections (q/k/v, o, gate/up, down) on one token.

Run on a GPU host (torch with CUDA; no ONNX Runtime needed):
    python bench/kernel_costs.py [--out bench/results]
Writes kernel_costs.json and kernel_costs.png into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import harness              # bench/harness.py, beside this script
LAYERS, REPLAYS = 28, 200
HIDDEN, INTERMEDIATE, KV_HEADS, GROUP, HEAD_DIM = 2048, 6144, 8, 2, 128     # Qwen3-1.7B
PAIR_HIDDEN = 177                                # hidden width per KV head of the run's heads (head_params 131072)
CARRIED = 2 * HEAD_DIM + 1                       # q, -q and the constant column (graphs/step.py JointPair)


def time_kernel(fn: Callable[[], Any]) -> float:
    """Microseconds per call of fn, captured LAYERS times in one CUDA graph and replayed REPLAYS times."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                 # warm up (cuBLAS picks its kernels) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            fn()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPLAYS / LAYERS * 1e3


def measure() -> dict[str, float]:
    import torch
    from torch.nn import functional as F

    torch.manual_seed(0)
    cuda, half = "cuda", torch.float16

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, device=cuda, dtype=half) * scale

    out: dict[str, float] = {}
    wide = PAIR_HIDDEN + CARRIED
    act = rand(1, 1, KV_HEADS, GROUP, wide)
    out["add_small"] = time_kernel(lambda: act.add_(1))
    out["silu_small"] = time_kernel(lambda: F.silu(act))
    new_key = rand(1, 1, KV_HEADS, HEAD_DIM)                              # one token's key [B, T, Hkv, D]
    out["copy_new_key"] = time_kernel(lambda: new_key.transpose(1, 2).clone())      # a copy kernel, as ORT runs it
    scores = rand(1, 1, KV_HEADS, GROUP, 1 + 600)
    out["softmax_601"] = time_kernel(lambda: torch.softmax(scores, dim=-1))
    out_width = 1 + HEAD_DIM
    layers = {"carried_l1": (HEAD_DIM, wide), "carried_l2": (wide, wide), "carried_l3": (wide, out_width),
              "plain_l1": (HEAD_DIM, PAIR_HIDDEN + out_width), "plain_l2": (PAIR_HIDDEN, PAIR_HIDDEN),
              "plain_l3": (PAIR_HIDDEN, out_width)}
    for name, (k, n) in layers.items():
        x, w = rand(1, 1, KV_HEADS, GROUP, k), rand(KV_HEADS, k, n, scale=0.05)
        out[name] = time_kernel(lambda x=x, w=w: x @ w)
    q = rand(1, 1, KV_HEADS, GROUP, HEAD_DIM)
    for slots in (600, 4096 + 600):
        keys = rand(1, KV_HEADS, slots, HEAD_DIM)
        out[f"qk_{slots}"] = time_kernel(lambda keys=keys: q @ keys.unsqueeze(1).transpose(-1, -2))
    token = rand(1, 1, HIDDEN)
    qkv = (GROUP + 2) * KV_HEADS * HEAD_DIM                              # 16 q heads + 8 k + 8 v heads of 128
    for name, n in (("qkv", qkv), ("o", HIDDEN), ("gate_up", 2 * INTERMEDIATE)):
        w = rand(HIDDEN, n, scale=0.02)
        out[name] = time_kernel(lambda w=w: token @ w)
    down, mid = rand(INTERMEDIATE, HIDDEN, scale=0.02), rand(1, 1, INTERMEDIATE)
    out["down"] = time_kernel(lambda: mid @ down)
    return {k: round(v, 2) for k, v in out.items()}


def plot(costs: dict[str, float], gpu: str, png: Path) -> None:
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(costs)
    ax.barh(names, [costs[n] for n in names], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("microseconds per kernel in a CUDA graph replay (fp16, batch 1)")
    ax.set_title(f"Decode-step kernels, Qwen3-1.7B shapes, {gpu}")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=harness.RESULTS, help="Folder for kernel_costs.json/.png.")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark times GPU kernels")
    gpu = torch.cuda.get_device_name(0)
    costs = measure()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"gpu": gpu, "layers": LAYERS, "replays": REPLAYS, "unit": "us per kernel", "costs": costs}
    (args.out / "kernel_costs.json").write_text(json.dumps(report, indent=2))
    plot(costs, gpu, args.out / "kernel_costs.png")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
