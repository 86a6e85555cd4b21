"""QA scoring on fixed strings, the QA file's validation, and the shipped manual-4k QA set itself."""

from __future__ import annotations

import json

import pytest

from nectar_export.context import load_document
from nectar_export.errors import NectarError
from nectar_export.qa import QAItem, contains, is_correct, normalize, qa_report, read_qa


def item(answer: str, *aliases: str, id: str = "q01", split: str = "tune") -> QAItem:
    return QAItem(id=id, question="?", answer=answer, split=split, aliases=aliases)


# --- normalize -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("AssertionError", "assertionerror"),
    ("`__debug__`.", "__debug__"),                      # backticks and the sentence's full stop go
    ('"__debug__"', "__debug__"),
    ("\u201cstarred\u201d", "starred"),                    # typographic quotes
    ("the sequence\u2019s length", "the sequences length"),
    ("ＡｓｓｅｒｔｉｏｎＥｒｒｏｒ", "assertionerror"),        # NFKC folds full-width letters
    ("a\u00a0b", "a b"),                                    # and a non-breaking space
    ("  spread \n over\t lines  ", "spread over lines"),
    ("the *in-place* form", "the in place form"),          # emphasis and a word hyphen
    ("**PEP 526**", "pep 526"),
    ("left-\n  hand side", "left hand side"),              # a hyphen across the manual's line break
    ("x **= 2", "x **= 2"),                               # operators keep their asterisks
    ("*target", "* target"),
    ("x *= 2 and y **= 3", "x *= 2 and y **= 3"),
    ("option -O", "option - o"),                           # a leading hyphen stays
    ("a,b = b,a", "a b = b a"),                            # commas separate
    ("[0,2].", "[ 0 2 ]"),
    ("x = x+1.", "x = x + 1"),
    ('["->" expression]', "[ -> expression ]"),            # brackets are tokens of their own
    ("Use `sys.exc_info()`.", "use sys . exc_info ( )"),
    ("Python 3.8.", "python 3 . 8"),                       # the dot inside a number stays, the final one goes
    ("Py_TPFLAGS_SEQUENCE", "py_tpflags_sequence"),
    ("...", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


# --- containment -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, reference, expected", [
    ("It raises an `AssertionError`.", "AssertionError", True),
    ("class Cls: pass", "as", False),                      # a word never matches inside another word
    ("with x as y", "as", True),
    ("The tuples are unpacked.", "tuple", False),
    ("It returns a tuple.", "tuples", False),
    ("use __debug__", "debug", False),                     # underscores are part of the word
    ("use debug mode", "__debug__", False),
    ("python -OO", "-O", False),
    ("python -O script.py", "-O", True),
    ("x **= 2", "*=", False),                              # an operator never matches inside a longer one
    ("x *= 2", "*=", True),
    ("prints [0, 2]", "[0, 2]", True),
    ("prints [0, 2, 3]", "[0, 2]", False),
    ("In version 3.8.1", "3.8", True),
    ("In version 3.80", "3.8", False),
    ("It is done in place.", "in-place", True),
    ("swap with a,b = b,a", "a, b = b, a", True),
    ("Call `sys.exc_info()`", "sys.exc_info", True),
    ("It is **mangled**.", "mangled", True),
    ("anything", "...", False),                            # a reference of punctuation alone never matches
])
def test_contains_respects_token_boundaries(reply, reference, expected):
    assert contains(reply, reference) is expected


def test_aliases_count_as_correct():
    qa = item("integer", "int")
    assert is_correct("It must be an int.", qa)
    assert is_correct("An integer.", qa)
    assert not is_correct("It must be a float (or an interface).", qa)


# --- qa_report -------------------------------------------------------------------------------------------------


def test_report_accuracy_agreement_and_misses():
    items = [item("alpha", id="a", split="tune"), item("beta", id="b", split="tune"),
             item("gamma", id="c", split="untouched"), item("delta", id="d", split="untouched")]
    answers = {"full": ["alpha", "beta", "no", "no"],           # right on a, b
               "nectar": ["alpha", "no", "gamma", "no"],        # right on a, c: misses b, extra c
               "window": ["no", "no", "no", "no"]}
    report = qa_report(answers, items)
    assert report["full"] == {"qa_accuracy": 0.5, "questions": 4,
                              "split_accuracy": {"tune": 1.0, "untouched": 0.0}}
    nectar = report["nectar"]
    assert nectar["qa_accuracy"] == 0.5 and nectar["split_accuracy"] == {"tune": 0.5, "untouched": 0.5}
    assert nectar["qa_agreement"] == 0.5                         # same on a and d
    assert nectar["split_agreement"] == {"tune": 0.5, "untouched": 0.5}
    assert nectar["qa_misses"] == ["b"]
    assert report["window"]["qa_agreement"] == 0.5 and report["window"]["qa_misses"] == ["a", "b"]
    assert json.loads(json.dumps(report)) == report


def test_report_other_reference_and_empty_split():
    items = [item("alpha", id="a"), item("beta", id="b")]
    report = qa_report({"full": ["alpha", "beta"], "heads": ["alpha", "x"]}, items, reference="heads")
    assert report["full"]["qa_agreement"] == 0.5 and report["full"]["qa_misses"] == []
    assert report["heads"]["split_accuracy"] == {"tune": 0.5, "untouched": None}


def test_report_refuses_a_missing_reference_or_a_short_answer_list():
    items = [item("alpha", id="a"), item("beta", id="b")]
    with pytest.raises(NectarError, match="reference method 'full'"):
        qa_report({"nectar": ["alpha", "beta"]}, items)
    with pytest.raises(NectarError, match="'nectar' has 1 answers for 2 questions"):
        qa_report({"full": ["alpha", "beta"], "nectar": ["alpha"]}, items)


# --- read_qa: validation ---------------------------------------------------------------------------------------

GOOD = {"id": "q01", "question": "Which exception?", "answer": "AssertionError", "split": "tune"}


def write_lines(tmp_path, *lines: str):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_a_valid_file_with_optional_fields_and_blank_lines(tmp_path):
    full = dict(GOOD, id="q02", aliases=["AE"], evidence="raise AssertionError", offset=12, split="untouched")
    items = read_qa(write_lines(tmp_path, json.dumps(GOOD), "", json.dumps(full)))
    assert items == [QAItem("q01", "Which exception?", "AssertionError", "tune"),
                     QAItem("q02", "Which exception?", "AssertionError", "untouched", ("AE",), "raise AssertionError", 12)]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 2: not valid JSON"),
    ('["a list"]', r"line 2: expected a JSON object, found list"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "answer"}), r"line 2: missing field 'answer'"),
    (json.dumps(dict(GOOD, question=3)), r"line 2: field 'question' must be a non-empty string, found 3"),
    (json.dumps(dict(GOOD, id="  ")), r"line 2: field 'id' must be a non-empty string"),
    (json.dumps(dict(GOOD, split="test")), r"line 2: split must be one of tune, untouched, found 'test'"),
    (json.dumps(dict(GOOD, aliases="AE")), r"line 2: field 'aliases' must be a list of strings"),
    (json.dumps(dict(GOOD, aliases=["AE", 2])), r"line 2: aliases must be non-empty strings"),
    (json.dumps(dict(GOOD, evidence=["x"])), r"line 2: field 'evidence' must be a string"),
    (json.dumps(dict(GOOD, offset="12")), r"line 2: field 'offset' must be an integer"),
    (json.dumps(dict(GOOD, offset=True)), r"line 2: field 'offset' must be an integer"),
    (json.dumps(dict(GOOD, offset=-1)), r"line 2: offset must be >= 0"),
    (json.dumps(dict(GOOD, answer="?!")), r"line 2: answer or alias normalizes to nothing"),
    (json.dumps(dict(GOOD, reply="x")), r"line 2: unknown field\(s\) reply"),
    (json.dumps(GOOD), r"line 2: id 'q01' already used on line 1"),
])
def test_each_invalid_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path, json.dumps(GOOD), line)
    with pytest.raises(NectarError, match=message) as info:
        read_qa(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_empty_and_non_utf8_files_are_one_line_errors(tmp_path):
    with pytest.raises(NectarError, match="QA file not found: .*nope.jsonl"):
        read_qa(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(NectarError, match="holds no questions"):
        read_qa(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(dict(GOOD, answer="caf\u00e9"), ensure_ascii=False).encode("latin-1"))
    with pytest.raises(NectarError, match="is not UTF-8 text") as info:
        read_qa(latin)
    assert "\n" not in str(info.value)
    with pytest.raises(NectarError, match="QA file not found"):
        read_qa(tmp_path)                                       # a directory is not a QA file


# --- the shipped set -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return read_qa("manual-4k"), load_document("manual-4k").text


def test_shipped_set_size_splits_and_ids(shipped):
    items, _ = shipped
    assert len(items) >= 60
    assert sum(i.split == "untouched" for i in items) == 20
    assert [i.id for i in items] == [f"q{n:02d}" for n in range(1, len(items) + 1)]


def test_shipped_untouched_split_follows_the_stated_rule(shipped):
    items, _ = shipped                      # question i is untouched when i = ceil(k * N / 20), k = 1..20
    n = len(items)
    picked = {-(-k * n // 20) for k in range(1, 21)}
    assert {i for i, it in enumerate(items, 1) if it.split == "untouched"} == picked


def test_shipped_evidence_is_verbatim_at_its_offset(shipped):
    items, text = shipped
    for it in items:
        assert it.evidence and it.offset is not None, it.id
        assert text[it.offset:it.offset + len(it.evidence)] == it.evidence, it.id
    offsets = [it.offset for it in items]
    assert offsets == sorted(offsets)                             # ids run in document order


def test_shipped_answers_are_in_their_evidence_and_not_in_their_question(shipped):
    items, _ = shipped
    for it in items:
        assert contains(it.evidence, it.answer), it.id
        assert not any(contains(it.question, ref) for ref in it.references), it.id


def test_shipped_questions_span_the_document(shipped):
    items, text = shipped
    quarters = [sum(4 * it.offset // len(text) == q for it in items) for q in range(4)]
    untouched = [sum(4 * it.offset // len(text) == q for it in items if it.split == "untouched") for q in range(4)]
    assert min(quarters) >= 12 and min(untouched) >= 3, (quarters, untouched)
    topics = [text.index('The "assert" statement'), text.index("Assignment statements\n"), text.index("Coroutines\n")]
    per_topic = [sum(lo <= it.offset < hi for it in items) for lo, hi in zip(topics, [*topics[1:], len(text)])]
    shares = [(hi - lo) / len(text) for lo, hi in zip(topics, [*topics[1:], len(text)])]
    for count, share in zip(per_topic, shares):                  # roughly in proportion to each topic's length
        assert abs(count / len(items) - share) < 0.05, (per_topic, shares)


# --- the second shipped set, about license-4k ------------------------------------------------------------------


@pytest.fixture(scope="module")
def license_set():
    return read_qa("license-4k"), load_document("license-4k").text


def test_license_set_size_and_untouched_split(license_set):
    items, _ = license_set                  # question i is untouched when i = ceil(k * N / 10), k = 1..10
    n = len(items)
    assert n >= 30 and [i.id for i in items] == [f"q{k:02d}" for k in range(1, n + 1)]
    assert {i for i, it in enumerate(items, 1) if it.split == "untouched"} == {-(-k * n // 10) for k in range(1, 11)}


def test_license_set_evidence_answers_and_spread(license_set):
    items, text = license_set
    for it in items:
        assert it.evidence and text[it.offset:it.offset + len(it.evidence)] == it.evidence, it.id
        assert contains(it.evidence, it.answer), it.id
        assert not any(contains(it.question, ref) for ref in it.references), it.id
    assert [it.offset for it in items] == sorted(it.offset for it in items)
    quarters = [sum(4 * it.offset // len(text) == q for it in items) for q in range(4)]
    untouched = [sum(4 * it.offset // len(text) == q for it in items if it.split == "untouched") for q in range(4)]
    assert min(quarters) >= 8 and min(untouched) >= 2, (quarters, untouched)
