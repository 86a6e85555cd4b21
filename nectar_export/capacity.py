"""Capacity allocation: split a total parameter budget across layers by measured difficulty."""

from __future__ import annotations

import torch

from nectar_export.queries import LayerData


@torch.no_grad()
def linear_probe_error(train: LayerData, val: LayerData, ridge: float = 1e-2) -> float:
    """Relative merged-output error of the best affine (score, target) predictor: a cheap difficulty measure."""
    def features(d: LayerData) -> torch.Tensor:
        return torch.cat([d.q, torch.ones_like(d.q[..., :1])], dim=-1)          # [H, N, D+1]

    x = features(train)
    y = torch.cat([train.ctx_lse.unsqueeze(-1), train.ctx_out], dim=-1)         # [H, N, D+1]
    gram = x.transpose(1, 2) @ x + ridge * x.shape[1] * torch.eye(x.shape[-1], device=x.device)
    w = torch.linalg.solve(gram, x.transpose(1, 2) @ y)                         # [H, D+1, D+1]
    pred = features(val) @ w
    share = torch.sigmoid(pred[..., 0] - val.rest_lse).unsqueeze(-1)
    merged = val.rest_out + share * (pred[..., 1:] - val.rest_out)
    _, truth = val.merged()
    return float(((merged - truth) ** 2).sum() / (truth ** 2).sum())


def allocate(difficulty: list[float], per_layer: int, power: float = 0.5, floor: float = 0.25,
             cap: float = 4.0) -> list[int]:
    """Per-layer parameter counts averaging per_layer, proportional to difficulty**power within [floor, cap]x."""
    weights = torch.tensor(difficulty, dtype=torch.float64).clamp(min=1e-12) ** power
    share = weights / weights.mean()
    for _ in range(50):                                  # clip, then renormalize the unclipped layers
        clipped = share.clamp(floor, cap)
        free = (clipped > floor) & (clipped < cap)
        if not bool(free.any()):
            break
        excess = len(share) - clipped.sum()
        share = clipped.clone()
        share[free] += excess * clipped[free] / clipped[free].sum()
        if abs(float(share.clamp(floor, cap).mean()) - 1.0) < 1e-9:
            break
    return [int(per_layer * float(s)) for s in share.clamp(floor, cap)]
