"""bench/qa_answerable.py end to end on the tiny checkpoint: every question answered and scored, the JSON it writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = [("q01", "Which exception does a failed check raise?", "CheckError", "tune"),
             ("q02", "Which constant must be true?", "__debug__", "untouched"),
             ("q03", "Which option turns it off?", "-O", "tune")]


def test_answers_every_question_and_writes_the_report(tmp_path, tiny_ckpt):
    doc = tmp_path / "doc.txt"
    doc.write_text("A failed check raises CheckError. Checks run only if __debug__ is true; -O turns them off.\n")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": i, "question": q, "answer": a, "split": s}) + "\n"
                          for i, q, a, s in QUESTIONS))
    out = tmp_path / "res" / "qa.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "qa_answerable.py"), "--model", str(tiny_ckpt),
                           "--context", str(doc), "--qa", str(qa), "--out", str(out), "--batch-size", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["questions"] == 3 and [r["id"] for r in result["rows"]] == ["q01", "q02", "q03"]
    assert result["qa_sha256"] == hashlib.sha256(qa.read_bytes()).hexdigest()
    assert set(result["report"]) == {"full", "no_context"}
    assert set(result["report"]["no_context"]) >= {"qa_accuracy", "split_accuracy", "qa_agreement", "qa_misses"}
    full = sum(r["full_correct"] for r in result["rows"]) / 3
    assert result["report"]["full"]["qa_accuracy"] == full
    assert "qa_accuracy" in done.stdout and "q03" in done.stdout
    assert not list(out.parent.glob("*.tmp"))
