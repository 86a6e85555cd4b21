"""Are the hand-written QA questions answerable? Greedy answers with full attention over the whole document.

A check of the QA set, not of Nectar: the model (SmolLM2-135M-Instruct by default) reads the whole document
as its context (`build_context` with no token limit, 512 positions reserved as `fit` does), each question is
placed after it with the chat template (`question_ids`) and answered greedily (64 new tokens at most), with
exact attention over the document's KV cache (`cache.exact()`), the same path `eval` takes for "full". Beside
it, in the same run, the same questions with no context at all (`no_context`): what the model knows without
the document. Scored with `nectar_export.qa.is_correct`.

    flock /work/cpu.lock python bench/qa_answerable.py --out bench/results/qa_answerable-manual-4k.json

`--suffix TEXT` appends TEXT to every question (a prompt variant); compare variants on `--split tune` only.

Prints one line per question (id, split, correct under full / no_context, full's reply) and the accuracies;
writes the JSON given by --out: settings, run time, `qa_report`, and every reply.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

ANSWER_TOKENS = 64
RESERVE = 512


def qa_digest(qa_spec: str) -> str:
    """sha256 of the QA file's bytes, so a result names the exact questions it answered."""
    from nectar_export.qa import NAMED_QA, DATA

    path = DATA / NAMED_QA[qa_spec] if qa_spec in NAMED_QA else Path(qa_spec)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def answer_all(model_spec: str, context_spec: str, qa_spec: str, batch_size: int, split: str | None = None,
               suffix: str = "") -> dict[str, Any]:
    """Greedy replies of full attention and of no context to every question, scored; plain JSON-able data."""
    import torch

    from nectar_export.batch_generate import Sampling, generate
    from nectar_export.context import build_context, load_document
    from nectar_export.models import load_model
    from nectar_export.prefill import prefill
    from nectar_export.qa import is_correct, qa_report, read_qa
    from nectar_export.samples import pad_id, question_ids, stop_ids

    torch.manual_seed(0)
    items = [item for item in read_qa(qa_spec) if split is None or item.split == split]
    loaded = load_model(model_spec)
    model, tokenizer = loaded.model, loaded.tokenizer
    document = load_document(context_spec)
    context, _ = build_context(tokenizer, document, None, int(model.config.max_position_embeddings), RESERVE)
    cache = prefill(model, context.ids)
    prompts = [question_ids(tokenizer, context.question_template, item.question + suffix) for item in items]
    methods = {"full": cache.exact(), "no_context": [None] * model.config.num_hidden_layers}
    replies = {}
    for name, contexts in methods.items():
        ids = generate(model, prompts, contexts, context.n, Sampling(max_new_tokens=ANSWER_TOKENS), stop_ids(tokenizer),
                       pad_id(tokenizer), batch_size=batch_size, desc=f"answers {name}")
        replies[name] = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]
    rows = [{"id": item.id, "split": item.split, "question": item.question, "answer": item.answer,
             **{f"{m}_correct": is_correct(replies[m][i], item) for m in methods},
             **{f"{m}_reply": replies[m][i] for m in methods}} for i, item in enumerate(items)]
    return {"model": loaded.source, "context": document.source, "context_tokens": context.n,
            "document_tokens": context.document_tokens, "qa": qa_spec, "qa_sha256": qa_digest(qa_spec),
            "split": split, "suffix": suffix, "questions": len(items),
            "max_new_tokens": ANSWER_TOKENS, "report": qa_report(replies, items, reference="full"), "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    """One line per question, then the accuracies per method and split."""
    mark = {True: "+", False: "-"}
    print(f"{'id':4} {'split':9} full none  reply (full attention)")
    for row in result["rows"]:
        reply = " ".join(row["full_reply"].split())
        print(f"{row['id']:4} {row['split']:9} {mark[row['full_correct']]:>4} {mark[row['no_context_correct']]:>4}  "
              f"[{row['answer']}] {reply[:150]}")
    for method, r in result["report"].items():
        split = r["split_accuracy"]
        shares = "  ".join(f"{name} {share:.3f}" for name, share in split.items() if share is not None)
        print(f"{method:10} qa_accuracy {r['qa_accuracy']:.3f}  {shares}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write.")
    parser.add_argument("--model", default="default")
    parser.add_argument("--context", default="manual-4k")
    parser.add_argument("--qa", default="manual-4k")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--split", choices=("tune", "untouched"), help="Answer only this split's questions.")
    parser.add_argument("--suffix", default="", help="Text appended to every question (a prompt variant); "
                        "compare variants on --split tune only, never on the untouched questions.")
    args = parser.parse_args()
    start = time.perf_counter()
    result = answer_all(args.model, args.context, args.qa, args.batch_size, args.split, args.suffix)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print_table(result)
    print(f"{result['seconds']} s for {result['questions']} questions")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
