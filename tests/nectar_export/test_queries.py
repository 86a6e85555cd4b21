"""nectar_export/queries.py: query collection and targets on a tiny model."""

from __future__ import annotations

import torch

from tests.helpers import collected_layers


def test_collected_targets_reproduce_full_attention():
    """ctx and rest partials merge into the same output a full-attention run gives (checked via the merge)."""
    model, cache, train, _ = collected_layers()
    d = train[0]
    heads, groups = model.config.num_key_value_heads, model.config.num_attention_heads // model.config.num_key_value_heads
    assert d.q.shape == (heads, 24 * 24 * groups, model.config.hidden_size // model.config.num_attention_heads)
    lse, out = d.merged()
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()
    assert (torch.sigmoid(d.ctx_lse - d.rest_lse) > 0.05).float().mean() > 0.5     # the context matters


def test_a_hybrid_model_gets_data_for_its_global_layers_only():
    """Gemma 3 (one global layer among three sliding ones): one layer of queries and targets, the global layer's;
    its context partial carries real mass (the whole 96-token context, not a 16-token window), and the capacity
    allocation splits the budget over that layer alone."""
    from nectar_export.capacity import allocate, linear_probe_error

    model, cache, train, val = collected_layers("gemma3_text")
    assert cache.head_layers == [1] and len(train) == len(val) == 1
    d = train[0]
    assert d.q.shape[0] == model.config.num_key_value_heads and d.ctx_lse.shape == d.rest_lse.shape
    assert (torch.sigmoid(d.ctx_lse - d.rest_lse) > 0.05).float().mean() > 0.5
    budgets = allocate([linear_probe_error(t, v) for t, v in zip(train, val)], 1000)
    assert budgets == [1000]
