"""The backend base class (Polygraphy's runner is the model: activate, infer, release).

A backend owns the step graph's session and the KV state of one running sequence. The base class owns what
every backend shares: activation, the checks on each call (active, input shape, batch, the new-token window),
the positions and slots of new tokens, and the timing of each step. A backend implements only:

    _activate_impl()         open the session, load what reset needs (the cached tokens' KV)
    _release_impl()          drop them
    _reset_impl(batch)       start a sequence whose past is the bundle's cached tokens' KV
    _switch_impl()           a base bundle: load the new pack's heads and cached tokens' KV, same session
    _step_impl(ids, pos)     run new tokens ids [B, T] at positions pos [B, T]; keep their KV; return logits [B, T', V]
    _present_kv_impl()       host copies of the present keys and values
    _infer_impl(feeds)       one plain call with host arrays

and the public methods wrap them:

- `reset(batch)`: start a sequence; the past is the bundle's cached tokens' KV (the whole context in full bundles,
  the exact tokens in Nectar ones; empty when there are none);
- `step(input_ids)`: run new tokens [B, T] at the next positions and return the last token's logits [B, V] fp32;
  `last_step` then says how long it took (and, where the backend times them, its parts); a bundle whose graph takes
  at most `step_tokens` per call (bundle.json) gets the tokens in pieces of that many, in order (exact: causal
  attention over the tokens so far does not depend on how they were split), and `reset` refuses a batch above
  `max_batch`;
- `present_kv()`: the past as it stands, one host array [B, Hkv, past_tokens, D] per past input (keys and values
  of every layer, in past-name order): what `verify` compares with the reference on every backend;
- `infer(feeds)`: one plain call of the graph with host arrays in and out (no sequence state);
- `switch(bundle)`: a base bundle with another pack (nectar_runtime.pack.resolve): the session stays, the
  pack's heads and KV replace the old ones, and a batch-1 sequence starts.

Use as a context manager: `with make_backend(bundle, "ort-cpu") as backend: ...`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from nectar_runtime.bundle import Bundle, check_graph_io
from nectar_runtime.errors import BackendError

# static buffers' slot count is rounded up to this; see kv_capacity
SLOT_ALIGN = 64


def kv_capacity(bundle: Bundle) -> int:
    """Slots a past buffer holds: the bundle's cached tokens and the new-token window.

    Static buffers round that up to a multiple of SLOT_ALIGN. The extra slots stay zero and masked, and the
    attention products then get row counts cuBLAS has aligned tensor-core kernels for: on the H200 a Nectar
    step over 580 slots ran its query-key and probability-value products about twice as long as over 640
    (cutlass `align2` kernels instead of `nvjet`; docs/PITFALLS.md)."""
    tokens = bundle.cached_tokens + bundle.manifest.max_new_tokens
    return -(-tokens // SLOT_ALIGN) * SLOT_ALIGN if bundle.static else tokens


def first_slot(bundle: Bundle) -> int:
    """The static buffer slot of the first new token: right after the bundle's cached tokens."""
    return bundle.cached_tokens


def positions_of(input_ids: np.ndarray, position: int) -> np.ndarray:
    """position_ids [B, T] int64: position, position + 1, ... in every row."""
    batch, tokens = input_ids.shape
    return np.ascontiguousarray(np.broadcast_to(np.arange(position, position + tokens, dtype=np.int64),
                                                (batch, tokens)))


def leading_view(buffer: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The contiguous tensor of `shape` that occupies the first elements of a larger buffer: what a device
    backend binds as the past (a view at the start of a max-size buffer), read back on the host."""
    return buffer.reshape(-1)[:int(np.prod(shape))].reshape(shape)


@dataclass
class StepTiming:
    """Wall time of one `step` call, and of its parts where the backend times them (milliseconds)."""

    ms: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)


class Backend:
    """One step graph session and the sequence state of one running batch (see the module docstring)."""

    name = "base"

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.active = False
        self.batch = 0              # rows of the running sequence (0 before the first reset)
        self.new_tokens = 0         # new tokens run since the last reset
        self.last_step: StepTiming | None = None
        self._parts: dict[str, float] = {}

    def __enter__(self) -> "Backend":
        self.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- the sequence, as every backend sees it ---------------------------------------------------

    @property
    def window(self) -> int:
        """New tokens a sequence may hold: the bundle's new-token window."""
        return self.manifest.max_new_tokens

    @property
    def past_tokens(self) -> int:
        """Tokens in the past: the bundle's cached tokens and the new tokens so far."""
        return self.bundle.cached_tokens + self.new_tokens

    @property
    def position(self) -> int:
        """Position of the next new token."""
        return self.manifest.first_position + self.new_tokens

    @property
    def slot(self) -> int:
        """Static layout: the buffer slot of the next new token (right after the cached tokens and earlier ones)."""
        return first_slot(self.bundle) + self.new_tokens

    # -- public calls: checks, then the backend's implementation ---------------------------------

    def activate(self) -> None:
        """Open the session and start a batch-1 sequence; BackendError when this backend cannot run here."""
        if self.active:
            return
        self._activate_impl()
        self.active = True
        try:
            self.reset(1)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Free the session and the KV buffers (safe to call twice)."""
        self._release_impl()
        self.active, self.batch, self.new_tokens = False, 0, 0

    def switch(self, bundle: Bundle) -> None:
        """Run another pack on the same base: keep the session, load the pack, start a batch-1 sequence."""
        self._require_active()
        if bundle.pack is None or self.bundle.pack is None or bundle.path != self.bundle.path:
            raise BackendError(f"switch takes the base {self.bundle.path} with another pack, got {bundle.path}")
        previous = self.bundle
        self.bundle, self.manifest = bundle, bundle.manifest
        try:
            self._switch_impl()
        except BaseException:
            self.bundle, self.manifest = previous, previous.manifest
            self._switch_impl()
            raise
        self.reset(1)

    def reset(self, batch: int = 1) -> None:
        """Start a sequence of `batch` rows whose past is the bundle's cached tokens' KV."""
        self._require_active()
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise BackendError(f"batch must be a positive integer, got {batch!r}")
        if self.manifest.max_batch and batch > self.manifest.max_batch:
            raise BackendError(f"this bundle's graph runs at most {self.manifest.max_batch} sequence(s) per call "
                               f"(bundle.json max_batch), got batch {batch}; export with --ops portable for batches")
        self._reset_impl(int(batch))
        self.batch, self.new_tokens = int(batch), 0

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        """Run new tokens [B, T] at the next positions, keep their KV, return the last token's logits [B, V] fp32."""
        self._require_active()
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise BackendError(f"step takes token ids of shape [batch, tokens] with tokens >= 1, got {ids.shape}")
        if ids.shape[0] != self.batch:
            raise BackendError(f"step got batch {ids.shape[0]}, the sequence was reset with batch {self.batch}")
        if self.new_tokens + ids.shape[1] > self.window:
            raise BackendError(f"{self.new_tokens} + {ids.shape[1]} new tokens exceed this bundle's new-token "
                               f"window of {self.window}; reset() to start a new sequence")
        self._parts = {}
        start = time.perf_counter()
        piece = self.manifest.step_tokens or ids.shape[1]
        for first in range(0, ids.shape[1], piece):      # a graph of step_tokens per call takes a prompt in pieces
            part = ids[:, first:first + piece]
            logits = self._step_impl(part, positions_of(part, self.position))
            self.new_tokens += part.shape[1]
        self.last_step = StepTiming((time.perf_counter() - start) * 1e3, self._parts)
        return np.asarray(logits[:, -1], dtype=np.float32)

    def present_kv(self) -> list[np.ndarray]:
        """The past as it stands: one host array [B, Hkv, past_tokens, D] per past input, in past-name order."""
        self._require_active()
        arrays = self._present_kv_impl()
        want = (self.batch, self.manifest.kv_heads, self.past_tokens, self.manifest.head_dim)
        if len(arrays) != 2 * self.manifest.layers or any(a.shape != want for a in arrays):
            raise BackendError(f"{self.name} holds KV of shapes {sorted({a.shape for a in arrays})}, expected "
                               f"{2 * self.manifest.layers} arrays of {want}")
        return arrays

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One plain call of the graph with host arrays in and out (no sequence state)."""
        self._require_active()
        return self._infer_impl(feeds)

    # -- helpers for implementations ---------------------------------------------------------------

    def attention_mask(self, tokens: int) -> np.ndarray:
        """Dynamic layout: mask [B, P + T] int64, every past and new token visible."""
        return np.ones((self.batch, self.past_tokens + tokens), dtype=np.int64)

    def cache_position(self, tokens: int) -> np.ndarray:
        """Static layout: the slots [T] int64 this step's new tokens are written to."""
        return np.arange(self.slot, self.slot + tokens, dtype=np.int64)

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Time a part of the current step into `last_step.parts`."""
        start = time.perf_counter()
        yield
        self._parts[part] = (time.perf_counter() - start) * 1e3

    def check_session_io(self, session: Any) -> None:
        """Refuse a bundle.json whose numbers disagree with the ONNX Runtime session's inputs and outputs."""
        check_graph_io(self.manifest, [(a.name, a.shape) for a in session.get_inputs()],
                       [(a.name, a.shape) for a in session.get_outputs()], self.bundle.path)

    def _require_active(self) -> None:
        if not self.active:
            raise BackendError(f"the {self.name} backend is not active; use it as a context manager")

    # -- what each backend implements --------------------------------------------------------------

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _release_impl(self) -> None:
        raise NotImplementedError

    def _reset_impl(self, batch: int) -> None:
        raise NotImplementedError

    def _switch_impl(self) -> None:
        raise BackendError(f"the {self.name} backend runs single-file bundles, not a base with packs; "
                           "use --backend ort-cpu or ort-cuda")

    def _step_impl(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _present_kv_impl(self) -> list[np.ndarray]:
        raise NotImplementedError

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError
