"""nectar_export/batch_generate.py: greedy, top-k, top-p and temperature choice of the next token, seeded."""

from __future__ import annotations

import torch

from nectar_export.batch_generate import Sampling, pick_next


def test_sampling_modes():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    assert pick_next(logits, Sampling(), g).tolist() == [1, 0]
    assert pick_next(logits, Sampling(temperature=1.0, top_k=1), g).tolist() == [1, 0]
    assert pick_next(logits, Sampling(temperature=1.0, top_p=0.01), g).tolist() == [1, 0]
    draws = lambda seed: pick_next(logits.repeat(50, 1), Sampling(temperature=2.0), torch.Generator().manual_seed(seed))
    assert torch.equal(draws(1), draws(1)) and len(set(draws(1).tolist())) > 2
    top2 = pick_next(logits.repeat(200, 1), Sampling(temperature=1.0, top_k=2), g)
    assert set(top2[0::2].tolist()) <= {1, 3}
