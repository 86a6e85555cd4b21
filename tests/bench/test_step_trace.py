"""bench/step_trace.py without a GPU: a clear refusal and no files; how it cuts a trace into replays and sums
their kernels; its plot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import step_trace           # bench/ is on sys.path (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: nothing to refuse")
def test_refuses_without_a_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "step_trace.py"), str(tmp_path / "bundle"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()


def _kernel(name: str, ts: float, dur: float) -> dict:
    return {"name": name, "ts": ts, "dur": dur, "cat": "kernel"}


def test_replays_are_cut_at_idle_gaps_and_summed_by_class():
    replay = [("nvjet_sm90_hsh_64x8_64x16_4x1_v_bz_NNT", 6.5), ("void onnxruntime::cuda::cuApplyLayerNorm<__half>", 3.0),
              ("void onnxruntime::cuda::_SplitSmallInnerKernel<short>", 3.2), ("memcpy32_post", 1.0),
              ("void onnxruntime::cuda::softmax_warp_forward<__half>", 4.9), ("nvjet_sm90_hsh_64x8_64x16_4x1_v_bz_NNT", 2.7)]
    events, t = [], 1000.0
    for _ in range(3):                               # three replays, 2 us apart inside, 300 us apart between
        for name, dur in replay:
            events.append(_kernel(name, t, dur))
            t += dur + 2.0
        t += 300.0
    steps = step_trace.split_steps(list(reversed(events)))
    assert [len(s) for s in steps] == [6, 6, 6]
    summary = step_trace.summarize_step(steps[1])
    assert summary["one_step"] == {"kernels": 6, "span_us": 31.3, "busy_us": 21.3, "gaps_us": 10.0}
    assert summary["by_class"] == {"gemm": 9.2, "softmax": 4.9, "split_concat": 3.2, "norm": 3.0, "copy": 1.0}
    assert summary["by_kernel"][0] == ["nvjet_sm90_hsh_64x8_64x16_4x1_v_bz_NNT", 2, 9.2]


def test_kernel_classes():
    assert step_trace.kernel_class("void cutlass::Kernel2<cutlass_75_wmma_tensorop_f16>") == "gemm"
    assert step_trace.kernel_class("void onnxruntime::cuda::_GatherScatterElementsKernel<__half>") == "scatter_gather"
    assert step_trace.kernel_class("void onnxruntime::cuda::_BinaryElementWiseSimple<true>") == "elementwise"
    assert step_trace.kernel_class("some_new_kernel") == "other"
    assert step_trace.kernel_class("void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert step_trace.kernel_class("void onnxruntime::contrib::cuda::RotaryEmbeddingBSNH<__half>") == "rotary"


def test_plot_writes_a_png(tmp_path):
    rows = [{"kind": "nectar", "n": 4096, "step_ms": 3.4, "one_step": {"kernels": 1025},
             "by_class": {"gemm": 1818.0, "norm": 296.0}},
            {"kind": "full", "n": 4096, "step_ms": 2.9, "one_step": {"kernels": 660}, "by_class": {"gemm": 1500.0}}]
    step_trace.plot(rows, "test GPU", tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_steps_are_timed_as_the_backend_times_them(bundles):
    """step_ms and host_ms come from backend.last_step: the wall time and the parts ort-cuda's one-token static
    step times (its fixed binding, run here bound to host memory), one token a step."""
    from nectar_runtime.bundle import load_bundle
    from tests.helpers import HostBoundBackend

    with HostBoundBackend(load_bundle(bundles["nectar_static"])) as backend:
        backend.step(np.arange(100, 108, dtype=np.int64)[None])            # a prompt first, as measure() does
        steps, parts = step_trace.timed_steps(backend, iter(range(200, 210)), 3)
        assert backend.new_tokens == 8 + 3
    assert len(steps) == 3 and all(ms > 0 for ms in steps)
    assert set(parts) == {"update_inputs", "run", "fetch_logits"} and all(len(v) == 3 for v in parts.values())
    for i, ms in enumerate(steps):                     # the parts are inside the step, and the run is most of it
        inside = sum(part[i] for part in parts.values())
        assert 0 < inside <= ms and parts["run"][i] > parts["update_inputs"][i]
