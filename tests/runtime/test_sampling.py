"""Greedy, temperature, top-k and top-p choice of the next token: support, frequencies, seeds."""

from __future__ import annotations

import numpy as np

from nectar_runtime.sampling import Sampling, pick_next, probabilities

LOGITS = np.log(np.array([[0.4, 0.3, 0.15, 0.1, 0.05]]))          # [1, 5], probabilities at temperature 1


def draws(sampling: Sampling, count: int = 4000) -> np.ndarray:
    rng = sampling.rng()
    return np.array([int(pick_next(LOGITS, sampling, rng)[0]) for _ in range(count)])


def test_greedy_is_the_argmax_per_row():
    logits = np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]], dtype=np.float32)
    assert pick_next(logits, Sampling(), np.random.default_rng(0)).tolist() == [1, 0]


def test_temperature_one_matches_the_softmax():
    freq = np.bincount(draws(Sampling(temperature=1.0)), minlength=5) / 4000
    assert np.abs(freq - np.exp(LOGITS[0])).max() < 0.03


def test_top_k_keeps_only_the_k_likeliest():
    picked = set(draws(Sampling(temperature=1.0, top_k=2)).tolist())
    assert picked == {0, 1}
    np.testing.assert_allclose(probabilities(LOGITS, Sampling(temperature=1.0, top_k=2))[0],
                               [0.4 / 0.7, 0.3 / 0.7, 0, 0, 0], atol=1e-12)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.4 + 0.3 = 0.7 < 0.75, so the token that crosses 0.75 (index 2) stays; 3 and 4 go
    assert set(draws(Sampling(temperature=1.0, top_p=0.75)).tolist()) == {0, 1, 2}
    assert set(draws(Sampling(temperature=1.0, top_p=0.3)).tolist()) == {0}


def test_low_temperature_sharpens():
    assert (draws(Sampling(temperature=0.05)) == 0).mean() > 0.99


def test_same_seed_same_draws_other_seed_other_draws():
    a, b = draws(Sampling(temperature=1.0, seed=7), 200), draws(Sampling(temperature=1.0, seed=7), 200)
    c = draws(Sampling(temperature=1.0, seed=8), 200)
    assert (a == b).all() and not (a == c).all()
