"""The context's KV cache, computed in chunks with the stock model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from nectar_export.attention import (ContextAttention, ExactContext, SlidingContext, cache_keyword, context_cache_for,
                                     layer_windows)


def sink_window_index(n: int, sinks: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions of the first `sinks` and the last `window` of n context tokens, without overlap."""
    return torch.cat([torch.arange(min(sinks, n), device=device), torch.arange(max(sinks, n - window), n, device=device)])


def per_head(index: torch.Tensor, heads: int) -> torch.Tensor:
    """A token selection as [Hkv, k]: a shared [k] index is repeated for every KV-head."""
    return index.unsqueeze(0).expand(heads, -1) if index.dim() == 1 else index


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [Hkv, n, D] at per-head token positions index [Hkv, k] (or shared [k]) -> [Hkv, k, D]."""
    index = per_head(index, x.shape[0])
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def complement(index: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """Per head [Hkv, n - k], in position order: the context tokens a selection [Hkv, k] (or [k]) leaves out."""
    index = per_head(index, heads)
    keep = torch.ones(heads, n, dtype=torch.bool, device=index.device)
    keep.scatter_(1, index, False)
    counts = keep.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError("a selection must keep the same number of distinct tokens in every head")
    return torch.arange(n, device=index.device).expand(heads, n)[keep].view(heads, -1)


@dataclass(frozen=True)
class ContextCache:
    """Post-RoPE keys and values of the n context tokens, per layer: [Hkv, n, D] each.

    windows: per layer, its sliding window (a hybrid model's local layers: they see only the last tokens, always
    exactly, and get no heads) or None; None for the whole field means every layer attends to everything. Every
    per-layer list of contexts this cache makes has the sliding layers' SlidingContext in place."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    windows: tuple[int | None, ...] | None = None

    @property
    def n(self) -> int:
        return self.keys[0].shape[1]

    @property
    def head_layers(self) -> list[int]:
        """The layers that attend to the whole context: the ones Nectar fits heads for."""
        return [i for i in range(len(self.keys)) if self.windows is None or self.windows[i] is None]

    def heads(self) -> "ContextCache":
        """The cache of the head layers only (what targets, attention mass and fitting index by layer)."""
        layers = self.head_layers
        return ContextCache([self.keys[i] for i in layers], [self.values[i] for i in layers])

    def localized(self, contexts: Sequence[ContextAttention | None]) -> list[ContextAttention | None]:
        """Per model layer: the head layers' contexts in order (one per head layer, or one per model layer whose
        sliding entries are replaced), each sliding layer's exact window."""
        if self.windows is None:
            return list(contexts)
        given = iter(contexts) if len(contexts) == len(self.head_layers) else None
        out: list[ContextAttention | None] = []
        for i, window in enumerate(self.windows):
            if window is not None:
                out.append(SlidingContext(self.keys[i], self.values[i], window))
            else:
                out.append(next(given) if given is not None else contexts[i])
        return out

    def exact(self, start: int = 0, stop: int | None = None) -> list[ContextAttention]:
        """Per-layer exact attention over context tokens [start, stop) (sliding layers: their window)."""
        return self.localized([ExactContext(k[:, start:stop], v[:, start:stop]) for k, v in zip(self.keys, self.values)])

    def exact_index(self, sinks: int, window: int) -> torch.Tensor:
        """Positions of the first `sinks` and the last `window` context tokens, without overlap."""
        return sink_window_index(self.n, sinks, window, self.keys[0].device)

    def subset(self, index: torch.Tensor | Sequence[torch.Tensor]) -> list[ExactContext]:
        """Per-layer exact attention over the context tokens at the given positions: one index for every layer
        and head ([k]), or one per layer, shared by its heads ([k]) or each head's own ([Hkv, k])."""
        layers = self.head_layers
        per_layer = list(index) if isinstance(index, (list, tuple)) else [index] * len(layers)
        if len(per_layer) == len(self.keys) and len(layers) != len(self.keys):
            per_layer = [per_layer[i] for i in layers]
        return self.localized([ExactContext(take(self.keys[l], i), take(self.values[l], i))
                               for l, i in zip(layers, per_layer)])



@torch.inference_mode()
def prefill(model: Any, ids: Sequence[int], chunk: int = 512, progress: bool = True) -> ContextCache:
    """Run the context through the model chunk by chunk and keep its KV cache."""
    windows = layer_windows(model.config)
    cache = context_cache_for(model)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    for start in tqdm(range(0, tokens.shape[1], chunk), desc="prefill", unit="chunk", disable=not progress):
        piece = tokens[:, start:start + chunk]
        model(input_ids=piece, **{cache_keyword(model): cache}, use_cache=True, logits_to_keep=1)
    # views of the cache's own tensors (batch 0): no copy, so the peak is one cache (30 GB at 128K for 1.7B fp32)
    return ContextCache(keys=[layer.keys[0] for layer in cache.layers], values=[layer.values[0] for layer in cache.layers],
                        windows=tuple(windows) if any(windows) else None)


def aligned(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> tuple[ContextCache, list[int]]:
    """Per-layer exact KV [Hkv, E_l, D] of different lengths as one length C = max E_l, zero slots in front, and
    per layer how many of those dead slots it has (the step graph masks them): a hybrid model's global layers keep
    their few exact tokens, its sliding layers their window, and the runtime keeps one past length."""
    C = max(k.shape[1] for k in keys)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.new_zeros(t.shape[0], C - t.shape[1], t.shape[2]), t], dim=1)
    return ContextCache([pad(k) for k in keys], [pad(v) for v in values]), [C - k.shape[1] for k in keys]
