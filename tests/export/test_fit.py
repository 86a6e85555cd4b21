"""Collection, heads and fitting on a tiny model: batched pairs learn the context's attention."""

from __future__ import annotations

import torch

from conftest import tiny_model
from nectar_export.capacity import allocate, linear_probe_error
from nectar_export.queries import collect, targets
from nectar_export.train import TrainSettings, fit_pairs, layer_errors
from nectar_export.heads import MLPPair, QuadraturePair, build_pair, pair_params
from nectar_export.fit import make_pairs, model_shape
from nectar_export.prefill import prefill
from nectar_export.samples import Sample


def _data(arch: str = "llama", n: int = 96, sinks: int = 2):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    cache = prefill(model, torch.randint(0, 256, (n,), generator=g).tolist(), progress=False)
    make = lambda count: [Sample("continuation", tuple(torch.randint(0, 256, (24,), generator=g).tolist()))
                          for _ in range(count)]
    scaling = float(model.model.layers[0].self_attn.scaling)
    exact = cache.exact_index(sinks, 0)
    train = targets(collect(model, cache, make(24), batch_size=8, desc="train"), cache, exact, scaling)
    val = targets(collect(model, cache, make(6), batch_size=8, desc="val"), cache, exact, scaling)
    return model, cache, train, val


def test_collected_targets_reproduce_full_attention():
    """ctx and rest partials merge into the same output a full-attention run gives (checked via the merge)."""
    model, cache, train, _ = _data()
    d = train[0]
    heads, groups = model.config.num_key_value_heads, model.config.num_attention_heads // model.config.num_key_value_heads
    assert d.q.shape == (heads, 24 * 24 * groups, model.config.hidden_size // model.config.num_attention_heads)
    lse, out = d.merged()
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()
    assert (torch.sigmoid(d.ctx_lse - d.rest_lse) > 0.05).float().mean() > 0.5     # the context matters


def test_fitting_reduces_heldout_error():
    model, cache, train, val = _data()
    scaling = float(model.model.layers[0].self_attn.scaling)
    shape = model_shape(model)
    for family in ("mlp", "quadrature"):
        pairs = make_pairs(family, [1200] * len(train), shape, cache, cache.exact_index(2, 0), train, seed=0)
        before = [layer_errors(p, v, scaling)["approx_error"] for p, v in zip(pairs, val)]
        fit_pairs(pairs, train, val, scaling, TrainSettings(epochs=15, batch_size=256, lr=3e-3), desc=family)
        after = [layer_errors(p, v, scaling)["approx_error"] for p, v in zip(pairs, val)]
        assert all(a < 0.8 * b for a, b in zip(after, before)), (family, before, after)


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


def test_allocation_keeps_the_budget_and_follows_difficulty():
    budgets = allocate([0.01, 0.04, 0.16, 0.64, 0.0001], 1000)
    assert abs(sum(budgets) - 5000) <= 5
    assert budgets == sorted(budgets[:4]) + [budgets[4]]
    assert min(budgets) >= 250 and max(budgets) <= 4000
    assert allocate([0.3] * 4, 1000) == [1000] * 4


def test_linear_probe_error_is_a_relative_error():
    _, _, train, val = _data()
    errors = [linear_probe_error(t, v) for t, v in zip(train, val)]
    assert all(0.0 < e < 1.0 for e in errors)


def test_head_params_fix_the_head_size_at_every_n():
    from nectar_export.config import FitConfig
    from nectar_export.fit import layer_budget

    fixed, fraction = FitConfig(head_params=32768), FitConfig(budget=0.125)
    assert fixed.head_budget(512, 64) == fixed.head_budget(8000, 64) == 32768
    assert fixed.window_tokens(512, 64) == fixed.window_tokens(8000, 64) == 32       # P / (2 d) / 8
    assert layer_budget(fixed, 512, 64) == layer_budget(fixed, 8000, 64) == 32768 - 2 * (4 + 32) * 64
    assert fraction.head_budget(2048, 64) == 32768 and fraction.head_budget(8000, 64) == 128000
    assert fraction.window_tokens(8000, 64) == 125                                   # grows with n
