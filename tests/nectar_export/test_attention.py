"""Nectar attention with an oracle context (the true cache) reproduces full attention exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from nectar_export.attention import ExactContext, exact_partial, forward, merge, nectar_mode, softmax_partial
from nectar_export.evaluate import exact_fn
from nectar_export.heads import HeadsContext
from nectar_export.models import SUPPORTED_ARCHITECTURES
from nectar_export.prefill import prefill
from tests.helpers import TINY_CONFIGS, tiny_model


def test_every_supported_architecture_has_a_tiny_model():
    assert sorted(TINY_CONFIGS) == sorted(SUPPORTED_ARCHITECTURES)


def test_merge_of_split_partials_equals_whole():
    torch.manual_seed(0)
    scores, values = torch.randn(3, 5, 40), torch.randn(3, 40, 8)
    whole = softmax_partial(scores, values)
    merged = merge(*softmax_partial(scores[..., :13], values[:, :13]), *softmax_partial(scores[..., 13:], values[:, 13:]))
    torch.testing.assert_close(merged[0], whole[0])
    torch.testing.assert_close(merged[1], whole[1])


def test_empty_partial_is_neutral_and_never_nan():
    lse, out = softmax_partial(torch.full((2, 3, 4), float("-inf")), torch.randn(2, 4, 5))
    assert torch.isneginf(lse).all() and (out == 0).all()
    other = (torch.randn(2, 3), torch.randn(2, 3, 5))
    merged = merge(lse, out, *other)
    torch.testing.assert_close(merged[1], other[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])   # fused CPU kernel, streamed fallback
def test_exact_partial_matches_dense(dtype):
    torch.manual_seed(1)
    q, k, v = (torch.randn(*s, dtype=dtype) for s in ((2, 3, 4, 5, 16), (3, 100, 16), (3, 100, 16)))
    lse, out = exact_partial(q, k, v, 0.25, chunk=7)
    scores = torch.einsum("bhgtd,hsd->bhgts", q, k) * 0.25
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, torch.einsum("bhgts,hsd->bhgtd", torch.softmax(scores, -1), v))


def _reference(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("n,t", [(5, 3), (37, 9), (130, 17)])
def test_oracle_matches_full_attention_prefill_and_decode(arch, n, t):
    """Context through an exact oracle at positions n.. == the stock model on the whole sequence."""
    model = tiny_model(arch)
    torch.manual_seed(n)
    ids = torch.randint(0, 256, (2, n + t))
    ids[1, :n] = ids[0, :n]                                                 # one shared context, two continuations
    ref = _reference(model, ids)[:, n:]
    cache = prefill(model, ids[0, :n].tolist(), chunk=16, progress=False)
    with torch.no_grad(), nectar_mode(model, cache.exact()):
        past = DynamicCache(config=model.config)
        split = max(1, t // 2)
        pieces = [forward(model, ids[:, n:n + split], n + torch.arange(split).expand(2, -1), past)]
        for i in range(split, t):                                           # one-token decode steps
            pieces.append(forward(model, ids[:, n + i:n + i + 1], torch.full((2, 1), n + i), past))
    torch.testing.assert_close(torch.cat(pieces, 1), ref, atol=1e-5, rtol=0)


def test_oracle_heads_with_sinks_match_full_attention(arch):
    """HeadsContext plumbing (GQA grouping, sinks merge) with exact functions in place of the networks."""
    model = tiny_model(arch, seed=3)
    n, t, sinks = 48, 11, 4
    ids = torch.randint(0, 256, (1, n + t))
    ref = _reference(model, ids)[:, n:]
    cache = prefill(model, ids[0, :n].tolist(), progress=False)
    heads = cache.heads()                     # a hybrid model's global layers (sliding ones keep their window)
    exact = [cache.exact(0, sinks)[layer] for layer in cache.head_layers]
    oracles = cache.localized([HeadsContext(exact_fn(k[:, sinks:], v[:, sinks:]), s)
                               for k, v, s in zip(heads.keys, heads.values, exact)])
    with torch.no_grad(), nectar_mode(model, oracles):
        out = forward(model, ids[:, n:], n + torch.arange(t)[None], DynamicCache(config=model.config))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_sliding_layers_see_only_their_window():
    """Gemma 3 with a context longer than its window (48 > 16): the sliding layers' context is their last window,
    sliding over the new tokens; giving them the whole context instead changes the logits, as does dropping the
    global layer's context."""
    from tests.helpers import GEMMA_WINDOW

    model = tiny_model("gemma3_text", seed=4)
    n, t = 48, 2 * GEMMA_WINDOW
    ids = torch.randint(0, 256, (1, n + t), generator=torch.Generator().manual_seed(4))
    ref = _reference(model, ids)[:, n:]
    cache = prefill(model, ids[0, :n].tolist(), chunk=16, progress=False)
    assert cache.head_layers == [1] and cache.windows == (GEMMA_WINDOW, None, GEMMA_WINDOW, GEMMA_WINDOW)
    runs = {"oracle": cache.exact(), "whole": [ExactContext(k, v) for k, v in zip(cache.keys, cache.values)],
            "no_global": cache.localized([None])}
    got = {}
    for name, contexts in runs.items():
        with torch.no_grad(), nectar_mode(model, contexts):
            got[name] = forward(model, ids[:, n:], n + torch.arange(t)[None], DynamicCache(config=model.config))
    torch.testing.assert_close(got["oracle"], ref, atol=1e-5, rtol=0)
    assert (got["whole"] - ref).abs().max() > 1e-2
    assert (got["no_global"] - ref).abs().max() > 1e-2


def test_no_context_differs_from_full():
    """The plumbing is not trivially ignoring the context: dropping it changes the logits."""
    model = tiny_model("llama")
    n, t = 40, 6
    ids = torch.randint(0, 256, (1, n + t))
    ref = _reference(model, ids)[:, n:]
    with torch.no_grad(), nectar_mode(model, [None, None]):
        out = forward(model, ids[:, n:], n + torch.arange(t)[None], DynamicCache(config=model.config))
    assert (out - ref).abs().max() > 1e-2


def test_mode_is_restored_after_use():
    model = tiny_model("qwen3")
    before = model.config._attn_implementation
    with nectar_mode(model, [None, None]):
        assert model.config._attn_implementation == "nectar"
    assert model.config._attn_implementation == before
    assert all("_nectar_context" not in layer.self_attn.__dict__ for layer in model.model.layers)
