"""Context loading and templating: deterministic prefixes, recorded template, clear errors."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from nectar_export.context import build_context, load_document, split_chat_template
from nectar_export.errors import NectarError
from nectar_export.models import resolve_checkpoint


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_checkpoint("default"))


def test_default_document_is_the_python_manual_in_topic_order():
    doc = load_document()
    assert doc.text.startswith('The "assert" statement') and len(doc.text) > 400_000


@pytest.mark.parametrize("name, tokens, start", [("manual-4k", 4021, 'The "assert" statement'),
                                                ("license-4k", 4155, "The Python Imaging Library (PIL) is")])
def test_named_documents_load_whole_with_their_stated_token_counts(tokenizer, name, tokens, start):
    doc = load_document(name)
    assert doc.text.startswith(start) and doc.source.startswith(f"{name}: ")
    assert len(tokenizer(doc.text, add_special_tokens=False)["input_ids"]) == tokens   # data/README.md's counts
    context, _ = build_context(tokenizer, doc, None, 8192, 512)
    assert context.document_tokens == context.document_total_tokens == tokens          # consumed whole


def test_directory_context_reads_files_in_sorted_order(tmp_path):
    (tmp_path / "b.md").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / ".hidden").write_text("never")
    assert load_document(str(tmp_path)).text == "first\n\nsecond"


def test_context_is_an_exact_deterministic_prefix(tokenizer):
    doc = load_document()
    ctx, doc_ids = build_context(tokenizer, doc, 700, 8192, 512)
    again, _ = build_context(tokenizer, doc, 700, 8192, 512)
    assert ctx.n == 700 and ctx.ids == again.ids and ctx.sha256 == again.sha256
    prefix_len = 700 - ctx.document_tokens
    assert list(ctx.ids[prefix_len:]) == doc_ids[:ctx.document_tokens]
    longer, _ = build_context(tokenizer, doc, 900, 8192, 512)
    assert longer.ids[:700] == ctx.ids and longer.sha256 != ctx.sha256


def test_template_round_trips_the_chat_format(tokenizer):
    prefix, template = split_chat_template(tokenizer)
    full = tokenizer.apply_chat_template([{"role": "user", "content": "DOC\n\nWhat is {x}?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert prefix + "DOC" + template.format(question="What is {x}?") == full


def test_context_that_leaves_no_room_is_refused(tokenizer):
    with pytest.raises(NectarError, match="exceeds the model's 8192 positions"):
        build_context(tokenizer, load_document(), 8000, 8192, 512)
