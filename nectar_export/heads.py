"""Nectar head pairs: a target network T(q) ~ out(q) and a score network S(q) ~ lse(q) for every
KV-head of one layer, held as batched weights so each layer runs as a few bmm calls."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from nectar_export.attention import ContextAttention, ExactContext, merge, softmax_partial


def _param(*shape: int, scale: float = 0.0) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * scale if scale else torch.zeros(*shape))


class MLPPair(nn.Module):
    """Two-hidden-layer SiLU MLPs with a linear skip, per KV-head: q [H, N, D] -> (S [H, N], T [H, N, D])."""

    family = "mlp"

    def __init__(self, heads: int, dim: int, target_hidden: int, score_hidden: int):
        super().__init__()
        self.heads, self.dim, self.target_hidden, self.score_hidden = heads, dim, target_hidden, score_hidden
        self.register_buffer("q_mean", torch.zeros(heads, 1, dim))
        self.register_buffer("q_scale", torch.ones(heads, 1, dim))
        self.target = nn.ParameterList(self._mlp(dim, target_hidden, dim))
        self.score = nn.ParameterList(self._mlp(dim, score_hidden, 1))

    def _mlp(self, d_in: int, hidden: int, d_out: int) -> list[nn.Parameter]:
        h = self.heads
        return [_param(h, d_in, hidden, scale=d_in ** -0.5), _param(h, 1, hidden),
                _param(h, hidden, hidden, scale=hidden ** -0.5), _param(h, 1, hidden),
                _param(h, hidden, d_out, scale=0.1 * hidden ** -0.5), _param(h, 1, d_out),
                _param(h, d_in, d_out)]

    @staticmethod
    def params_for(dim: int, target_hidden: int, score_hidden: int) -> int:
        """Parameter count of one KV-head's pair (normalization buffers included)."""
        def mlp(h: int, d_out: int) -> int:
            return dim * h + h + h * h + h + h * d_out + d_out + dim * d_out
        return mlp(target_hidden, dim) + mlp(score_hidden, 1) + 2 * dim

    @staticmethod
    def _run(x: torch.Tensor, w: nn.ParameterList) -> torch.Tensor:
        w1, b1, w2, b2, w3, b3, skip = w
        h = F.silu(torch.baddbmm(b1, x, w1))
        h = F.silu(torch.baddbmm(b2, h, w2))
        return torch.baddbmm(b3, h, w3) + torch.bmm(x, skip)

    def forward(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        x = (q - self.q_mean) * self.q_scale
        return self._run(x, self.score).squeeze(-1), self._run(x, self.target)

    @torch.no_grad()
    def joint_weights(self) -> tuple[torch.Tensor, ...]:
        """Both networks as one (w1, b1, w2, b2, w3, b3) computing [S, T] = the pair's output for the raw q.

        Layer 1 reads q directly: x = (q - mean) * scale is folded in (x @ W = q @ (scale^T * W) - (mean * scale) @ W),
        and its columns are [score hidden, target hidden, score skip, target skip]. Layers 2 and 3 are
        block-diagonal over [score, target]. The result is silu(silu(q w1 + b1)[:hidden] w2 + b2) w3 + b3
        plus the skip columns of the first product: [lse, out] per query."""
        s1, sb1, s2, sb2, s3, sb3, s_skip = self.score
        t1, tb1, t2, tb2, t3, tb3, t_skip = self.target
        heads, dim, hs, ht = self.heads, self.dim, self.score_hidden, self.target_hidden
        first = torch.cat([s1, t1, s_skip, t_skip], dim=-1)                       # [H, D, hs + ht + 1 + D]
        bias = torch.cat([sb1, tb1, sb1.new_zeros(heads, 1, 1 + dim)], dim=-1)
        w1 = self.q_scale.transpose(1, 2) * first
        b1 = bias - (self.q_mean * self.q_scale) @ first
        w2 = s2.new_zeros(heads, hs + ht, hs + ht)
        w2[:, :hs, :hs], w2[:, hs:, hs:] = s2, t2
        w3 = s3.new_zeros(heads, hs + ht, 1 + dim)
        w3[:, :hs, :1], w3[:, hs:, 1:] = s3, t3
        return w1, b1, w2, torch.cat([sb2, tb2], -1), w3, torch.cat([sb3, tb3], -1)

    @torch.no_grad()
    def init_from(self, q: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
        """Standardize inputs with the training queries and start the outputs at the targets' means."""
        self.q_mean.copy_(q.mean(1, keepdim=True))
        self.q_scale.copy_(1.0 / (q.std(1, keepdim=True) + 1e-4))
        self.score[5].copy_(lse.mean(1).view(-1, 1, 1))
        self.target[5].copy_(out.mean(1, keepdim=True))


class QuadraturePair(nn.Module):
    """M learned (key, value, bias) slots per KV-head: softmax attention over a tiny learned cache."""

    family = "quadrature"

    def __init__(self, heads: int, dim: int, slots: int):
        super().__init__()
        self.heads, self.dim, self.slots = heads, dim, slots
        self.keys = _param(heads, slots, dim, scale=1.0)
        self.values = _param(heads, slots, dim, scale=0.1)
        self.bias = _param(heads, 1, slots)

    @staticmethod
    def params_for(dim: int, slots: int) -> int:
        return slots * (2 * dim + 1)

    def forward(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.baddbmm(self.bias, q, self.keys.transpose(1, 2), alpha=scaling)   # [H, N, M]
        return softmax_partial(scores, self.values)

    @torch.no_grad()
    def init_from_cache(self, keys: torch.Tensor, values: torch.Tensor, generator: torch.Generator) -> None:
        """Start from M real context tokens, each slot's bias standing for the n/M tokens it replaces."""
        n = keys.shape[1]
        pick = torch.randperm(n, generator=generator)[: self.slots].sort().values
        self.keys.copy_(keys[:, pick])
        self.values.copy_(values[:, pick])
        self.bias.fill_(math.log(n / len(pick)))


Pair = MLPPair | QuadraturePair


def build_pair(family: str, heads: int, dim: int, params: int) -> Pair:
    """The largest pair of a family whose per-head parameter count stays within params."""
    if family == "quadrature":
        return QuadraturePair(heads, dim, max(1, params // (2 * dim + 1)))
    hidden = 8
    while MLPPair.params_for(dim, hidden + 8, _score_width(hidden + 8)) <= params:
        hidden += 8
    return MLPPair(heads, dim, hidden, _score_width(hidden))


def _score_width(target_hidden: int) -> int:
    """The score network gets about half the target's width (a scalar is easier to fit)."""
    return max(8, (target_hidden // 2) // 8 * 8)


def pair_params(pair: Pair) -> int:
    """Per-head parameter count of a pair as stored (weights and buffers)."""
    total = sum(p.numel() for p in pair.parameters()) + sum(b.numel() for b in pair.buffers())
    return total // pair.heads


class HeadsContext(ContextAttention):
    """A layer's fitted pair standing in for the modeled context, merged with the exact tokens (sinks, window)."""

    def __init__(self, pair: Pair, exact: ExactContext | None):
        self.pair, self.exact = pair, exact

    def partial(self, q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        B, Hkv, G, T, D = q.shape
        flat = q.permute(1, 0, 2, 3, 4).reshape(Hkv, B * G * T, D)
        lse, out = self.pair(flat, scaling)
        lse = lse.view(Hkv, B, G, T).permute(1, 0, 2, 3)
        out = out.view(Hkv, B, G, T, -1).permute(1, 0, 2, 3, 4)
        if self.exact is None:
            return lse, out
        return merge(*self.exact.partial(q, scaling), lse, out)
