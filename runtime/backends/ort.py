"""ONNX Runtime on the CPU: the step graph with the KV of the running sequence held as host arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from nectar_runtime.backends.base import Backend, BackendError, first_slot, kv_capacity, static_inputs, step_inputs
from nectar_runtime.bundle import CONTEXT_FILE, Bundle


def kv_numpy_dtype(name: str) -> Any:
    """numpy dtype of the bundle's KV I/O ('bfloat16' needs ml_dtypes)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise BackendError("this bundle's KV is bfloat16, which needs the ml_dtypes package") from None
        return ml_dtypes.bfloat16
    return np.dtype(name)


def load_context_kv(bundle: Bundle, dtype: Any) -> list[np.ndarray]:
    """The bundle's context keys and values [1, Hkv, context_tokens, D] per layer, in past-input order."""
    from safetensors.numpy import load_file

    tensors = load_file(str(bundle.path / CONTEXT_FILE))
    try:
        return [np.ascontiguousarray(tensors[name].astype(dtype, copy=False)) for name in bundle.past_names()]
    except KeyError as exc:
        raise BackendError(f"{bundle.path / CONTEXT_FILE} lacks {exc}; re-export the bundle") from None


class OrtCpuBackend(Backend):
    name = "ort-cpu"

    def __init__(self, bundle: Bundle, threads: int | None = None, optimize: bool = True, profile: str | None = None):
        super().__init__(bundle)
        self.threads, self.optimize, self.profile = threads, optimize, profile
        self.session: Any = None
        self.past: list[np.ndarray] = []
        self.length = 0        # tokens in the past: the bundle's context tokens plus new tokens so far
        self.new_tokens = 0

    def activate(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("ort-cpu needs onnxruntime: pip install onnxruntime") from None
        options = session_options(ort, self.optimize, self.profile)
        if self.threads:
            options.intra_op_num_threads = self.threads
        try:
            self.session = ort.InferenceSession(str(self.bundle.onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:   # onnxruntime raises its own Fail/InvalidProtobuf types
            raise BackendError(f"ONNX Runtime cannot load {self.bundle.onnx_path}: "
                               f"{str(exc).splitlines()[0][:300]}") from None
        self.kv_dtype = kv_numpy_dtype(self.bundle["kv_dtype"])
        self.context = load_context_kv(self.bundle, self.kv_dtype) if self.bundle.context_tokens else None
        self.active = True

    def end_profiling(self) -> str:
        """Close ORT's trace (profile=PREFIX was given) and return its file's path."""
        return self.session.end_profiling()

    def release(self) -> None:
        self.session, self.past, self.context, self.active = None, [], None, False

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds)))

    def reset(self, batch: int = 1) -> None:
        b = self.bundle
        if b.static:                     # fixed buffers; the context KV fills the first slots
            shape = (batch, b["kv_heads"], kv_capacity(b), b["head_dim"])
            self.buffers = [np.zeros(shape, self.kv_dtype) for _ in range(2 * b["layers"])]
            for buffer, kv in zip(self.buffers, self.context or []):
                buffer[:, :, :b.context_tokens] = kv
        if self.context is not None:
            self.past = [np.repeat(kv, batch, axis=0) if batch > 1 else kv for kv in self.context]
        else:
            self.past = [np.zeros((batch, b["kv_heads"], 0, b["head_dim"]), self.kv_dtype)
                         for _ in range(2 * b["layers"])]
        self.length = self.past[0].shape[2]
        self.new_tokens = 0

    def feeds(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs of the next step: positions continue after the past; every past and new token is visible."""
        T = input_ids.shape[1]
        if self.new_tokens + T > self.bundle["max_new_tokens"]:
            raise BackendError(f"{self.new_tokens + T} new tokens exceed this bundle's window of "
                               f"{self.bundle['max_new_tokens']}")
        position = self.bundle["first_position"] + self.new_tokens
        if self.bundle.static:
            ids, positions, slots = static_inputs(input_ids, position, first_slot(self.bundle) + self.new_tokens)
            feeds = {"input_ids": ids, "position_ids": positions, "cache_position": slots}
            feeds.update(zip(self.bundle.past_names(), self.buffers))
            return feeds
        ids, positions, mask = step_inputs(input_ids, position, self.length)
        feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": mask}
        feeds.update(zip(self.bundle.past_names(), self.past))
        return feeds

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        outputs = self.session.run(None, self.feeds(input_ids))
        if self.bundle.static:           # `past` stays the filled part, as the dynamic layout has it
            self.buffers = outputs[1:]
            used = self.length + input_ids.shape[1]
            outputs = [outputs[0], *(b[:, :, :used] for b in self.buffers)]
        self.past = outputs[1:]
        self.length += input_ids.shape[1]
        self.new_tokens += input_ids.shape[1]
        return np.asarray(outputs[0][:, -1], dtype=np.float32)


def session_options(ort: Any, optimize: bool, profile: str | None) -> Any:
    """Quiet session options; ORT's optimizations off when not `optimize`; its trace on with a `profile` prefix."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return options


def make_backend(bundle: Bundle, name: str = "ort-cpu", **options: Any) -> Backend:
    """The backend called `name` for this bundle (not yet activated)."""
    if name == "ort-cpu":
        return OrtCpuBackend(bundle, **options)
    if name == "ort-cuda":
        from nectar_runtime.backends.ort_cuda import OrtCudaBackend
        return OrtCudaBackend(bundle, **options)
    if name == "tensorrt":
        from nectar_runtime.backends.tensorrt import TensorRTBackend
        return TensorRTBackend(bundle)
    raise BackendError(f"unknown backend {name!r}; choose ort-cpu, ort-cuda or tensorrt")
