"""Prompt files, split dealing and sampling: the small pieces behind the query sources."""

from __future__ import annotations

import random

import pytest
import torch

from nectar_export.errors import NectarError
from nectar_export.batch_generate import Sampling, pick_next
from nectar_export.samples import _deal, read_prompts


def test_prompt_file_lines_and_jsonl(tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("What is a decorator?\n\n  How do I open a file?  \n")
    assert read_prompts(str(plain)) == ["What is a decorator?", "How do I open a file?"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "first"}\n{"text": "second"}\n')
    assert read_prompts(str(jsonl)) == ["first", "second"]


@pytest.mark.parametrize("content,message", [(None, "not found"), ("", "holds no prompts"),
                                             ('{"question": "x"}\n', "'prompt' or 'text'")])
def test_bad_prompt_files(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(NectarError, match=message):
        read_prompts(str(path))


def test_splits_are_disjoint_and_never_empty():
    for count in (3, 7, 31, 200):
        parts = _deal(list(range(count)), (70, 10, 20), random.Random(0))
        seen = [x for split in parts.values() for x in split]
        assert len(seen) == len(set(seen)) and all(parts[s] for s in ("train", "val", "test"))
    capped = _deal(list(range(1000)), (5, 2, 3), random.Random(0))
    assert [len(capped[s]) for s in ("train", "val", "test")] == [5, 2, 3]


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
