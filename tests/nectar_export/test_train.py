"""nectar_export/train.py: the training loop; batched pairs of both families learn the context's attention."""

from __future__ import annotations

from nectar_export.fit import make_pairs, model_shape
from nectar_export.train import TrainSettings, fit_pairs, layer_errors
from tests.helpers import collected_layers


def test_fitting_reduces_heldout_error():
    model, cache, train, val = collected_layers()
    scaling = float(model.model.layers[0].self_attn.scaling)
    shape = model_shape(model)
    for family in ("mlp", "quadrature"):
        pairs = make_pairs(family, [1200] * len(train), shape, cache, [cache.exact_index(2, 0)] * len(train), train, seed=0)
        before = [layer_errors(p, v, scaling)["approx_error"] for p, v in zip(pairs, val)]
        fit_pairs(pairs, train, val, scaling, TrainSettings(epochs=15, batch_size=256, lr=3e-3), desc=family)
        after = [layer_errors(p, v, scaling)["approx_error"] for p, v in zip(pairs, val)]
        assert all(a < 0.8 * b for a, b in zip(after, before)), (family, before, after)
