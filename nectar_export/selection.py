"""Which context tokens an exact-token cache keeps, per (layer, KV-head), at a given number of tokens.

Two scorings, both over the same real keys and values, both handed to the same exact attention code:
- attention mass under queries (`attention_mass`): the mean softmax weight each context token gets from a set
  of recorded queries, with the new tokens in the softmax as at inference. Under the fit's own training
  queries this is the query-aware selection, the strongest exact-token cache at equal memory.
- SnapKV (Li et al. 2024, arXiv 2404.14469, section 4): the attention the document's last tokens (an
  observation window) pay to each earlier token, summed over the window and the group's query heads and
  smoothed by 1-D max pooling; the window itself is kept. It needs no query, like Nectar.

A selection is one index tensor [Hkv, k] per layer; `ContextCache.subset` turns it into exact contexts.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.nn import functional as F

from nectar_export.attention import exact_partial
from nectar_export.prefill import ContextCache, sink_window_index
from nectar_export.queries import Queries, collect
from nectar_export.samples import Sample

SNAPKV_WINDOW = 32        # the paper's observation window
SNAPKV_POOL = 7           # and its pooling kernel


@torch.inference_mode()
def attention_mass(queries: Sequence[Queries], cache: ContextCache, scaling: float,
                   scores_budget: int = 1 << 25) -> list[torch.Tensor]:
    """Per layer [Hkv, n]: each context token's softmax weight averaged over the queries (new tokens counted).
    Queries go in chunks of at most `scores_budget` scores (128 MB in float32)."""
    masses = []
    for layer, qs in enumerate(queries):
        keys = cache.keys[layer]
        chunk = max(1, scores_budget // (keys.shape[0] * keys.shape[1]))
        lse, _ = exact_partial(qs.q.unsqueeze(0).unsqueeze(2), keys, cache.values[layer], scaling)
        total = torch.logaddexp(lse[0, :, 0], qs.new_lse)                     # [Hkv, N]
        mass = torch.zeros(keys.shape[:2], dtype=torch.float64, device=keys.device)
        for start in range(0, qs.q.shape[1], chunk):
            q = qs.q[:, start:start + chunk]
            scores = torch.bmm(q, keys.transpose(1, 2)) * scaling              # [Hkv, c, n]
            mass += torch.exp(scores - total[:, start:start + chunk, None]).sum(1).double()
        masses.append((mass / max(qs.q.shape[1], 1)).float())
    return masses


def top_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring positions per head [Hkv, k], in position order (ties: the earlier position)."""
    k = min(k, scores.shape[1])
    # a stable descending sort breaks ties by position, so equal scores never pick different tokens per run
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


@torch.inference_mode()
def snapkv_scores(model: Any, cache: ContextCache, context_ids: Sequence[int], window: int = SNAPKV_WINDOW,
                  pool: int = SNAPKV_POOL) -> list[torch.Tensor]:
    """Per layer with heads (cache.head_layers) [Hkv, n]: SnapKV's vote of the last `window` context tokens, the
    window itself scored +inf."""
    n = cache.n
    window = max(1, min(window, n - 1))
    head = ContextCache(keys=[k[:, :n - window] for k in cache.keys], values=[v[:, :n - window] for v in cache.values],
                        windows=cache.windows)
    observed = collect(model, head, [Sample("snapkv", tuple(context_ids[n - window:]))], desc="snapkv window")
    scaling = float(model.model.layers[0].self_attn.scaling)
    out = []
    for layer, qs in zip(cache.head_layers, observed):
        keys = cache.keys[layer][:, :n - window]
        votes = attention_mass([qs], ContextCache([keys], [cache.values[layer][:, :n - window]]), scaling)[0]
        if pool > 1:
            votes = F.max_pool1d(votes.unsqueeze(1), pool, stride=1, padding=pool // 2).squeeze(1)
        scores = torch.full((keys.shape[0], n), float("inf"), device=keys.device)
        scores[:, :n - window] = votes
        out.append(scores)
    return out


def exact_sets(cache_n: int, sinks: int, window: int, salient: int, mass: Sequence[torch.Tensor] | None,
               layers: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Per layer, the context tokens that stay exact KV: the first `sinks` and the last `window` ([E], shared
    by the heads) and, with `salient` > 0, each KV-head's `salient` other tokens of highest attention mass
    ([Hkv, E + salient], position order). The rest of the context is what the networks model."""
    base = sink_window_index(cache_n, sinks, window, device)
    if salient <= 0:
        return [base] * layers
    if mass is None:
        raise ValueError("salient exact tokens need the training queries' attention mass")
    sets = []
    for m in mass:
        scores = m.to(device).clone()
        scores[:, base] = float("-inf")
        chosen = top_tokens(scores, min(salient, cache_n - len(base)))
        sets.append(torch.cat([base.expand(m.shape[0], -1), chosen], dim=1).sort(dim=1).values)
    return sets
