"""An int4 bundle against the fp32 bundle of the same artifact: top-1 agreement, ms per token and file sizes.

Both bundles run on one backend in this process, one after the other over the same held-out sequences: the
artifact's test split (`heldout.json`, what nothing in the recipe was fitted on), each fed token by token after
a short prefix, and at every position the two argmaxes are compared (teacher-forced top-1 agreement: both read the
same text, so one disagreement does not shift every later position). The step times are those of the same run;
the table quotes medians.

    python bench/int4_agreement.py --artifact ART --reference BUNDLE_FP32 --candidate BUNDLE_INT4 --out OUT

Writes OUT/int4_agreement.json and OUT/int4_agreement.png (agreement by source, ms per token of each bundle).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import harness

PREFIX = 8              # tokens fed at once before the compared positions


def bundle_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def sequences(artifact: Path, limit: int, tokens: int) -> list[tuple[str, list[int]]]:
    """(source, ids) of the artifact's held-out test split, the first `limit`, each cut to PREFIX + `tokens`."""
    heldout = json.loads((artifact / "heldout.json").read_text())
    return [(s["source"], [int(t) for t in s["ids"][:PREFIX + tokens]]) for s in heldout["test"][:limit]
            if len(s["ids"]) > PREFIX]


def argmaxes(backend: Any, ids: list[int]) -> tuple[list[int], list[float]]:
    """The top-1 token after the prefix and after every later token, and each one-token step's ms."""
    backend.reset()
    top = [int(np.argmax(backend.step(np.array([ids[:PREFIX]]))[0]))]
    ms = []
    for token in ids[PREFIX:-1]:
        top.append(int(np.argmax(backend.step(np.array([[token]]))[0])))
        ms.append(backend.last_step.ms)
    return top, ms


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from nectar_runtime.backends import make_backend
    from nectar_runtime.bundle import load_bundle

    data = sequences(args.artifact, args.sequences, args.tokens)
    runs: dict[str, dict[str, Any]] = {}
    for role, path in (("reference", args.reference), ("candidate", args.candidate)):
        bundle = load_bundle(path)
        backend = make_backend(bundle, args.backend)
        backend.activate()
        tops, ms = [], []
        for _, ids in data:
            top, step_ms = argmaxes(backend, ids)
            tops.append(top)
            ms += step_ms
        backend.release()
        runs[role] = {"bundle": str(path), "precision": bundle.manifest.precision, "bytes": bundle_bytes(path),
                      "ms_per_token_median": round(statistics.median(ms), 3), "tops": tops}
    by_source: dict[str, list[int]] = {}
    for (source, _), a, b in zip(data, runs["reference"]["tops"], runs["candidate"]["tops"]):
        by_source.setdefault(source, []).extend(int(x == y) for x, y in zip(a, b))
    every = [x for hits in by_source.values() for x in hits]
    for run in runs.values():
        del run["tops"]
    return {"artifact": str(args.artifact), "backend": args.backend, "sequences": len(data),
            "positions": len(every), "top1_agreement": round(sum(every) / len(every), 4),
            "by_source": {s: {"positions": len(h), "top1_agreement": round(sum(h) / len(h), 4)}
                          for s, h in sorted(by_source.items())}, **runs}


def plot(result: dict[str, Any], png: Path) -> None:
    plt = harness.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sources = list(result["by_source"])
    left.bar(sources + ["all"], [result["by_source"][s]["top1_agreement"] for s in sources]
             + [result["top1_agreement"]])
    left.set_ylim(0, 1)
    left.set_title(f"{result['candidate']['precision']} against {result['reference']['precision']}: top-1 agreement")
    roles = ("reference", "candidate")
    right.bar([result[r]["precision"] for r in roles], [result[r]["ms_per_token_median"] for r in roles])
    right.set_title(f"median ms per token ({result['backend']})")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--reference", type=Path, required=True, help="the fp32 bundle of the artifact")
    p.add_argument("--candidate", type=Path, required=True, help="the int4 (or other) bundle of the same artifact")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--sequences", type=int, default=64, help="held-out test sequences, at most")
    p.add_argument("--tokens", type=int, default=64, help="compared positions per sequence, at most")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from nectar_runtime.errors import NectarError

    try:
        result = measure(args)
    except NectarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int4_agreement.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "int4_agreement.png")
    print(json.dumps({k: result[k] for k in ("sequences", "positions", "top1_agreement", "by_source")}))
    for role in ("reference", "candidate"):
        r = result[role]
        print(f"{role}: {r['precision']} {r['bytes']:,} bytes, {r['ms_per_token_median']} ms/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
