"""Nectar attention in torch: exact attention over the new tokens merged with a context partial.

The context partial comes from a per-layer object attached to the model's attention modules: the
exact cache (oracle, full-attention reference, window baselines), fitted heads, or a recorder that
captures queries while attending exactly. The function is registered through transformers'
AttentionInterface under the name "nectar"; nothing global is patched.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

ATTN_NAME = "nectar"
_SLOT = "_nectar_context"  # attribute on each attention module; stored in __dict__ so it is not a submodule


def merge(a_lse: torch.Tensor, a_out: torch.Tensor, b_lse: torch.Tensor,
          b_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax partials (log-normalizer, normalized output) exactly; -inf means 'empty'."""
    lse = torch.logaddexp(a_lse, b_lse)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.exp(a_lse - safe).unsqueeze(-1)
    wb = torch.exp(b_lse - safe).unsqueeze(-1)
    return lse, wa * a_out + wb * b_out


def softmax_partial(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, softmax(scores) @ values) with fully masked rows (all -inf) giving (-inf, 0) instead of NaN."""
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    weights = torch.exp(scores - safe.unsqueeze(-1))
    return lse, weights @ values


def _fused_cpu_partial(flat: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PyTorch's tiled CPU flash-attention kernel, which also returns the log-sum-exp; None where absent."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or flat.device.type != "cpu" or flat.dtype != torch.float32 or flat.requires_grad:
        return None
    out, lse = op(flat.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), scale=scaling)[:2]
    return lse[0], out[0]


def exact_partial(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                  chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of grouped queries over a shared KV set, streamed over the keys.

    q: [B, Hkv, G, T, D]; keys, values: [Hkv, S, D]. Returns lse [B, Hkv, G, T], out [B, Hkv, G, T, D].
    Memory stays O(B * H * T * chunk): the full score matrix is never built.
    """
    B, Hkv, G, T, D = q.shape
    flat = q.permute(1, 0, 2, 3, 4).reshape(Hkv, B * G * T, D)               # [Hkv, N, D]
    fused = _fused_cpu_partial(flat, keys, values, scaling) if keys.shape[1] > 0 else None
    if fused is not None:
        lse, out = fused
    else:
        lse = torch.full((Hkv, B * G * T), float("-inf"), dtype=q.dtype, device=q.device)
        out = torch.zeros((Hkv, B * G * T, values.shape[-1]), dtype=q.dtype, device=q.device)
        for start in range(0, keys.shape[1], chunk):
            k = keys[:, start:start + chunk]
            v = values[:, start:start + chunk]
            scores = torch.bmm(flat, k.transpose(1, 2)) * scaling              # [Hkv, N, c]
            lse, out = merge(lse, out, *softmax_partial(scores, v))
    lse = lse.reshape(Hkv, B, G, T).permute(1, 0, 2, 3)
    out = out.reshape(Hkv, B, G, T, -1).permute(1, 0, 2, 3, 4)
    return lse, out


class ContextAttention:
    """What a layer attends to besides the new tokens. Subclasses give partial(q, scaling)."""

    def partial(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, scaling: float, new_lse: torch.Tensor, new_out: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged attention of q over this context and the new tokens (whose partial is given); `positions`
        [B or 1, T] are the queries' positions (only a sliding window needs them)."""
        return merge(*self.partial(q, scaling), new_lse, new_out)


class ExactContext(ContextAttention):
    """Exact attention over real cached keys and values [Hkv, S, D] (the oracle and the baselines)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, chunk: int = 1024):
        self.keys, self.values, self.chunk = keys, values, chunk

    def partial(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        return exact_partial(q, self.keys, self.values, scaling, self.chunk)


class SlidingContext(ContextAttention):
    """A sliding-window layer's view of the context: the last `window` context tokens as exact KV, each visible to
    a query at position p while its own position is > p - window (transformers' sliding_window_overlay), so the
    window keeps sliding over the new tokens exactly as the model's does. keys, values: the layer's whole cache
    [Hkv, n, D] (only the last `window` tokens are kept)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, window: int):
        n = keys.shape[1]
        start = max(0, n - window)
        self.keys, self.values, self.window = keys[:, start:], values[:, start:], window
        self.key_positions = torch.arange(start, n, device=keys.device)                  # [W]

    def partial(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("a sliding-window context needs the queries' positions: use attend(..., positions=)")

    def partial_at(self, q: torch.Tensor, scaling: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, Hkv, G, T, D] at positions [B or 1, T] -> (lse [B, Hkv, G, T], out [B, Hkv, G, T, D])."""
        scores = torch.einsum("bhgtd,hsd->bhgts", q, self.keys) * scaling                # [B, Hkv, G, T, W]
        low = positions.to(q.device).view(positions.shape[0], 1, 1, -1, 1) - self.window
        scores = scores.masked_fill(~(self.key_positions > low), float("-inf"))
        return softmax_partial(scores, self.values.unsqueeze(0).unsqueeze(2))

    def attend(self, q: torch.Tensor, scaling: float, new_lse: torch.Tensor, new_out: torch.Tensor,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is None:
            raise ValueError("a sliding-window context needs the queries' positions (position_ids)")
        return merge(*self.partial_at(q, scaling, positions), new_lse, new_out)


def layer_windows(config: Any) -> list[int | None]:
    """Per layer, its sliding window (Gemma 3's sliding_attention layers) or None (attends to everything)."""
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    return [int(window) if kind == "sliding_attention" and window else None for kind in kinds]


def context_cache_for(model: Any) -> Any:
    """An empty transformers cache that keeps every token of every layer: DynamicCache(config=) gives a sliding
    layer a cache layer that drops all but its last window, which a context's KV (all n tokens) must not; the
    model's masks slide by themselves (transformers builds them from the layer types)."""
    from transformers import DynamicCache

    return DynamicCache() if any(layer_windows(model.config)) else DynamicCache(config=model.config)


def _bool_mask(mask: torch.Tensor | None, T: int, S: int, device: torch.device) -> torch.Tensor:
    """A [B or 1, 1, T, S] keep-mask; None means causal aligned to the end (queries are the last T keys)."""
    if mask is None:
        i = torch.arange(T, device=device).unsqueeze(1)
        j = torch.arange(S, device=device).unsqueeze(0)
        return (j <= i + (S - T)).view(1, 1, T, S)
    if mask.dtype == torch.bool:
        return mask[..., -S:]
    return mask[..., -S:] > torch.finfo(mask.dtype).min / 2


def nectar_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: exact causal attention over new tokens merged with the context's partial."""
    B, H, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    scaling = D ** -0.5 if scaling is None else scaling
    q = query.view(B, Hkv, H // Hkv, T, D)                                    # [B, Hkv, G, T, D]
    scores = torch.einsum("bhgtd,bhsd->bhgts", q, key) * scaling              # [B, Hkv, G, T, S]
    keep = _bool_mask(attention_mask, T, S, query.device).unsqueeze(2)        # [B|1, 1, 1, T, S]
    scores = scores.masked_fill(~keep, float("-inf"))
    lse, out = softmax_partial(scores, value.unsqueeze(2))
    context = module.__dict__.get(_SLOT)
    if context is not None:
        lse, out = context.attend(q, scaling, lse, out, positions=kwargs.get("position_ids"))
    return out.reshape(B, H, T, D).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make 'nectar' a known attention implementation (function and mask) in transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, nectar_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def attention_modules(model: Any) -> list[Any]:
    """The self-attention module of every decoder layer, in layer order."""
    return [layer.self_attn for layer in model.model.layers]


@contextmanager
def nectar_mode(model: Any, contexts: Sequence[ContextAttention | None]) -> Iterator[Any]:
    """Run the model with Nectar attention, each layer attending to contexts[layer] besides new tokens."""
    modules = attention_modules(model)
    if len(contexts) != len(modules):
        raise ValueError(f"got {len(contexts)} contexts for {len(modules)} layers")
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    for module, context in zip(modules, contexts):
        module.__dict__[_SLOT] = context
    try:
        yield model
    finally:
        for module in modules:
            module.__dict__.pop(_SLOT, None)
        model.set_attn_implementation(previous)


def cache_keyword(model: Any) -> str:
    """'cache' on transformers >= 5.24, 'past_key_values' before (the H200 host runs 5.17)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any,
            attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
    """One forward pass over new tokens at explicit positions, updating cache; returns logits [B, T', V]."""
    device = model.device
    kwargs = {cache_keyword(model): cache, "position_ids": position_ids.to(device), "use_cache": True,
              "logits_to_keep": logits_to_keep}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(device)
    return model(input_ids=input_ids.to(device), **kwargs).logits
