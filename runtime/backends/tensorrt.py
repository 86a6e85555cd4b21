"""TensorRT backend: runs a bundle's prebuilt engine (`model.plan`) with the KV cache kept on the GPU.

UNVERIFIED: TensorRT is served only from NVIDIA's package index, which the build and test machines do
not reach, so this code follows the TensorRT 10/11 Python API (named I/O tensors, `set_input_shape`,
`set_tensor_address`, `execute_async_v3`) and cuda-python's runtime bindings without having run.
Only its error paths are tested. `tensorrt` and cuda-python are imported inside `activate`, so the
module imports on any machine.

Graph I/O (bundle.json names the past/present tensors):
    input_ids [B, T] int64, position_ids [B, T] int64, attention_mask [B, P + T] int64,
    past key/value [B, Hkv, P, D] per layer  ->  logits [B, 1, V] fp32 (or [B, T, V]), present [B, Hkv, P + T, D].

Each past tensor owns two device buffers sized for the whole window. A step reads the past from buffer
`cur` and has TensorRT write the present into buffer `1 - cur`; then the two swap roles. The present
of one step is, byte for byte, the contiguous past of the next, so the cache never visits the host;
only the logits come back.

Static-cache bundles (`export --cache static`) are refused when the backend is made (STATIC_REFUSED), and so are
they by `nectar-export build`: their step writes each KV buffer in place, bound as both input and output. So are
int4 bundles (INT4_REFUSED): their weights are ONNX Runtime's com.microsoft MatMulNBits, which TensorRT's ONNX parser
does not read (TensorRT takes int4 weights as DequantizeLinear blocks, a different graph).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nectar_runtime.backends.base import Backend, kv_capacity, leading_view
from nectar_runtime.bundle import CONTEXT_FILE, Bundle, inside
from nectar_runtime.errors import BackendError

IDS, POSITIONS, MASK = "input_ids", "position_ids", "attention_mask"
TRT_INSTALL = ("TensorRT is not installed: pip install tensorrt (from NVIDIA's index, https://pypi.nvidia.com; "
               "`pip install --extra-index-url https://pypi.nvidia.com tensorrt`), or run the bundle with an "
               "ONNX Runtime backend")
STATIC_REFUSED = ("{path} has the static cache layout, which the TensorRT builder and backend do not support (its "
                  "step writes the KV buffers in place, and TensorRT does not bind one tensor as both input and "
                  "output); export the bundle with --cache dynamic for TensorRT, or run this one with --backend ort-cuda")
INT4_REFUSED = ("{path} holds int4 weights as ONNX Runtime's MatMulNBits (a com.microsoft operator), which TensorRT's "
                "ONNX parser does not read; export the bundle with --precision fp16 for TensorRT, or run this one "
                "with --backend ort-cuda or ort-cpu")
CUDA_INSTALL = ("cuda-python is not installed: pip install cuda-python (major version matching the CUDA driver, "
                "e.g. cuda-python>=13 for CUDA 13), or run the bundle with an ONNX Runtime backend")


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise BackendError(TRT_INSTALL) from None
    return tensorrt


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 and 13
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise BackendError(CUDA_INSTALL) from None
    return cudart


class TensorRTBackend(Backend):
    """One TensorRT execution context over the bundle's engine, with ping-pong KV buffers on the device."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle):
        super().__init__(bundle)
        if bundle.static:
            raise BackendError(STATIC_REFUSED.format(path=bundle.path))
        if bundle.manifest.precision == "int4":
            raise BackendError(INT4_REFUSED.format(path=bundle.path))
        self._trt: Any = None
        self._cudart: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._io: dict[str, int] = {}               # input_ids, position_ids, attention_mask, logits: device ptrs
        self._kv: dict[str, list[int]] = {}         # past name -> [buffer 0, buffer 1]
        self._allocated = 0                         # batch the buffers are sized for
        self._cur = 0                               # which buffer of each pair holds the past

    # -- resources -------------------------------------------------------------------------------

    def _engine_path(self) -> Path:
        entry = self.manifest.engines.get("tensorrt")
        path = inside(self.bundle.path, str(entry.get("file", ""))) if isinstance(entry, dict) else None
        if path is None or not path.is_file():
            raise BackendError(f"bundle {self.bundle.path} has no TensorRT engine; build one with "
                               "`nectar-export build BUNDLE --engine tensorrt`")
        return path

    def _check(self, result: Any) -> Any:
        """Unwrap a cuda-python (err, *values) tuple, raising BackendError on a CUDA error."""
        err, *values = result
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA error {err}: {self._cudart.cudaGetErrorString(err)[1]}")
        return values[0] if len(values) == 1 else (values or None)

    def _activate_impl(self) -> None:
        if self.bundle.kind == "base":
            raise BackendError(f"{self.bundle.path} is a base bundle: the tensorrt backend runs single-file bundles "
                               "only; run a base with its packs on --backend ort-cpu or ort-cuda")
        path = self._engine_path()
        self._trt, self._cudart = _import_tensorrt(), _import_cudart()
        trt = self._trt
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT {trt.__version__} could not load {path}: engines are tied to the TensorRT "
                               "version and GPU they were built with; rebuild with `nectar-export build BUNDLE "
                               "--engine tensorrt` on this machine")
        self._engine, self._context = engine, engine.create_execution_context()
        try:
            self._stream = self._check(self._cudart.cudaStreamCreate())
        except BaseException:
            self._release_impl()
            raise

    def _malloc(self, nbytes: int) -> int:
        return int(self._check(self._cudart.cudaMalloc(max(int(nbytes), 1))))

    def _free_buffers(self) -> None:
        for ptr in [*self._io.values(), *(p for pair in self._kv.values() for p in pair)]:
            self._cudart.cudaFree(ptr)
        self._io, self._kv, self._allocated = {}, {}, 0

    def _release_impl(self) -> None:
        if self._cudart is not None:
            self._free_buffers()
            if self._stream is not None:
                self._cudart.cudaStreamDestroy(self._stream)
        self._stream = self._context = self._engine = None

    def _itemsize(self, name: str) -> int:
        return int(self._engine.get_tensor_dtype(name).itemsize)

    def _allocate(self, batch: int) -> None:
        """Device buffers for `batch` sequences over the whole window; the KV pair per past tensor."""
        self._free_buffers()
        m = self.manifest
        window, capacity = m.max_new_tokens, kv_capacity(self.bundle)
        logits_rows = window if m.logits == "all" else 1
        self._io = {IDS: self._malloc(batch * window * 8), POSITIONS: self._malloc(batch * window * 8),
                    MASK: self._malloc(batch * capacity * 8),
                    m.logits_name: self._malloc(batch * logits_rows * m.vocab_size * 4)}
        kv_bytes = batch * m.kv_heads * capacity * m.head_dim
        self._kv = {name: [self._malloc(kv_bytes * self._itemsize(name)) for _ in range(2)]
                    for name in self.bundle.past_names()}
        self._allocated = batch

    def _h2d(self, ptr: int, array: np.ndarray) -> None:
        # from pageable memory the call returns once the bytes are staged, so `array` may be dropped after it
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self._stream))

    def _d2h(self, array: np.ndarray, ptr: int) -> None:
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self._stream))

    def _bind_input(self, name: str, shape: tuple[int, ...], ptr: int) -> None:
        if not self._context.set_input_shape(name, shape):
            raise BackendError(f"shape {list(shape)} of {name} is outside the engine's optimization profile; "
                               "rebuild the engine with a profile that covers it")
        self._context.set_tensor_address(name, ptr)

    def _sync(self) -> None:
        self._check(self._cudart.cudaStreamSynchronize(self._stream))

    # -- sequences -------------------------------------------------------------------------------

    def _max_batch(self) -> int:
        """Largest batch the engine's optimization profile 0 accepts."""
        return int(self._engine.get_tensor_profile_shape(IDS, 0)[2][0])

    def _reset_impl(self, batch: int) -> None:
        """Start a sequence: the past is the bundle's cached tokens' KV (empty when it has none)."""
        if not 1 <= batch <= self._max_batch():
            raise BackendError(f"batch {batch} is outside the engine's profile (1..{self._max_batch()}); "
                               "rebuild the engine with a larger batch")
        if batch != self._allocated:
            self._allocate(batch)
        self._cur = 0
        if self.bundle.cached_tokens:
            self._load_context(batch)

    def _load_context(self, batch: int) -> None:
        """Copy the cached tokens' KV (context.safetensors, keyed by past input name) into buffer 0 of every pair."""
        from safetensors.numpy import load_file

        try:
            kv_dtype = np.dtype(self.manifest.kv_dtype)
        except TypeError:
            raise BackendError(f"kv_dtype {self.manifest.kv_dtype!r} has no numpy type, so {CONTEXT_FILE} cannot be "
                               "uploaded; export the bundle with fp16 or fp32 KV") from None
        tensors = load_file(str(self.bundle.path / CONTEXT_FILE))
        for name, (ptr, _) in self._kv.items():
            if name not in tensors:
                raise BackendError(f"{CONTEXT_FILE} lacks {name}; re-export the bundle")
            kv = tensors[name]                                                   # [1 or B, Hkv, C, D]
            host = np.ascontiguousarray(np.broadcast_to(kv, (batch, *kv.shape[1:])), dtype=kv_dtype)
            self._h2d(ptr, host)
        self._sync()

    def _step_impl(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run T new tokens [B, T] at the next positions; keep their KV on the device; return logits [B, 1 or T, V]."""
        m, ctx = self.manifest, self._context
        batch, tokens = ids.shape
        nxt = 1 - self._cur
        for name, array in ((IDS, ids), (POSITIONS, positions), (MASK, self.attention_mask(tokens))):
            array = array.astype(self._trt.nptype(self._engine.get_tensor_dtype(name)), copy=False)
            self._h2d(self._io[name], array)
            self._bind_input(name, array.shape, self._io[name])
        kv_shape = (batch, m.kv_heads, self.past_tokens, m.head_dim)                 # [B, Hkv, P, D]
        for past_name, present_name in zip(self.bundle.past_names(), self.bundle.present_names()):
            self._bind_input(past_name, kv_shape, self._kv[past_name][self._cur])
            ctx.set_tensor_address(present_name, self._kv[past_name][nxt])
        ctx.set_tensor_address(m.logits_name, self._io[m.logits_name])
        with self.timed("run"):
            if not ctx.execute_async_v3(int(self._stream)):
                raise BackendError("TensorRT execute_async_v3 failed; the TensorRT log above says why")
            logits = np.empty(tuple(ctx.get_tensor_shape(m.logits_name)),               # [B, 1 or T, V]
                              dtype=self._trt.nptype(self._engine.get_tensor_dtype(m.logits_name)))
            self._d2h(logits, self._io[m.logits_name])
            self._sync()
        self._cur = nxt
        return logits

    def _present_kv_impl(self) -> list[np.ndarray]:
        """Host copies of the past: the contiguous [B, Hkv, P, D] view at the start of each buffer `cur`."""
        m = self.manifest
        shape = (self.batch, m.kv_heads, self.past_tokens, m.head_dim)
        out = []
        for name in self.bundle.past_names():
            host = np.empty(int(np.prod(shape)), dtype=self._trt.nptype(self._engine.get_tensor_dtype(name)))
            self._d2h(host, self._kv[name][self._cur])
            out.append(host)
        self._sync()
        return [leading_view(host, shape) for host in out]

    # -- plain call ------------------------------------------------------------------------------

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the engine with host arrays in and out (temporary device buffers; no sequence state).

        Host arrays use numpy types, so bf16 I/O (no numpy dtype) is not served here; step() does not need it.
        """
        trt, engine, ctx = self._trt, self._engine, self._context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        missing = sorted(set(inputs) - set(feeds))
        if missing:
            raise BackendError(f"infer needs the inputs {missing}")
        ptrs: list[int] = []
        try:
            hosts = {n: np.ascontiguousarray(feeds[n], dtype=trt.nptype(engine.get_tensor_dtype(n))) for n in inputs}
            for name, array in hosts.items():
                ptrs.append(self._malloc(array.nbytes))
                self._h2d(ptrs[-1], array)
                self._bind_input(name, array.shape, ptrs[-1])
            outputs = {n: np.empty(tuple(ctx.get_tensor_shape(n)), dtype=trt.nptype(engine.get_tensor_dtype(n)))
                       for n in names if n not in hosts}
            for name, array in outputs.items():
                ptrs.append(self._malloc(array.nbytes))
                ctx.set_tensor_address(name, ptrs[-1])
            if not ctx.execute_async_v3(int(self._stream)):
                raise BackendError("TensorRT execute_async_v3 failed; the TensorRT log above says why")
            for ptr, array in zip(ptrs[len(hosts):], outputs.values()):
                self._d2h(array, ptr)
            self._sync()
            return outputs
        finally:
            for ptr in ptrs:
                self._cudart.cudaFree(ptr)
