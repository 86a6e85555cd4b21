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
