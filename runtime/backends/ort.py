"""ONNX Runtime on the CPU: the step graph with the KV of the running sequence held as host arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from nectar_runtime.backends.base import Backend, kv_capacity
from nectar_runtime.bundle import CONTEXT_FILE, Bundle
from nectar_runtime.errors import BackendError


def kv_numpy_dtype(name: str) -> Any:
    """numpy dtype of the bundle's KV I/O ('bfloat16' needs ml_dtypes)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise BackendError("this bundle's KV is bfloat16, which needs the ml_dtypes package") from None
        return ml_dtypes.bfloat16
    return np.dtype(name)


def _read_tensors(bundle: Bundle) -> tuple[dict[str, np.ndarray], Any, str]:
    """The safetensors file that holds the cached tokens' KV (the bundle's context file, or its pack's file, which
    also holds the heads): (tensors, path, what to do when it is damaged)."""
    from safetensors.numpy import load_file

    if bundle.pack is not None:
        path, fix = bundle.pack.file, "re-make the pack"
    else:
        path, fix = bundle.path / CONTEXT_FILE, "re-export the bundle"
    try:
        return load_file(str(path)), path, fix
    except Exception as exc:          # safetensors raises its own SafetensorError (and OSError) on a damaged file
        raise BackendError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}; {fix}") from None


def load_context_kv(bundle: Bundle, dtype: Any) -> list[np.ndarray]:
    """The bundle's cached tokens' keys and values [1, Hkv, cached_tokens, D] per layer, in past-input order."""
    tensors, path, fix = _read_tensors(bundle)
    m = bundle.manifest
    want = (1, m.kv_heads, bundle.cached_tokens, m.head_dim)
    for name in bundle.past_names():
        if name not in tensors:
            raise BackendError(f"{path} lacks {name!r}; {fix}")
        if tensors[name].shape != want:
            raise BackendError(f"{path} holds {name} of shape {list(tensors[name].shape)}, its manifest says "
                               f"{list(want)} ({bundle.cached_tokens} cached tokens); {fix}")
    return [np.ascontiguousarray(tensors[name].astype(dtype, copy=False)) for name in bundle.past_names()]


def load_heads(bundle: Bundle) -> dict[str, np.ndarray]:
    """A base bundle's head inputs from its pack (name -> array in the graph's type); {} for other bundles."""
    if bundle.pack is None:
        return {}
    from nectar_runtime.pack import pack_heads, pack_tensors_problem

    tensors, path, fix = _read_tensors(bundle)
    if (problem := pack_tensors_problem(bundle, tensors)) is not None:
        raise BackendError(f"{path} does not fit the base {bundle.path}: {problem}; {fix}")
    # the carried form the base's inputs take, in the graph's float type
    return pack_heads(bundle, tensors, kv_numpy_dtype(bundle.manifest.kv_dtype))


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


class OrtCpuBackend(Backend):
    """One CPU session; the past is a list of host arrays (static layout: whole buffers, of which `past` is the
    filled part)."""

    name = "ort-cpu"

    def __init__(self, bundle: Bundle, threads: int | None = None, optimize: bool = True, profile: str | None = None):
        super().__init__(bundle)
        self.threads, self.optimize, self.profile = threads, optimize, profile
        self.session: Any = None
        self.context: list[np.ndarray] | None = None
        self.past: list[np.ndarray] = []          # [B, Hkv, past_tokens, D] per past input
        self.buffers: list[np.ndarray] = []       # static layout: [B, Hkv, capacity, D] per past input
        self.heads: dict[str, np.ndarray] = {}    # a base bundle's head inputs, from its pack
        self._documents: dict[Any, tuple[Any, dict[str, np.ndarray]]] = {}    # pack key -> (context, heads)

    def _activate_impl(self) -> None:
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
        self.check_session_io(self.session)
        self.kv_dtype = kv_numpy_dtype(self.manifest.kv_dtype)
        self._load_document()

    def _load_document(self) -> None:
        """What the bundle's document puts in every sequence: the cached tokens' KV and, for a base, the heads.
        Each pack's stay in memory once read, so switching back to a pack is a change of references."""
        key = self.bundle.pack.key if self.bundle.pack is not None else None
        if key not in self._documents:
            context = load_context_kv(self.bundle, self.kv_dtype) if self.bundle.cached_tokens else None
            self._documents[key] = (context, load_heads(self.bundle))
        self.context, self.heads = self._documents[key]

    def _switch_impl(self) -> None:
        self._load_document()

    def resident_bytes(self) -> int:
        """Host bytes of the documents held: every loaded pack's heads and cached tokens' KV."""
        arrays = [a for context, heads in self._documents.values() for a in [*(context or []), *heads.values()]]
        return sum(a.nbytes for a in arrays)

    def end_profiling(self) -> str:
        """Close ORT's trace (profile=PREFIX was given) and return its file's path."""
        return self.session.end_profiling()

    def _release_impl(self) -> None:
        self.session, self.past, self.buffers, self.context, self.heads = None, [], [], None, {}
        self._documents = {}

    def _reset_impl(self, batch: int) -> None:
        m = self.manifest
        if self.context is not None:
            self.past = [np.repeat(kv, batch, axis=0) if batch > 1 else kv for kv in self.context]
        else:
            self.past = [np.zeros((batch, m.kv_heads, 0, m.head_dim), self.kv_dtype) for _ in range(2 * m.layers)]
        if self.bundle.static:           # fixed buffers; the cached tokens' KV fills the first slots
            shape = (batch, m.kv_heads, kv_capacity(self.bundle), m.head_dim)
            self.buffers = [np.zeros(shape, self.kv_dtype) for _ in range(2 * m.layers)]
            for buffer, kv in zip(self.buffers, self.past):
                buffer[:, :, :self.bundle.cached_tokens] = kv

    def _feeds(self, ids: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "position_ids": positions}
        if self.bundle.static:
            feeds["cache_position"] = self.cache_position(ids.shape[1])
            feeds.update(zip(self.bundle.past_names(), self.buffers))
        else:
            feeds["attention_mask"] = self.attention_mask(ids.shape[1])
            feeds.update(zip(self.bundle.past_names(), self.past))
        feeds.update(self.heads)
        return feeds

    def _step_impl(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        outputs = self.session.run(None, self._feeds(ids, positions))
        if self.bundle.static:           # `past` stays the filled part, as the dynamic layout has it
            self.buffers = outputs[1:]
            used = self.past_tokens + ids.shape[1]
            outputs = [outputs[0], *(b[:, :, :used] for b in self.buffers)]
        self.past = outputs[1:]
        return outputs[0]

    def _present_kv_impl(self) -> list[np.ndarray]:
        return [np.array(kv) for kv in self.past]

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, {**self.heads, **feeds})))
