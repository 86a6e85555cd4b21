"""nectar_export/samples.py: prompt files and split dealing, the small pieces behind the text samples."""

from __future__ import annotations

import random

import pytest

from nectar_export.errors import NectarError
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
