"""Decode latency against context length n: Nectar bundles beside full-attention baseline bundles (issue 4, part 6).

For every bundle, in a fresh subprocess (so peak RSS belongs to that bundle alone), on ONNX Runtime CPU,
batch 1: a warm-up pass (prefill + `--warmup` tokens), then a measured pass: prefill of a `--prompt-tokens`
question (64 by default) and `--tokens` (>= 64 for the acceptance run) forced one-token steps. Tokens are
fed regardless of the logits (no stop tokens), so every bundle decodes exactly the same number of steps.
Reported per bundle: median ms per decode step, prefill ms, peak RSS (ru_maxrss of the child), bundle bytes
(every file bundle.json lists) and the KV bytes held at the end of the measured pass (full bundles: the
context's n tokens plus the new ones; Nectar bundles: the new tokens only).

Bundles come from `--bundles DIR...` (each bundle.json says its kind and n) and/or `--make`, which fits and
exports what is missing under `--work` for every n of `--ns`. Latency depends only on the graph's shapes,
not on how well the heads were fitted, so `--make` fits with few samples and one epoch (quality is not
measured here). It calls the fitting library rather than `nectar-export fit --quick` because `fit` reserves
512 new-token positions and SmolLM2 has 8192, which would refuse n = 8000; here the reserve is
min(512, positions - n) (192 at n = 8000, enough for 64 + 64 tokens). Note that at a fixed `--budget`
fraction the Nectar heads grow with n (0.125 of 2*n*d per layer and KV-head), so a little growth of the
per-token cost with n is expected and is part of what this measures.

    python bench/decode_latency.py --make --work runs/bench             # the issue's run (long: 2 x 5 bundles)
    python bench/decode_latency.py --bundles runs/bench/nectar-512 runs/bench/full-512 --tokens 8 --warmup 2
    nectar-export bench ...                                             # the same script

Writes OUT/decode_latency.json and OUT/decode_latency.png and prints a table, or with --json prints
{"nectar": [ROW...], "full": [ROW...]}, ROW = {"n", "ms_per_token", "prefill_ms", "peak_rss_mb",
"bundle_bytes", "kv_bytes"}. Acceptance: Nectar's ms/token at the largest n within 1.10x of the smallest n,
with the baseline's ratio beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

NS = (512, 1024, 2048, 4096, 8000)
ROW_KEYS = ("n", "ms_per_token", "prefill_ms", "peak_rss_mb", "bundle_bytes", "kv_bytes")
ACCEPT_RATIO = 1.10
QUESTION = "Explain how the document describes this feature and give a short example of its use. "
FORCED_TEXT = " The answer follows from the reference manual, section by section, with examples."


# -- child: one bundle, one process ------------------------------------------------------------------


def bench_prompt(tokenizer: Any, bundle: Any, length: int) -> list[int]:
    """Exactly `length` tokens of a templated question (its last tokens: the template's assistant header)."""
    question = QUESTION * (length // 8 + 1)
    ids = tokenizer.encode(bundle.prompt_text(question), add_special_tokens=False).ids
    return list(ids[-length:])


def forced_tokens(tokenizer: Any, count: int) -> list[int]:
    """`count` ordinary text tokens to feed one per step."""
    ids = tokenizer.encode(FORCED_TEXT, add_special_tokens=False).ids
    return [ids[i % len(ids)] for i in range(count)]


def measure(path: Path, tokens: int, warmup: int, prompt_tokens: int, threads: int | None) -> dict[str, Any]:
    """One bundle's row, measured in this process (run it in a fresh one)."""
    import resource
    import statistics

    from nectar_runtime.backends.ort import make_backend
    from nectar_runtime.bundle import load_bundle
    from nectar_runtime.errors import GenerationError
    from nectar_runtime.generate import forced_decode, load_tokenizer

    bundle = load_bundle(path)
    if prompt_tokens + max(tokens, warmup) > bundle["max_new_tokens"]:
        raise GenerationError(f"{path}: {prompt_tokens} prompt + {max(tokens, warmup)} tokens exceed the bundle's "
                              f"window of {bundle['max_new_tokens']}")
    tokenizer = load_tokenizer(bundle)
    prompt, feed = bench_prompt(tokenizer, bundle, prompt_tokens), forced_tokens(tokenizer, max(tokens, warmup))
    with make_backend(bundle, "ort-cpu", threads=threads) as backend:
        forced_decode(backend, prompt, feed[:warmup])                      # warm-up: first-run allocations
        result = forced_decode(backend, prompt, feed[:tokens])
        kv_bytes = sum(int(a.nbytes) for a in backend.past)
    return {"kind": bundle.kind, "n": bundle["n"], "ms_per_token": round(statistics.median(result.token_ms), 4),
            "prefill_ms": round(result.prefill_ms, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "bundle_bytes": sum(int(e["bytes"]) for e in bundle["files"].values()), "kv_bytes": kv_bytes,
            "bundle": str(path), "tokens": tokens, "prompt_tokens": prompt_tokens}


def run_child(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """measure() in a fresh interpreter; its last stdout line is the row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--tokens", str(args.tokens),
           "--warmup", str(args.warmup), "--prompt-tokens", str(args.prompt_tokens)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise SystemExit(f"error: measuring {path} failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- making bundles ----------------------------------------------------------------------------------


FIT_SCRIPT = """
import json, sys
from pathlib import Path
from nectar_export.config import FitConfig
from nectar_export.models import resolve_checkpoint
from nectar_export.pipeline import run_fit
model, n, budget, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
positions = json.loads((resolve_checkpoint(model) / "config.json").read_text())["max_position_embeddings"]
config = FitConfig(model=model, context_tokens=n, budget=budget, reserve=min(512, positions - n),
                   continuation=(16, 4, 2), repeat=(4, 1, 1), self_study=(4, 1, 1), answer_tokens=16,
                   epochs=1, ablations=False)
print(json.dumps(run_fit(config, out)["fit_seconds"]))
"""


def _call(cmd: list[str], what: str) -> None:
    print(f"[bench] {what}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {what} failed: {(done.stderr.strip() or 'no output').splitlines()[-1]}")


def make_bundles(ns: Sequence[int], work: Path, model: str, budget: float) -> list[Path]:
    """Fit a quick artifact and export both kinds for every n, skipping what already exists."""
    cli = [sys.executable, "-m", "nectar_export.cli"]
    bundles = []
    for n in ns:
        art, nectar, full = work / f"art-{n}", work / f"nectar-{n}", work / f"full-{n}"
        if not (art / "nectar.json").is_file():
            _call([sys.executable, "-c", FIT_SCRIPT, model, str(n), str(budget), str(art)], f"fit n={n}")
        for out, extra in ((nectar, []), (full, ["--baseline"])):
            if not (out / "bundle.json").is_file():
                _call(cli + ["export", str(art), "-o", str(out), *extra], f"export {out.name}")
        bundles += [nectar, full]
    return bundles


# -- report ------------------------------------------------------------------------------------------


def split_rows(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{"nectar": [...], "full": [...]} sorted by n, each row with exactly ROW_KEYS."""
    out: dict[str, list[dict[str, Any]]] = {"nectar": [], "full": []}
    for row in sorted(rows, key=lambda r: r["n"]):
        out[row["kind"]].append({k: row[k] for k in ROW_KEYS})
    return out


def ratios(table: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """ms/token at the largest n over the smallest n, per kind."""
    out = {}
    for kind, rows in table.items():
        if len(rows) >= 2 and rows[-1]["n"] > rows[0]["n"]:
            lo, hi = rows[0], rows[-1]
            ratio = round(hi["ms_per_token"] / lo["ms_per_token"], 4)
            out[kind] = {"n_small": lo["n"], "n_large": hi["n"], "ratio": ratio}
    return out


def format_table(table: dict[str, list[dict[str, Any]]], ratio: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'kind':<7}{'n':>7}{'ms/token':>10}{'prefill ms':>12}{'peak RSS MB':>13}{'bundle MB':>11}{'KV MB':>9}"]
    for kind, rows in table.items():
        for r in rows:
            lines.append(f"{kind:<7}{r['n']:>7}{r['ms_per_token']:>10.3f}{r['prefill_ms']:>12.2f}"
                         f"{r['peak_rss_mb']:>13.1f}{r['bundle_bytes'] / 1e6:>11.1f}{r['kv_bytes'] / 1e6:>9.2f}")
    for kind, r in ratio.items():
        verdict = f" (acceptance <= {ACCEPT_RATIO:.2f}: {'pass' if r['ratio'] <= ACCEPT_RATIO else 'FAIL'})" \
            if kind == "nectar" else ""
        lines.append(f"{kind}: ms/token at n={r['n_large']} is {r['ratio']:.3f}x n={r['n_small']}{verdict}")
    return "\n".join(lines)


def plot(table: dict[str, list[dict[str, Any]]], png: Path) -> None:
    """ms/token against n for both kinds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, label in (("nectar", "Nectar"), ("full", "full attention")):
        rows = table[kind]
        if rows:
            ax.plot([r["n"] for r in rows], [r["ms_per_token"] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context tokens n")
    ax.set_ylabel("median ms per decoded token")
    ax.set_title("Decode latency, ONNX Runtime CPU, batch 1")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# -- command line ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decode_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundles", nargs="+", default=[], type=Path, help="Bundle folders to measure.")
    p.add_argument("--make", action="store_true", help="Fit and export missing bundles under --work for --ns.")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="Where --make keeps artifacts and bundles.")
    p.add_argument("--ns", default=",".join(map(str, NS)), help="Context lengths for --make.")
    p.add_argument("--model", default="default", help="Model for --make.")
    p.add_argument("--budget", type=float, default=0.125, help="Nectar budget fraction for --make.")
    p.add_argument("--tokens", type=int, default=64, help="Measured decode steps per bundle.")
    p.add_argument("--warmup", type=int, default=8, help="Decode steps of the warm-up pass.")
    p.add_argument("--prompt-tokens", type=int, default=64, help="Length of the prefilled question.")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="Folder for the JSON and the PNG.")
    p.add_argument("--json", action="store_true", help="Print the rows as JSON (the table goes to stderr).")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        from nectar_runtime.errors import RUNTIME_ERRORS

        try:
            print(json.dumps(measure(args.child, args.tokens, args.warmup, args.prompt_tokens, args.threads)))
        except RUNTIME_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.tokens < 1 or args.warmup < 0:
        raise SystemExit("error: --tokens must be >= 1 and --warmup >= 0")
    bundles = list(args.bundles)
    if args.make:
        bundles += make_bundles([int(n) for n in args.ns.split(",")], args.work, args.model, args.budget)
    if not bundles:
        raise SystemExit("error: nothing to measure; pass --bundles DIR... or --make")
    rows = []
    for path in dict.fromkeys(bundles):          # in the given order: --make alternates kinds at each n
        print(f"[bench] measuring {path}", file=sys.stderr, flush=True)
        rows.append(run_child(path, args))
    table = split_rows(rows)
    ratio = ratios(table)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("tokens", "warmup", "prompt_tokens", "threads")}
    (args.out / "decode_latency.json").write_text(json.dumps({**table, "ratios": ratio, "settings": settings,
                                                              "runs": rows}, indent=2))
    plot(table, args.out / "decode_latency.png")
    text = format_table(table, ratio)
    print(text, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
