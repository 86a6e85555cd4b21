"""bench/kernel_costs.py on a machine without a GPU: a clear refusal and no files; its plot from a report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernel_costs           # bench/ is on sys.path (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: nothing to refuse")
def test_refuses_without_a_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_costs.py"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()


def test_plot_writes_a_png(tmp_path):
    kernel_costs.plot({"add_small": 1.2, "qkv": 5.8}, "test GPU", tmp_path / "k.png")
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
