"""nectar_export/heads.py: pairs within their parameter budget, KV-heads batched but independent."""

from __future__ import annotations

import torch

from nectar_export.heads import MLPPair, QuadraturePair, build_pair, pair_params


def test_pairs_respect_their_parameter_budget():
    for budget in (500, 4000, 30000):
        mlp = build_pair("mlp", 3, 64, budget)
        quad = build_pair("quadrature", 3, 64, budget)
        assert isinstance(mlp, MLPPair) and isinstance(quad, QuadraturePair)
        assert pair_params(quad) <= budget and pair_params(mlp) <= max(budget, MLPPair.params_for(64, 8, 8))
        assert pair_params(quad) > budget - 129


def test_batched_heads_are_independent():
    """Changing one KV-head's weights leaves the other heads' outputs untouched (one bmm, separate pairs)."""
    pair = MLPPair(3, 16, 24, 16)
    q = torch.randn(3, 10, 16)
    before = pair(q, 0.25)
    with torch.no_grad():
        pair.target[0][1].add_(1.0)
    after = pair(q, 0.25)
    torch.testing.assert_close(after[1][0], before[1][0])
    torch.testing.assert_close(after[1][2], before[1][2])
    assert (after[1][1] - before[1][1]).abs().max() > 1e-3
