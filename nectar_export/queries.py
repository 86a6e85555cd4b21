"""Query collection and targets.

collect(): run the model with exact attention over the whole context and record, per layer, each new
token's post-RoPE query and its exact attention partial over the new tokens (the part that stays
exact at inference). targets(): split the context into exact tokens (sinks, recent window) and the
modeled rest, and compute each query's exact partials over both, streamed over the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from nectar_export.attention import ContextAttention, ExactContext, exact_partial, forward, merge, nectar_mode
from nectar_export.prefill import ContextCache, complement, take
from nectar_export.samples import Sample, right_padded


@dataclass
class Queries:
    """One layer's recorded queries (N = tokens * query heads per KV-head) and their new-token partial."""

    q: torch.Tensor          # [Hkv, N, D]
    new_lse: torch.Tensor    # [Hkv, N]
    new_out: torch.Tensor    # [Hkv, N, D]


@dataclass
class LayerData:
    """One layer's training data, all KV-heads at once."""

    q: torch.Tensor           # [Hkv, N, D] post-RoPE queries
    ctx_lse: torch.Tensor     # [Hkv, N]    log-normalizer over the modeled context
    ctx_out: torch.Tensor     # [Hkv, N, D] attention output over the modeled context
    rest_lse: torch.Tensor    # [Hkv, N]    log-normalizer over exact tokens (sinks, window) + new tokens
    rest_out: torch.Tensor    # [Hkv, N, D]

    @property
    def size(self) -> int:
        return self.q.shape[1]

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The true full-attention (lse, output) each query sees."""
        return merge(self.ctx_lse, self.ctx_out, self.rest_lse, self.rest_out)

    def subset(self, index: torch.Tensor) -> "LayerData":
        return LayerData(self.q[:, index], self.ctx_lse[:, index], self.ctx_out[:, index],
                         self.rest_lse[:, index], self.rest_out[:, index])


class RecordingContext(ContextAttention):
    """Exact attention over the whole context that keeps queries and new-token partials of valid tokens."""

    def __init__(self, full: ExactContext):
        self.full = full
        self.valid: torch.Tensor | None = None       # [B, T] bool, set before each batch
        self.parts: list[tuple[torch.Tensor, ...]] = []

    def attend(self, q: torch.Tensor, scaling: float, new_lse: torch.Tensor, new_out: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.valid

        def pick(x: torch.Tensor) -> torch.Tensor:                          # [B, Hkv, G, T, ...] -> [Hkv, N, ...]
            x = x.movedim(3, 1)[keep]                                       # [N_tok, Hkv, G, ...]
            return x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:]).clone()

        self.parts.append((pick(q), pick(new_lse), pick(new_out)))
        return merge(*self.full.partial(q, scaling), new_lse, new_out)

    def queries(self) -> Queries:
        return Queries(*(torch.cat(p, dim=1) for p in zip(*self.parts)))


@torch.inference_mode()
def collect(model: Any, cache: ContextCache, samples: Sequence[Sample], batch_size: int = 16,
            desc: str = "queries") -> list[Queries]:
    """Teacher-force every sample after the context (full attention) and return the queries of each layer that
    gets heads (every layer, or a hybrid model's global ones: cache.head_layers)."""
    from transformers import DynamicCache

    contexts = cache.exact()
    recorders = [RecordingContext(contexts[layer]) for layer in cache.head_layers]
    for layer, recorder in zip(cache.head_layers, recorders):
        contexts[layer] = recorder
    order = sorted(samples, key=lambda s: len(s.ids))
    with nectar_mode(model, contexts):
        for i in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            batch = order[i:i + batch_size]
            ids, valid, positions = right_padded(batch, cache.n)
            for r in recorders:
                r.valid = valid.to(cache.keys[0].device)
            forward(model, ids, positions, DynamicCache(config=model.config), logits_to_keep=1)
    return [r.queries() for r in recorders]


def _grouped(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0).unsqueeze(2)                                      # [H, N, D] -> [1, H, 1, N, D]


@torch.inference_mode()
def targets(queries: Sequence[Queries], cache: ContextCache, exact_index: torch.Tensor | Sequence[torch.Tensor],
            scaling: float, desc: str = "targets") -> list[LayerData]:
    """Exact partials of every query over the modeled context and over exact tokens + new tokens.

    exact_index: the exact tokens, one index for every layer ([E]) or one per layer, shared by its heads ([E])
    or each KV-head's own ([Hkv, E]); the rest of the context is modeled."""
    out = []
    for layer, qs in enumerate(tqdm(queries, desc=desc, unit="layer")):
        index = exact_index[layer] if isinstance(exact_index, (list, tuple)) else exact_index
        k, v = cache.keys[layer], cache.values[layer]
        modeled = complement(index, cache.n, k.shape[0])
        ctx_lse, ctx_out = exact_partial(_grouped(qs.q), take(k, modeled), take(v, modeled), scaling)
        if index.shape[-1]:
            ex_lse, ex_out = exact_partial(_grouped(qs.q), take(k, index), take(v, index), scaling)
            rest = merge(ex_lse[0, :, 0], ex_out[0, :, 0], qs.new_lse, qs.new_out)
        else:
            rest = (qs.new_lse, qs.new_out)
        out.append(LayerData(qs.q, ctx_lse[0, :, 0], ctx_out[0, :, 0], *rest))
    return out
