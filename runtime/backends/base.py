"""The interface every backend implements (Polygraphy's runner is the model: activate, infer, release).

A backend owns the step graph's session and the KV state of one running sequence:

- `infer(feeds)`: one plain call of the graph with host arrays in and out (verification, tests);
- `reset(batch)`: start a sequence; the past is the bundle's context KV (the whole context in full bundles,
  the exact tokens in Nectar ones; empty when there are none);
- `step(input_ids)`: run new tokens [B, T] at the next positions, keep their keys and values inside the
  backend (host arrays on CPU, device buffers on GPUs) and return the last token's logits [B, V] fp32.

Use as a context manager: `with make_backend(bundle, "ort-cpu") as backend: ...`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nectar_runtime.bundle import Bundle
from nectar_runtime.errors import BackendError


# static buffers' slot count is rounded up to this; see kv_capacity
SLOT_ALIGN = 64


def kv_capacity(bundle: Bundle) -> int:
    """Slots a past buffer holds: the bundle's context tokens and the new-token window.

    Static buffers round that up to a multiple of SLOT_ALIGN. The extra slots stay zero and masked, and the
    attention products then get row counts cuBLAS has aligned tensor-core kernels for: on the H200 a Nectar
    step over 580 slots ran its query-key and probability-value products about twice as long as over 640
    (cutlass `align2` kernels instead of `nvjet`; docs/PITFALLS.md)."""
    tokens = bundle.context_tokens + bundle["max_new_tokens"]
    return -(-tokens // SLOT_ALIGN) * SLOT_ALIGN if bundle.static else tokens


def _ids_and_positions(input_ids: np.ndarray, position: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [B, T] and position_ids [B, T] (position, position + 1, ... in every row), both int64."""
    ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    batch, tokens = ids.shape
    positions = np.ascontiguousarray(np.broadcast_to(np.arange(position, position + tokens, dtype=np.int64),
                                                     (batch, tokens)))
    return ids, positions


def step_inputs(input_ids: np.ndarray, position: int, past: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, position_ids, attention_mask) int64 for T new tokens at `position` after `past` cached ones."""
    ids, positions = _ids_and_positions(input_ids, position)
    return ids, positions, np.ones((ids.shape[0], past + ids.shape[1]), dtype=np.int64)        # mask [B, P + T]


def static_inputs(input_ids: np.ndarray, position: int, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, position_ids, cache_position) int64 for T new tokens at `position` written to slots slot..."""
    ids, positions = _ids_and_positions(input_ids, position)
    return ids, positions, np.arange(slot, slot + ids.shape[1], dtype=np.int64)


def first_slot(bundle: Bundle) -> int:
    """The static buffer slot of the first new token: right after the bundle's context tokens."""
    return bundle.context_tokens


class Backend:
    name = "base"

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.active = False

    def __enter__(self) -> "Backend":
        self.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def activate(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def reset(self, batch: int = 1) -> None:
        raise NotImplementedError

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError
