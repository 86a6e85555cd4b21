"""Query collection: run the model with exact attention over the context and record, per layer and
KV-head, each new token's query with the exact partials the heads must reproduce."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from nectar_export.attention import ContextAttention, ExactContext, forward, merge, nectar_mode
from nectar_export.prefill import ContextCache
from nectar_export.queries import Sample


@dataclass
class LayerData:
    """One layer's training data, all KV-heads at once (N = tokens * query heads per KV-head)."""

    q: torch.Tensor           # [Hkv, N, D] post-RoPE queries
    ctx_lse: torch.Tensor     # [Hkv, N]    log-normalizer over the modeled context (sinks excluded)
    ctx_out: torch.Tensor     # [Hkv, N, D] attention output over the modeled context
    rest_lse: torch.Tensor    # [Hkv, N]    log-normalizer over sinks + new tokens (exact at inference)
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
    """Exact attention over sinks + modeled context that keeps what it saw for the valid tokens."""

    def __init__(self, sinks: ExactContext | None, modeled: ExactContext):
        self.sinks, self.modeled = sinks, modeled
        self.valid: torch.Tensor | None = None       # [B, T] bool, set before each batch
        self.parts: list[tuple[torch.Tensor, ...]] = []

    def attend(self, q: torch.Tensor, scaling: float, new_lse: torch.Tensor,
               new_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rest = (new_lse, new_out) if self.sinks is None else merge(*self.sinks.partial(q, scaling), new_lse, new_out)
        ctx = self.modeled.partial(q, scaling)
        keep = self.valid                                                   # [B, T]

        def pick(x: torch.Tensor) -> torch.Tensor:                          # [B, Hkv, G, T, ...] -> [Hkv, N, ...]
            x = x.movedim(3, 1)[keep]                                       # [N_tok, Hkv, G, ...]
            return x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:]).clone()

        self.parts.append((pick(q), pick(ctx[0]), pick(ctx[1]), pick(rest[0]), pick(rest[1])))
        return merge(*ctx, *rest)

    def data(self) -> LayerData:
        return LayerData(*(torch.cat(p, dim=1) for p in zip(*self.parts)))


@torch.inference_mode()
def collect(model: Any, cache: ContextCache, sinks: int, samples: Sequence[Sample], batch_size: int = 16,
            desc: str = "queries") -> list[LayerData]:
    """Teacher-force every sample after the context and return each layer's recorded queries and targets."""
    from transformers import DynamicCache

    modeled = cache.exact(sinks)
    heads = cache.exact(0, sinks) if sinks > 0 else [None] * len(modeled)
    recorders = [RecordingContext(s, m) for s, m in zip(heads, modeled)]
    order = sorted(samples, key=lambda s: len(s.ids))
    with nectar_mode(model, recorders):
        for i in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            batch = order[i:i + batch_size]
            width = max(len(s.ids) for s in batch)
            ids = torch.tensor([list(s.ids) + [0] * (width - len(s.ids)) for s in batch])
            valid = torch.tensor([[j < len(s.ids) for j in range(width)] for s in batch])
            for r in recorders:
                r.valid = valid
            positions = cache.n + torch.arange(width).unsqueeze(0).expand(len(batch), -1)
            forward(model, ids, positions, DynamicCache(config=model.config), logits_to_keep=1)
    return [r.data() for r in recorders]
