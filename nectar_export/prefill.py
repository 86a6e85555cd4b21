"""The context's KV cache, computed in chunks with the stock model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from nectar_export.attention import ExactContext, cache_keyword


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
    """Post-RoPE keys and values of the n context tokens, per layer: [Hkv, n, D] each."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def n(self) -> int:
        return self.keys[0].shape[1]

    def exact(self, start: int = 0, stop: int | None = None) -> list[ExactContext]:
        """Per-layer exact attention over context tokens [start, stop)."""
        return [ExactContext(k[:, start:stop], v[:, start:stop]) for k, v in zip(self.keys, self.values)]

    def exact_index(self, sinks: int, window: int) -> torch.Tensor:
        """Positions of the first `sinks` and the last `window` context tokens, without overlap."""
        return sink_window_index(self.n, sinks, window, self.keys[0].device)

    def subset(self, index: torch.Tensor | Sequence[torch.Tensor]) -> list[ExactContext]:
        """Per-layer exact attention over the context tokens at the given positions: one index for every layer
        and head ([k]), or one per layer, shared by its heads ([k]) or each head's own ([Hkv, k])."""
        per_layer = index if isinstance(index, (list, tuple)) else [index] * len(self.keys)
        return [ExactContext(take(k, i), take(v, i)) for k, v, i in zip(self.keys, self.values, per_layer)]



@torch.inference_mode()
def prefill(model: Any, ids: Sequence[int], chunk: int = 512, progress: bool = True) -> ContextCache:
    """Run the context through the model chunk by chunk and keep its KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    for start in tqdm(range(0, tokens.shape[1], chunk), desc="prefill", unit="chunk", disable=not progress):
        piece = tokens[:, start:start + chunk]
        model(input_ids=piece, **{cache_keyword(model): cache}, use_cache=True, logits_to_keep=1)
    # views of the cache's own tensors (batch 0): no copy, so the peak is one cache (30 GB at 128K for 1.7B fp32)
    return ContextCache(keys=[layer.keys[0] for layer in cache.layers], values=[layer.values[0] for layer in cache.layers])
