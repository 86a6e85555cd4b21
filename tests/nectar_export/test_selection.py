"""The exact-token baselines' selections: attention mass, top tokens, SnapKV, per-head targets."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from nectar_export.attention import exact_partial
from nectar_export.prefill import ContextCache, complement, prefill, take
from nectar_export.queries import Queries, collect, targets
from nectar_export.samples import Sample
from nectar_export.selection import attention_mass, snapkv_scores, top_tokens
from tests.helpers import tiny_model


def _planted(n: int = 10, dim: int = 4) -> tuple[ContextCache, Queries]:
    """Two KV-heads whose queries point at one planted key each: token 3 in head 0, token 7 in head 1."""
    keys = torch.zeros(2, n, dim)
    keys[0, 3, 0] = keys[1, 7, 1] = 1.0
    keys[0, 5, 0] = keys[1, 2, 1] = 0.5                  # second best, smaller dot product
    values = torch.randn(2, n, dim, generator=torch.Generator().manual_seed(0))
    q = torch.zeros(2, 6, dim)
    q[0, :, 0] = q[1, :, 1] = 8.0
    new_lse = torch.full((2, 6), 1.0)
    return ContextCache([keys], [values]), Queries(q, new_lse, torch.zeros(2, 6, dim))


def test_attention_mass_ranks_the_planted_tokens_first_in_each_head():
    cache, queries = _planted()
    mass = attention_mass([queries], cache, scaling=1.0)[0]
    assert top_tokens(mass, 1).tolist() == [[3], [7]]
    assert top_tokens(mass, 2).tolist() == [[3, 5], [2, 7]]          # position order, not score order


def test_attention_mass_is_the_softmax_weight_with_the_new_tokens_in_it():
    cache, queries = _planted()
    scores = torch.bmm(queries.q, cache.keys[0].transpose(1, 2))                  # [H, N, n]
    full = torch.cat([scores, queries.new_lse.unsqueeze(-1)], dim=-1)            # the new tokens' lse as one column
    want = torch.softmax(full, -1)[..., :-1].mean(1)
    got = attention_mass([queries], cache, scaling=1.0, scores_budget=7)[0]      # a chunk of 1 query at a time
    torch.testing.assert_close(got, want)


def test_top_tokens_breaks_ties_by_position_and_caps_at_n():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    assert top_tokens(scores, 2).tolist() == [[1, 2]]
    assert top_tokens(scores, 9).tolist() == [[0, 1, 2, 3, 4]]


def test_per_head_targets_split_each_head_at_its_own_tokens():
    cache, queries = _planted()
    index = torch.tensor([[3, 5], [2, 7]])
    d = targets([queries], cache, [index], scaling=1.0)[0]
    for h, kept in enumerate(index.tolist()):
        rest = [j for j in range(10) if j not in kept]
        q = queries.q[h:h + 1].unsqueeze(0).unsqueeze(2)
        lse, out = exact_partial(q, cache.keys[0][h:h + 1, rest], cache.values[0][h:h + 1, rest], 1.0)
        torch.testing.assert_close(d.ctx_lse[h], lse[0, 0, 0])
        torch.testing.assert_close(d.ctx_out[h], out[0, 0, 0])
    assert complement(index, 10, 2).tolist() == [[0, 1, 2, 4, 6, 7, 8, 9], [0, 1, 3, 4, 5, 6, 8, 9]]
    torch.testing.assert_close(take(cache.keys[0], index)[1, 1], cache.keys[0][1, 7])


def test_shared_and_per_head_exact_index_give_the_same_targets():
    cache, queries = _planted()
    shared = targets([queries], cache, torch.tensor([0, 9]), scaling=1.0)[0]
    per_head = targets([queries], cache, [torch.tensor([[0, 9], [0, 9]])], scaling=1.0)[0]
    for a, b in zip((shared.ctx_lse, shared.rest_out), (per_head.ctx_lse, per_head.rest_out)):
        torch.testing.assert_close(a, b)


def test_snapkv_scores_are_the_observation_windows_eager_attention():
    """SnapKV's vote against transformers' own eager attention probabilities of the last tokens."""
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    window, pool = 8, 3
    cache = prefill(model, ids, progress=False)
    got = snapkv_scores(model, cache, ids, window=window, pool=pool)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(torch.tensor([ids]), output_attentions=True).attentions       # per layer [1, H, n, n]
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    for layer, p in enumerate(probs):
        vote = p[0, :, -window:, :-window].reshape(kv, heads // kv, window, -1).sum((1, 2)) / (window * heads // kv)
        want = F.max_pool1d(vote.unsqueeze(1), pool, stride=1, padding=pool // 2).squeeze(1)
        torch.testing.assert_close(got[layer][:, :-window], want, atol=1e-5, rtol=1e-4)
        assert torch.isinf(got[layer][:, -window:]).all()
        assert top_tokens(got[layer], window + 4)[:, -window:].tolist() == [list(range(40, 48))] * kv
