"""Quality against memory: Nectar and every equal-memory baseline at several budgets (issue 14, part 5).

For each budget (a fraction of the context's 2*n*d KV entries per layer and KV-head) and each `--salient`
count (exact tokens per layer and KV-head kept because the training queries attend to them most, written
as a fraction of the budget's tokens), this fits an artifact (`run_fit`, on `--device`), then measures on it:
- teacher-forced top-1 agreement with full attention and KL, by source, on the artifact's test split (the
  headline: self-study and prompt answers, plus continuation text where the document was cut) and on its
  validation split (what a recipe may be tuned on);
- with `--qa`, greedy answers to the QA file: accuracy, agreement with full attention, per QA split.
Methods: nectar, the ablations fitted beside it (quadrature, uniform_allocation, unless --no-ablations),
and the exact-token caches of the same size (recent_window, snapkv, query_aware), all through the same
attention code. Answer similarity and layer errors are eval's, not measured here.

    python bench/quality_curve.py --context manual-4k --qa manual-4k --device cuda --work runs/curve
    python bench/quality_curve.py --budgets 0.125 --salient 0,0.25 --recipe quick --work /tmp/c   # a quick look
    python bench/quality_curve.py --budgets 0.125 --salient 0.5 --family quadrature --work runs/curve-q
    python bench/quality_curve.py --merge runA/quality_curve.json runB/quality_curve.json --out docs/results/x

`--family quadrature` fits the Nectar heads as the quadrature family (learned key slots) instead of MLP pairs,
salient tokens and all: a mixture of exact tokens and slots. Its rows are method `nectar_quadrature` only, as
the exact-token caches of the point are the MLP run's (the same tokens, up to a few parameters of size), so
the two runs merge.

Writes OUT/quality_curve.json ({"config": ..., "rows": [ROW...]}, ROW = {"budget", "salient", "method",
"params", "top1", "kl", "repeat_top1", "val_top1", "val_repeat_top1", "qa_accuracy", "qa_agreement",
"qa_untouched_agreement", "qa_untouched_accuracy", "fit_seconds"}) and OUT/quality_curve.png (top-1, KL, repeat
top-1 and QA accuracy against the memory fraction, one line per method). `--merge` joins the rows of runs made
apart (other budgets, other processes) into one JSON and PNG; it refuses runs of another document, QA set or
recipe, and a point measured twice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

BUDGETS = (0.25, 0.125, 0.0625, 0.03125)
PANELS = (("top1", "headline top-1"), ("kl", "headline KL"), ("repeat_top1", "repeat top-1"),
          ("qa_accuracy", "QA accuracy"))


def fit_point(args: argparse.Namespace, budget: float, salient_share: float, out: Path) -> dict[str, Any]:
    """Fit one artifact (or reuse the one at `out`, fitted with the same config); returns its manifest's fit."""
    from nectar_export.artifact import read_manifest
    from nectar_export.config import FitConfig
    from nectar_export.fit import run_fit

    # the ablations are baselines of the budget, fitted once per budget (beside the MLP run without salient tokens)
    ablations = args.ablations and not salient_share and args.family == "mlp"
    config = FitConfig.recipe(args.recipe, context=args.context, model=args.model, budget=budget,
                              context_tokens=args.context_tokens, ablations=ablations,
                              salient=salient_share, coverage=args.coverage, family=args.family)
    if (out / "nectar.json").is_file() and read_manifest(out).config == config:
        return read_manifest(out).fit
    return run_fit(config, out, args.device, overwrite=True)


def measure(artifact_path: Path, args: argparse.Namespace, loaded: Any) -> dict[str, dict[str, Any]]:
    """Per method: test and validation teacher-forced metrics and QA scores (see the module docstring)."""
    import torch

    from nectar_export.artifact import load_artifact
    from nectar_export.evaluate import eval_methods, qa_answers, teacher_forced
    from nectar_export.prefill import prefill
    from nectar_export.qa import qa_report, read_qa

    artifact = load_artifact(artifact_path, loaded.fingerprint)
    heldout = artifact.heldout()
    model = loaded.model.to(args.device)
    cache = prefill(model, heldout.context_ids, progress=False)
    methods, _, _, _ = eval_methods(model, cache, heldout.context_ids, artifact)
    test = teacher_forced(model, list(heldout.test), methods, artifact.n)
    val = teacher_forced(model, list(heldout.val), methods, artifact.n) if heldout.val else {}
    qa: dict[str, Any] = {}
    if args.qa:
        items = read_qa(args.qa)
        template = artifact.manifest.context.question_template
        qa = qa_report(qa_answers(model, loaded.tokenizer, template, items, methods, artifact.n), items)
    rows = {}
    for name in methods:
        if name == "full":
            continue
        row = {"top1": test[name]["headline"]["top1"], "kl": test[name]["headline"]["kl"],
               "repeat_top1": test[name].get("repeat", {}).get("top1"),
               "val_top1": val.get(name, {}).get("headline", {}).get("top1"),
               "val_repeat_top1": val.get(name, {}).get("repeat", {}).get("top1")}
        if qa:
            row.update({"qa_accuracy": qa[name]["qa_accuracy"], "qa_agreement": qa[name]["qa_agreement"],
                        "qa_untouched_agreement": qa[name]["split_agreement"]["untouched"],
                        "qa_untouched_accuracy": qa[name]["split_accuracy"]["untouched"],
                        "qa_tune_agreement": qa[name]["split_agreement"]["tune"]})
        rows[name] = row
    if qa:
        rows["full"] = {"qa_accuracy": qa["full"]["qa_accuracy"],
                        "qa_untouched_accuracy": qa["full"]["split_accuracy"]["untouched"]}
    del cache, methods
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def run(args: argparse.Namespace, partial: Path | None = None) -> dict[str, Any]:
    """Every (budget, salient) point in turn; after each, the rows so far go to `partial` (a killed run keeps them)."""
    from nectar_export.models import load_model

    rows: list[dict[str, Any]] = []
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    loaded = load_model(args.model)
    for budget in args.budgets:
        for share in args.salient:
            out = args.work / f"b{budget:g}-s{share:g}"
            start = time.perf_counter()
            fit = fit_point(args, budget, share, out)
            fit_seconds = round(time.perf_counter() - start, 1)
            measured = measure(out, args, loaded)
            if args.family != "mlp":            # the point's exact caches are the MLP run's (see the docstring)
                measured = {f"nectar_{args.family}": measured["nectar"]}
            for method, row in measured.items():
                params = fit["variants"].get(method, {}).get("params", fit["nectar_params"])
                rows.append({"budget": budget, "salient": share, "method": method,
                             "params_over_kv": round(params / fit["kv_entries"], 5), **row,
                             "fit_seconds": fit_seconds if method.startswith("nectar") else None})
            nectar = next(m for m in measured if m.startswith("nectar"))
            print(json.dumps({"budget": budget, "salient": share,
                              nectar: measured[nectar], "fit_seconds": fit_seconds}), flush=True)
            if partial is not None:
                partial.write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    return {"config": config, "rows": rows}


# what must agree between runs whose rows are merged: the same document, QA set and recipe
SAME_IN_MERGE = ("context", "context_tokens", "qa", "recipe", "coverage", "ablations")


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result of several runs' rows, in budget order (largest first), each run's config kept."""
    from nectar_export.errors import NectarError

    first = results[0]["config"]
    rows: dict[tuple[float, float, str], dict[str, Any]] = {}
    for result in results:
        config = result["config"]
        differ = [key for key in SAME_IN_MERGE if config.get(key) != first.get(key)]
        if differ:
            raise NectarError(f"cannot merge runs that differ in {', '.join(differ)}: "
                              + "; ".join(f"{k} {first.get(k)!r} vs {config.get(k)!r}" for k in differ))
        for row in result["rows"]:
            key = (row["budget"], row["salient"], row["method"])
            if key in rows:
                raise NectarError(f"budget {key[0]:g}, salient {key[1]:g}, method {key[2]} is in two of the merged runs")
            rows[key] = row
    order = sorted(rows, key=lambda k: (-k[0], k[1]))       # stable: methods keep their order within a point
    return {"config": {**{k: first.get(k) for k in SAME_IN_MERGE}, "merged": [r["config"] for r in results]},
            "rows": [rows[k] for k in order]}


def series(rows: Sequence[dict[str, Any]], key: str) -> dict[str, list[tuple[float, float]]]:
    """The plotted lines of one metric, as (budget, value) points: one per nectar salient share, and one per other
    method, which at each budget takes the row of the smallest share measured there (a baseline does not depend
    on the share, only its size follows Nectar's parameter count a little)."""
    lines: dict[str, dict[float, tuple[float, float]]] = {}
    for r in rows:
        if r["method"] == "full" or r.get(key) is None:
            continue
        label = (f"{r['method'].replace('_', ' ')} (salient {r['salient']:g})" if r["method"].startswith("nectar")
                 else r["method"])
        line = lines.setdefault(label, {})
        if r["budget"] not in line or r["salient"] < line[r["budget"]][0]:
            line[r["budget"]] = (r["salient"], r[key])
    return {label: sorted((b, v) for b, (_, v) in line.items()) for label, line in sorted(lines.items())}


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for label, points in series(rows, key).items():
            ax.plot(*zip(*points), marker="o", label=label)
        full = [r["qa_accuracy"] for r in rows if r["method"] == "full" and r.get("qa_accuracy") is not None]
        if key == "qa_accuracy" and full:
            ax.axhline(full[0], color="black", linestyle="--", label="full attention")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory: fraction of the context's KV entries")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    floats = lambda text: [float(x) for x in text.split(",")]
    p.add_argument("--model", default="default")
    p.add_argument("--context", default="manual-4k")
    p.add_argument("--context-tokens", type=int, default=8192, help="Cut the document here (default: all of it).")
    p.add_argument("--qa", default=None, help="QA file or a shipped set ('manual-4k', 'license-4k').")
    p.add_argument("--budgets", type=floats, default=list(BUDGETS))
    p.add_argument("--salient", type=floats, default=[0.0],
                   help="Salient exact tokens as fractions of each budget's tokens, e.g. 0,0.25,0.5.")
    p.add_argument("--recipe", default="default", choices=("default", "quick"))
    p.add_argument("--no-ablations", dest="ablations", action="store_false")
    p.add_argument("--family", default="mlp", choices=("mlp", "quadrature"),
                   help="The Nectar heads' family (quadrature: rows are nectar_quadrature only; see above).")
    p.add_argument("--no-coverage", dest="coverage", action="store_false",
                   help="Hold out a fifth of the document's passages instead of training on every one.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", type=Path, default=None, help="Artifacts go here (reused when the config matches).")
    p.add_argument("--out", type=Path, default=None, help="Where the JSON and PNG go [default: --work].")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="Fit nothing: join these runs' quality_curve.json rows into OUT's JSON and PNG.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from nectar_export.errors import NectarError

    p = parser()
    args = p.parse_args(argv)
    if args.merge is None and args.work is None:
        p.error("--work is required (or --merge)")
    out = args.out or args.work
    if out is None:
        p.error("--merge needs --out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = (merge([json.loads(path.read_text()) for path in args.merge]) if args.merge
                  else run(args, out / "quality_curve.json"))
    except NectarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (out / "quality_curve.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "quality_curve.png")
    print(f"wrote {out / 'quality_curve.json'} and {out / 'quality_curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
