"""ONNX Runtime's CUDA execution provider with IOBinding: the KV cache stays on the GPU for the whole sequence.

NOT RUN ON THE MACHINE IT WAS WRITTEN ON: the build and test machines have no GPU and carry the CPU
`onnxruntime` wheel, so only the error path (no CUDA EP -> BackendError) is tested there. It follows the
onnxruntime Python API of 1.2x/1.3x (`InferenceSession.io_binding`, `IOBinding.bind_input/bind_output`
with raw device pointers, `OrtValue.ortvalue_from_shape_and_type`) and is meant for `onnxruntime-gpu`.

Buffers (allocated once per `reset` whose batch differs from the last):
    per past tensor, two device buffers [B, Hkv, capacity, D], capacity = cached_tokens + max_new_tokens;
    the bundle's cached tokens' KV [B, Hkv, cached_tokens, D] (the whole context in full bundles, the exact tokens
    in Nectar ones) uploaded to the device once (per batch size).
A step binds the past as a view [B, Hkv, P, D] at the start of buffer `cur` and the present
[B, Hkv, P + T, D] at the start of buffer `1 - cur`; then the two swap. Only the logits come back to the host.

Static-cache bundles (`export --cache static`) instead get one buffer per past tensor [B, Hkv, capacity, D]
(the context KV in its first slots, uploaded once), bound as both the past input and the
present output: the graph's ScatterElements writes the new tokens' slots in place and skips its copy
(input and output share memory). Every one-token step then has the same shapes and addresses: its inputs
live in small device tensors updated in place, the logits land in a device tensor, and with
`cuda_graph=True` (the default for static bundles) ONNX Runtime captures the step as a CUDA graph on its
first runs and replays it afterwards (run option gpu_graph_id=1); prompts of several tokens run outside the
graph (gpu_graph_id=-1).

Why a view at the start of a max-size buffer is exact: a contiguous [B, Hkv, P, D] tensor occupies the first
B*Hkv*P*D elements of any buffer at least that large, and its strides follow from the bound shape, not from
the shape the buffer was allocated with. The present written as contiguous [B, Hkv, P + T, D] is therefore,
byte for byte, the past of the next step.

A base bundle with packs (nectar_runtime.pack): the pack's heads are uploaded once as device tensors and bound
as inputs. Each pack loaded keeps its own state (heads, KV buffers, the fixed one-token binding) and, with CUDA
graphs, its own graph id, so `switch` back to a pack seen before only selects its state: no upload, no new
capture, and no new session. Device memory per loaded pack is its heads and its KV buffers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nectar_runtime.backends.base import Backend, kv_capacity, leading_view
from nectar_runtime.backends.ort import kv_numpy_dtype, load_context_kv, load_heads, session_options
from nectar_runtime.bundle import Bundle
from nectar_runtime.errors import BackendError

CUDA_EP = "CUDAExecutionProvider"
BFLOAT16 = 16                     # onnx.TensorProto.BFLOAT16: ORT takes ONNX type ints where numpy has no type
GPU_INSTALL = ("ort-cuda needs onnxruntime-gpu with the CUDA execution provider (this onnxruntime offers {found}); "
               "install onnxruntime-gpu instead of onnxruntime (never both), or use --backend ort-cpu")


def import_onnxruntime_cuda() -> Any:
    """onnxruntime with its CUDA libraries preloaded; BackendError when the CUDA EP is absent."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("ort-cuda needs onnxruntime-gpu: pip install onnxruntime-gpu") from None
    if hasattr(ort, "preload_dlls"):        # finds the CUDA/cuDNN libraries of pip-installed nvidia-* packages
        try:
            ort.preload_dlls()
        except Exception:                   # a system CUDA install may still serve; the session check decides
            pass
    providers = ort.get_available_providers()
    if CUDA_EP not in providers:
        raise BackendError(GPU_INSTALL.format(found=", ".join(providers)))
    return ort


class OrtCudaBackend(Backend):
    """One CUDA-EP session; KV in two device buffers per past tensor, bound ping-pong through IOBinding."""

    name = "ort-cuda"
    device = "cuda"                 # where the KV buffers live (the tests bind the same way on "cpu")

    def __init__(self, bundle: Bundle, device_id: int = 0, optimize: bool = True, profile: str | None = None,
                 cuda_graph: bool | None = None):
        super().__init__(bundle)
        self.device_id, self.optimize, self.profile = device_id, optimize, profile
        self.cuda_graph = bundle.static if cuda_graph is None else cuda_graph
        if self.cuda_graph and not bundle.static:
            raise BackendError("CUDA graphs need a static-cache bundle (nectar-export export --cache static)")
        self._decode: Any = None                   # static bundles: the one-token step's fixed binding
        self._decode_io: dict[str, Any] = {}       # its device inputs and logits
        self._host: list[np.ndarray] = []          # host arrays behind "cpu" buffers (tests bind on the host)
        self.session: Any = None
        self._ort: Any = None
        self._binding: Any = None
        self._kv: dict[str, list[Any]] = {}        # past name -> [buffer 0, buffer 1] device OrtValues
        self._context: dict[str, Any] = {}         # past name -> device OrtValue [B, Hkv, C, D] (dynamic layout)
        self._allocated = 0                        # batch the buffers are sized for
        self._cur = 0                              # which buffer of each pair holds the past
        self._on_context = False                   # the next step reads the past from the context values
        self._heads: dict[str, Any] = {}           # a base bundle's head inputs: name -> device OrtValue
        self._graph_id = "1"                       # the CUDA graph of this pack's one-token step
        self._states: dict[Any, dict[str, Any]] = {}   # pack key -> its saved state (see _switch_impl)
        self._key = bundle.pack.key if bundle.pack is not None else None      # the running pack's

    # -- resources -------------------------------------------------------------------------------

    def _open(self) -> tuple[Any, Any]:
        """(onnxruntime module, session on the CUDA EP); BackendError when it cannot run here."""
        ort = import_onnxruntime_cuda()
        options = session_options(ort, self.optimize, self.profile)
        cuda_options = {"device_id": self.device_id, **({"enable_cuda_graph": "1"} if self.cuda_graph else {})}
        providers = [(CUDA_EP, cuda_options), "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(self.bundle.onnx_path), options, providers=providers)
        except Exception as exc:
            raise BackendError(f"ONNX Runtime (CUDA) cannot load {self.bundle.onnx_path}: "
                               f"{str(exc).splitlines()[0][:300]}") from None
        if CUDA_EP not in session.get_providers():
            raise BackendError(f"ONNX Runtime fell back to {session.get_providers()}: no usable CUDA device "
                               f"{self.device_id}; check the driver and CUDA libraries, or use --backend ort-cpu")
        return ort, session

    def _activate_impl(self) -> None:
        self._ort, self.session = self._open()
        self.check_session_io(self.session)
        self._binding = self.session.io_binding()
        self._runs = {graph: self._run_options(graph) for graph in ("1", "-1")}
        self.kv_dtype = kv_numpy_dtype(self.manifest.kv_dtype)
        self._element = BFLOAT16 if self.manifest.kv_dtype == "bfloat16" else np.dtype(self.manifest.kv_dtype).type
        self._heads = self._upload_heads()

    def _upload_heads(self) -> dict[str, Any]:
        """The pack's head inputs copied to the device once ({} for a single-file bundle)."""
        return {name: self._ort.OrtValue.ortvalue_from_numpy(array, self.device, self.device_id)
                for name, array in load_heads(self.bundle).items()}

    STATE = ("_kv", "_context", "_allocated", "_decode", "_decode_io", "_host", "_heads", "_graph_id")

    def _switch_impl(self) -> None:
        """Save the running pack's state, then select the new pack's (made on first use: heads uploaded, buffers
        allocated at the next reset, a CUDA graph id of its own)."""
        self._states[self._key] = {name: getattr(self, name) for name in self.STATE}
        self._key = self.bundle.pack.key
        saved = self._states.get(self._key)
        if saved is not None:
            for name, value in saved.items():
                setattr(self, name, value)
            return
        self._decode, self._decode_io, self._host, self._kv, self._context, self._allocated = None, {}, [], {}, {}, 0
        self._heads = self._upload_heads()
        self._graph_id = str(len(self._states) + 1)
        self._runs[self._graph_id] = self._run_options(self._graph_id)

    def end_profiling(self) -> str:
        """Close ORT's trace (profile=PREFIX was given) and return its file's path."""
        return self.session.end_profiling()

    def _run_options(self, graph: str) -> Any:
        """Run options naming the CUDA graph a run belongs to ("-1": none); plain options without graphs."""
        options = self._ort.RunOptions()
        if self.cuda_graph:
            options.add_run_config_entry("gpu_graph_id", graph)
        return options

    def _release_impl(self) -> None:
        self._decode, self._decode_io, self._host = None, {}, []
        self._kv, self._context, self._allocated = {}, {}, 0
        self._heads, self._states, self._graph_id = {}, {}, "1"
        self._binding = self.session = None

    def _device_value(self, shape: list[int], element: Any = None) -> Any:
        """An uninitialized device tensor of the KV's element type, or of `element`."""
        element = self._element if element is None else element
        return self._ort.OrtValue.ortvalue_from_shape_and_type(shape, element, self.device, self.device_id)

    def _buffer_shape(self, batch: int) -> list[int]:
        return [batch, self.manifest.kv_heads, kv_capacity(self.bundle), self.manifest.head_dim]

    def _allocate(self, batch: int) -> None:
        """Two device buffers per past tensor, each [B, Hkv, capacity, D], and the cached tokens' KV."""
        b = self.bundle
        if b.cached_tokens and self.manifest.kv_dtype == "bfloat16":
            raise BackendError("ort-cuda does not upload a bfloat16 context KV; export the bundle "
                               "with --precision fp16 or fp32")
        shape = self._buffer_shape(batch)
        if b.static:
            self._allocate_static(batch, shape)
            return
        self._kv = {name: [self._device_value(shape), self._device_value(shape)] for name in b.past_names()}
        self._context = self._upload_context(batch) if b.cached_tokens else {}
        self._allocated = batch

    def _allocate_static(self, batch: int, shape: list[int]) -> None:
        """One buffer per past tensor (the cached tokens' KV in its first slots) and the fixed one-token binding."""
        b, m, ort = self.bundle, self.manifest, self._ort
        # zeros, not garbage: a masked slot's value still meets its 0 weight, and 0 * NaN is NaN
        context = load_context_kv(b, self.kv_dtype) if b.cached_tokens else [None] * len(b.past_names())
        self._kv, self._host = {}, []
        for name, kv in zip(b.past_names(), context):
            host = np.zeros(shape, self.kv_dtype)            # one array per buffer: on "cpu" ORT wraps it, no copy
            if kv is not None:
                host[:, :, :b.cached_tokens] = kv
            self._kv[name] = [ort.OrtValue.ortvalue_from_numpy(host, self.device, self.device_id)]
            if self.device == "cpu":
                self._host.append(host)                      # keep what the OrtValue points into alive
        self._context, self._allocated = {}, batch
        value = self._device_value
        io = {"input_ids": value([batch, 1], np.int64), "position_ids": value([batch, 1], np.int64),
              "cache_position": value([1], np.int64), "logits": value([batch, 1, m.vocab_size], np.float32)}
        decode = self.session.io_binding()
        for name in ("input_ids", "position_ids", "cache_position"):
            decode.bind_ortvalue_input(name, io[name])
        decode.bind_ortvalue_output(m.logits_name, io["logits"])
        self._bind_buffers(decode, shape)
        self._bind_heads(decode)
        self._decode, self._decode_io = decode, io

    def _bind_buffers(self, io: Any, shape: list[int]) -> None:
        """Static layout: each buffer is both the past input and the present output (updated in place)."""
        for past_name, present_name in zip(self.bundle.past_names(), self.bundle.present_names()):
            ptr = self._kv[past_name][0].data_ptr()
            io.bind_input(past_name, self.device, self.device_id, self._element, shape, ptr)
            io.bind_output(present_name, self.device, self.device_id, self._element, shape, ptr)

    def _bind_heads(self, io: Any) -> None:
        """A base bundle: the pack's device-resident heads as inputs."""
        for name, value in self._heads.items():
            io.bind_ortvalue_input(name, value)

    def _upload_context(self, batch: int) -> dict[str, Any]:
        """The cached tokens' KV copied to the device once: past name -> OrtValue [B, Hkv, cached_tokens, D]."""
        host = load_context_kv(self.bundle, self.kv_dtype)                      # [1, Hkv, C, D] each
        ort = self._ort
        return {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np.repeat(kv, batch, axis=0)),
                                                      self.device, self.device_id)
                for name, kv in zip(self.bundle.past_names(), host)}

    # -- sequences -------------------------------------------------------------------------------

    def _reset_impl(self, batch: int) -> None:
        """Start a sequence: the past is the uploaded cached tokens' KV (empty when the bundle has none)."""
        if batch != self._allocated:
            self._allocate(batch)
        self._cur, self._on_context = 0, self.bundle.cached_tokens > 0

    def _step_impl(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run T new tokens [B, T]; the KV stays on the device; returns logits [B, 1 or T, V]."""
        if self.bundle.static:
            logits = self._static_step(ids, positions)
        else:
            self._bind(ids, positions)
            with self.timed("run"):
                self.session.run_with_iobinding(self._binding, self._runs["-1"])
            with self.timed("fetch_logits"):
                logits = self._binding.get_outputs()[0].numpy()
        self._cur, self._on_context = 1 - self._cur, False
        return logits

    def _static_step(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One static-layout step: the fixed binding (a CUDA graph replay) for one token, a plain run otherwise."""
        slots = self.cache_position(ids.shape[1])
        if ids.shape[1] == 1:
            with self.timed("update_inputs"):
                for name, array in (("input_ids", ids), ("position_ids", positions), ("cache_position", slots)):
                    self._decode_io[name].update_inplace(array)
            with self.timed("run"):
                self.session.run_with_iobinding(self._decode, self._runs[self._graph_id])
            with self.timed("fetch_logits"):
                return self._decode_io["logits"].numpy()
        io = self._binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_output(self.manifest.logits_name, "cpu")
        for name, array in (("input_ids", ids), ("position_ids", positions), ("cache_position", slots)):
            io.bind_cpu_input(name, array)
        self._bind_buffers(io, self._buffer_shape(ids.shape[0]))
        self._bind_heads(io)
        with self.timed("run"):
            self.session.run_with_iobinding(io, self._runs["-1"])
        return io.get_outputs()[0].numpy()

    def _past_ptr(self, name: str) -> int:
        source = self._context[name] if self._on_context else self._kv[name][self._cur]
        return source.data_ptr()

    def _bind(self, ids: np.ndarray, positions: np.ndarray) -> None:
        """Bind this step's I/O: small int inputs from the host, past/present as device views, logits to host."""
        m, io = self.manifest, self._binding
        batch, tokens = ids.shape
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_output(m.logits_name, "cpu")       # first output bound: get_outputs()[0] is the logits
        for name, array in (("input_ids", ids), ("position_ids", positions),
                            ("attention_mask", self.attention_mask(tokens))):
            io.bind_cpu_input(name, array)
        past_shape = [batch, m.kv_heads, self.past_tokens, m.head_dim]                  # [B, Hkv, P, D]
        present_shape = [batch, m.kv_heads, self.past_tokens + tokens, m.head_dim]      # [B, Hkv, P + T, D]
        nxt = 1 - self._cur
        for past_name, present_name in zip(self.bundle.past_names(), self.bundle.present_names()):
            io.bind_input(past_name, self.device, self.device_id, self._element, past_shape, self._past_ptr(past_name))
            io.bind_output(present_name, self.device, self.device_id, self._element, present_shape,
                           self._kv[past_name][nxt].data_ptr())
        self._bind_heads(io)

    def _present_kv_impl(self) -> list[np.ndarray]:
        """Host copies of the past: the filled slots of each static buffer, or the contiguous view at the start of
        the buffer that holds the past (the uploaded cached tokens before the first step)."""
        m = self.manifest
        shape = (self.batch, m.kv_heads, self.past_tokens, m.head_dim)
        out = []
        for name in self.bundle.past_names():
            if self.bundle.static:
                out.append(np.array(self._kv[name][0].numpy()[:, :, :self.past_tokens]))
            else:
                source = self._context[name] if self._on_context else self._kv[name][self._cur]
                out.append(np.array(leading_view(source.numpy(), shape)))
        return out

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One plain call with host arrays in and out (ORT copies them; no sequence state)."""
        names = [o.name for o in self.session.get_outputs()]
        heads = {name: value.numpy() for name, value in self._heads.items()}
        return dict(zip(names, self.session.run(names, {**heads, **feeds})))

    def kv_bytes(self) -> int:
        """Device bytes held for the KV: both buffers of every pair plus the uploaded context."""
        values = [v for pair in self._kv.values() for v in pair] + list(self._context.values())
        return sum(int(np.prod(v.shape())) * np.dtype(self.kv_dtype).itemsize for v in values)
