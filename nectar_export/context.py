"""The fixed document: loading it, placing it in the chat template, and tokenizing a deterministic prefix."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nectar_export.errors import NectarError

DEFAULT_CONTEXT = "default"
DATA = Path(__file__).parent / "data"
# Documents shipped in the package, by name: the whole-document default is the first three topics of the
# Python manual (assert, assignment, async: 4,021 SmolLM2 tokens), cut from Python 3.11.7's pydoc_data so
# the text and its hand-written QA set do not move with the interpreter's patch version.
# The second, of another kind, is legal text: the licence notices at the head of Pillow 13.0.0's LICENSE file, from
# its first line to the end of the FreeType licence (4,155 SmolLM2 tokens; data/README.md says why it is a fair case).
NAMED_CONTEXTS = {"manual-4k": ("python-manual-4k.txt", "the Python reference manual's first three topics "
                                "(assert, assignment, async), from Python 3.11.7"),
                  "license-4k": ("pillow-license-4k.txt", "the licence notices at the head of Pillow 13.0.0's "
                                 "LICENSE file (PIL, AOM, Brotli, bzip2, dav1d, FreeType 2 and the FreeType licence)")}
_DOC = "\u2063NECTAR-DOCUMENT\u2063"
_QUESTION = "\u2063NECTAR-QUESTION\u2063"
_PLAIN_TEMPLATE = "\n\nQuestion: {question}\nAnswer:"


@dataclass(frozen=True)
class Document:
    """Raw document text and a short human description of where it came from."""

    text: str
    source: str


@dataclass(frozen=True)
class Context:
    """The tokens the Nectar heads replace: chat prefix + document prefix, and how to append a question."""

    ids: tuple[int, ...]          # the n context tokens, prefix first
    prefix_text: str              # chat-template text before the document
    question_template: str        # text after the document, with '{question}' where the user's text goes
    document_tokens: int          # how many of the n tokens are document
    document_total_tokens: int    # tokens in the whole document (the rest is unseen continuation text)
    source: str
    sha256: str

    @property
    def n(self) -> int:
        return len(self.ids)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise NectarError(f"context file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_document(spec: str = DEFAULT_CONTEXT) -> Document:
    """Read 'default' (Python's reference manual), a named shipped document (NAMED_CONTEXTS), a UTF-8 file,
    or a directory's files in sorted order."""
    if spec in NAMED_CONTEXTS:
        name, source = NAMED_CONTEXTS[spec]
        return Document(text=_read_text(DATA / name), source=f"{spec}: {source}")
    if spec == DEFAULT_CONTEXT:
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key].strip() for key in sorted(topics))
        return Document(text=text, source="pydoc_data.topics (Python reference manual)")
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))
        if not files:
            raise NectarError(f"context directory {path} holds no files")
        text = "\n\n".join(_read_text(p).strip() for p in files)
    elif path.is_file():
        text = _read_text(path)
    else:
        names = ", ".join(repr(n) for n in (DEFAULT_CONTEXT, *NAMED_CONTEXTS))
        raise NectarError(f"context not found: {spec} (expected {names}, a UTF-8 text file or a directory)")
    if not text.strip():
        raise NectarError(f"context {spec} is empty")
    return Document(text=text, source=str(path))


def split_chat_template(tokenizer: Any) -> tuple[str, str]:
    """Text before the document and the question template after it, read off the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return "", _PLAIN_TEMPLATE
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{_DOC}\n\n{_QUESTION}"}], tokenize=False, add_generation_prompt=True
    )
    prefix, rest = rendered.split(_DOC)
    between, suffix = rest.split(_QUESTION)
    return prefix, between.replace("{", "{{").replace("}", "}}") + "{question}" + suffix.replace("{", "{{").replace("}", "}}")


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text with no special tokens added (the chat template already carries them)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_context(tokenizer: Any, document: Document, context_tokens: int | None,
                  max_positions: int, reserve: int) -> tuple[Context, list[int]]:
    """Tokenize the chat prefix and a prefix of the document; returns the context and the document's ids."""
    prefix_text, question_template = split_chat_template(tokenizer)
    prefix_ids = encode(tokenizer, prefix_text)
    doc_ids = encode(tokenizer, document.text)
    want = len(prefix_ids) + len(doc_ids) if context_tokens is None else context_tokens
    if want <= len(prefix_ids):
        raise NectarError(f"--context-tokens {want} leaves no room for the document after "
                          f"the {len(prefix_ids)}-token chat prefix")
    keep = min(len(doc_ids), want - len(prefix_ids))
    ids = tuple(prefix_ids + doc_ids[:keep])
    if len(ids) + reserve > max_positions:
        raise NectarError(
            f"context of {len(ids)} tokens plus {reserve} new tokens exceeds the model's {max_positions} "
            f"positions; pass a smaller --context-tokens (at most {max_positions - reserve})"
        )
    digest = hashlib.sha256(" ".join(map(str, ids)).encode()).hexdigest()
    context = Context(ids=ids, prefix_text=prefix_text, question_template=question_template,
                      document_tokens=keep, document_total_tokens=len(doc_ids), source=document.source,
                      sha256=digest)
    return context, doc_ids
