"""Backends that run a bundle's step graph, and the one registry of their names.

    ort-cpu    ONNX Runtime on the CPU, the KV as host arrays (backends/ort.py)
    ort-cuda   ONNX Runtime's CUDA execution provider with IOBinding, the KV on the GPU (backends/ort_cuda.py)
    tensorrt   a TensorRT engine built by `nectar-export build`, the KV on the GPU; unverified (backends/tensorrt.py)

This module imports nothing heavy, so command lines can list the names without loading a backend.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nectar_runtime.backends.base import Backend
    from nectar_runtime.bundle import Bundle

BACKENDS = {"ort-cpu": ("nectar_runtime.backends.ort", "OrtCpuBackend"),
            "ort-cuda": ("nectar_runtime.backends.ort_cuda", "OrtCudaBackend"),
            "tensorrt": ("nectar_runtime.backends.tensorrt", "TensorRTBackend")}
BACKEND_NAMES = tuple(BACKENDS)


def make_backend(bundle: "Bundle", name: str = "ort-cpu", **options: Any) -> "Backend":
    """The backend called `name` for this bundle (not yet activated); its options go to its constructor."""
    from nectar_runtime.errors import BackendError

    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)(bundle, **options)
