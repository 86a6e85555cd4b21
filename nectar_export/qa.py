"""Document QA: hand-written questions about the context, and scoring a method's answers against them.

A QA file is JSONL, one question per line: `id`, `question`, `answer` (the short reference answer as a correct
reply would contain it), `split` ("tune" or "untouched"), and optionally `aliases` (other accepted spellings),
`evidence` (the document's sentence that states the answer) and `offset` (that sentence's character index in
the document). An answer is correct when the normalized reference (or an alias) occurs in the normalized
reply as a run of whole tokens; `qa_report` compares every method's correctness with the reference method's.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from nectar_export.errors import NectarError

DATA = Path(__file__).parent / "data"
# QA sets shipped in the package, by name (the name of the document they are about, see context.NAMED_CONTEXTS).
NAMED_QA = {"manual-4k": "python-manual-4k-qa.jsonl", "license-4k": "pillow-license-4k-qa.jsonl"}
SPLITS = ("tune", "untouched")
_REQUIRED = {"id": str, "question": str, "answer": str, "split": str}
_OPTIONAL = {"aliases": (list, "a list of strings"), "evidence": (str, "a string"), "offset": (int, "an integer")}

_QUOTES = "\"'`\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u00ab\u00bb\u2039\u203a"
_DASHES = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2212": "-"})
_EMPHASIS = re.compile(r"(?<![\w*])(\*{1,3})(?=[\w(])([^*\n]+?)(?<=[\w).])\1(?![\w*])")
_WORD_HYPHEN = re.compile(r"(?<=[^\W\d_])-(?:[ \t]*\n\s*)?(?=[^\W\d_])")
_TOKEN = re.compile(r"\w+|[()\[\]{}]|[^\w\s()\[\]{}]+")
_SENTENCE_END = ".;:!?"


@dataclass(frozen=True)
class QAItem:
    """One question with its reference answer, accepted aliases and the document sentence that states it."""

    id: str
    question: str
    answer: str
    split: str
    aliases: tuple[str, ...] = ()
    evidence: str | None = None
    offset: int | None = None     # character index of `evidence` in the document

    @property
    def references(self) -> tuple[str, ...]:
        return (self.answer, *self.aliases)


def normalize(text: str) -> str:
    """The text as space-separated lowercase tokens, the form in which answers are compared.

    Steps, each for a reason:
    - Unicode NFKC (full-width letters, non-breaking spaces), then casefold: `AssertionError` = `assertionerror`.
      This also folds `-O` into `-o`; no answer in the shipped set depends on case alone.
    - Markdown emphasis (`*in-place*`, `**PEP 526**`) loses its asterisks; an asterisk that is not a matched
      pair around a word stays, so the operators `*=`, `**=` and `*target` keep theirs.
    - Quotes and backticks (straight and typographic) are dropped: "`__debug__`" and '"__debug__"' are `__debug__`.
    - A hyphen between two letters, also across a line break as in the manual's "left-\\nhand", becomes a space
      ("in-place" = "in place", "left-hand" = "left hand"); a hyphen next to a digit or a space stays (`-O`, `-=`).
    - Commas are separators, never tokens ("a, b = b, a" = "a,b = b,a"; `[0, 2]` = `[0,2]`).
    - Tokens are runs of word characters (letters, digits and underscores, so `__debug__` and
      `Py_TPFLAGS_SEQUENCE` are one token each) or runs of other symbols (`+=`, `**=`, `->`, `//=`, `[`).
      Symbol runs are kept whole so that `*=` is not found inside `**=`; brackets are tokens of their own
      (`["->"` is `[` and `->`, `property()` is `property ( )`).
    - Sentence punctuation (. ; : ! ?) at the end of a symbol run that ends before a space or the end of the
      text is dropped, so "raises AssertionError." and "`a[i]`." end in a word and in `]`; inside a name
      (`sys.exc_info`, `3.8`) the dot stays.
    Whitespace disappears between tokens; the result is only for comparison, not for display.
    """
    text = unicodedata.normalize("NFKC", text).translate(_DASHES).casefold()
    text = _EMPHASIS.sub(r"\2", text)
    text = text.translate(str.maketrans("", "", _QUOTES))
    text = _WORD_HYPHEN.sub(" ", text).replace(",", " ")
    tokens = []
    for match in _TOKEN.finditer(text):
        token = match.group()
        if not token[0].isalnum() and token[0] != "_":
            at_end = match.end() == len(text) or text[match.end()].isspace()
            token = token.rstrip(_SENTENCE_END) if at_end else token
        if token:
            tokens.append(token)
    return " ".join(tokens)


def contains(answer_text: str, reference: str) -> bool:
    """Whether the normalized reference occurs in the normalized answer as a run of whole tokens."""
    ref = normalize(reference)
    return bool(ref) and f" {ref} " in f" {normalize(answer_text)} "


def is_correct(answer_text: str, item: QAItem) -> bool:
    """Whether a reply contains the item's reference answer or one of its aliases (see `normalize`)."""
    return any(contains(answer_text, ref) for ref in item.references)


def _fail(path: Path, line: int, what: str) -> NectarError:
    return NectarError(f"QA file {path}, line {line}: {what}")


def _item(obj: Any, path: Path, line: int) -> QAItem:
    """One validated QAItem from a parsed JSON line."""
    if not isinstance(obj, dict):
        raise _fail(path, line, f"expected a JSON object, found {type(obj).__name__}")
    for key, kind in _REQUIRED.items():
        if key not in obj:
            raise _fail(path, line, f"missing field '{key}'")
        if not isinstance(obj[key], kind) or not obj[key].strip():
            raise _fail(path, line, f"field '{key}' must be a non-empty string, found {obj[key]!r}")
    for key, (kind, expected) in _OPTIONAL.items():
        if key in obj and (not isinstance(obj[key], kind) or isinstance(obj[key], bool)):
            raise _fail(path, line, f"field '{key}' must be {expected}, found {obj[key]!r}")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        fields = ", ".join([*_REQUIRED, *_OPTIONAL])
        raise _fail(path, line, f"unknown field(s) {', '.join(unknown)} (expected {fields})")
    if obj["split"] not in SPLITS:
        raise _fail(path, line, f"split must be one of {', '.join(SPLITS)}, found {obj['split']!r}")
    aliases = obj.get("aliases", [])
    if not all(isinstance(a, str) and a.strip() for a in aliases):
        raise _fail(path, line, f"aliases must be non-empty strings, found {aliases!r}")
    if not normalize(obj["answer"]) or not all(normalize(a) for a in aliases):
        raise _fail(path, line, "answer or alias normalizes to nothing (only punctuation); it could never match")
    if obj.get("offset", 0) < 0:
        raise _fail(path, line, f"offset must be >= 0, found {obj['offset']}")
    return QAItem(id=obj["id"], question=obj["question"], answer=obj["answer"], split=obj["split"],
                  aliases=tuple(aliases), evidence=obj.get("evidence"), offset=obj.get("offset"))


def _qa_path(spec: str | Path) -> Path:
    if isinstance(spec, str) and spec in NAMED_QA:
        return DATA / NAMED_QA[spec]
    return Path(spec).expanduser()


def read_qa(spec: str | Path) -> list[QAItem]:
    """Read a named shipped QA set (NAMED_QA) or a JSONL file, validating every line."""
    path = _qa_path(spec)
    if not path.is_file():
        names = ", ".join(repr(n) for n in NAMED_QA)
        raise NectarError(f"QA file not found: {spec} (expected {names} or a JSONL file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise NectarError(f"QA file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    items: list[QAItem] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _fail(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        item = _item(obj, path, number)
        if item.id in seen:
            raise _fail(path, number, f"id {item.id!r} already used on line {seen[item.id]}")
        seen[item.id] = number
        items.append(item)
    if not items:
        raise NectarError(f"QA file {path} holds no questions (expected one JSON object per line)")
    return items


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _in_split(flags: Sequence[bool], items: Sequence[QAItem], split: str) -> list[bool]:
    return [f for f, item in zip(flags, items) if item.split == split]


def qa_report(answers: Mapping[str, Sequence[str]], items: Sequence[QAItem], reference: str = "full") -> dict[str, Any]:
    """Per method: accuracy overall and per split; for the others, agreement with the reference and its misses.

    answers maps a method's name to its replies, in the order of items. qa_agreement is the share of questions
    where the method is correct exactly when the reference is; qa_misses lists the ids the reference answers
    correctly and the method does not. Splits with no questions get None.
    """
    if reference not in answers:
        raise NectarError(f"QA report needs the reference method {reference!r}; found {', '.join(answers) or 'none'}")
    correct: dict[str, list[bool]] = {}
    for method, replies in answers.items():
        if len(replies) != len(items):
            raise NectarError(f"QA report: method {method!r} has {len(replies)} answers for {len(items)} questions")
        correct[method] = [is_correct(r, item) for r, item in zip(replies, items)]
    ref = correct[reference]
    report: dict[str, Any] = {}
    for method, flags in correct.items():
        row: dict[str, Any] = {"qa_accuracy": _share(flags), "questions": len(flags),
                               "split_accuracy": {s: _share(_in_split(flags, items, s)) for s in SPLITS}}
        if method != reference:
            same = [f == r for f, r in zip(flags, ref)]
            row["qa_agreement"] = _share(same)
            row["split_agreement"] = {s: _share(_in_split(same, items, s)) for s in SPLITS}
            row["qa_misses"] = [item.id for f, r, item in zip(flags, ref, items) if r and not f]
        report[method] = row
    return report
