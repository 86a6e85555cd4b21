"""Decode latency against context length n: Nectar bundles beside full-attention baseline bundles (issue 4, part 6).

For every bundle, in a fresh subprocess (so peak RSS belongs to that bundle alone), on ONNX Runtime CPU,
batch 1: a warm-up pass (prefill + `--warmup` tokens), then a measured pass: prefill of a `--prompt-tokens`
question (64 by default) and `--tokens` (>= 64 for the acceptance run) forced one-token steps. Tokens are
fed regardless of the logits (no stop tokens), so every bundle decodes exactly the same number of steps.
Reported per bundle: median ms per decode step, prefill ms, peak RSS (ru_maxrss of the child), bundle bytes
(every file bundle.json lists) and the KV bytes held at the end of the measured pass (the bundle's context
tokens plus the new ones: the context's n tokens for full bundles, the exact tokens for Nectar ones).

Bundles come from `--bundles DIR...` (each bundle.json says its kind and n) and/or `--make`, which fits and
exports what is missing under `--work` for every n of `--ns`. Latency depends only on the graph's shapes,
not on how well the heads were fitted, so `--make` fits with few samples and one epoch (FitConfig's
"shape" recipe; quality is not measured here). It calls the fitting library rather than `nectar-export fit`
because `fit` reserves 512 new-token positions and SmolLM2 has 8192, which would refuse n = 8000; here the
reserve is min(512, positions - n) (192 at n = 8000, enough for 64 + 64 tokens).

Head size. With `--budget` (a fraction of the context's 2*n*d KV entries per layer and KV-head) the heads
grow with n, and so does their share of the per-token cost. With `--head-params P` every n gets heads of
P parameters per layer and KV-head (exact sink and window tokens included), which is how Nectar is meant to
be deployed: the graph's shapes, and so its cost, are then the same at every n; what changes with n is how
well heads of that size can fit the context (`nectar-export eval` measures that, not this script).
The Nectar bundles are named after the setting (`nectar-8000-h32768`), so both kinds of run share `--work`.

    python bench/decode_latency.py --make --head-params 32768 --work runs/bench   # the issue's run (long)
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
import sys
from pathlib import Path
from typing import Any, Sequence

import harness              # bench/harness.py: found beside this script (see its docstring)

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


def summarize_profile(trace: Path, last_runs: int) -> dict[str, Any]:
    """Per decode step, from ORT's trace: node count, node time, run time, and where node time goes.

    Node events are ORT's host-side view of each kernel (launch included); a step whose run time is far
    above the GPU's work points at launch and host overhead rather than memory traffic.
    """
    import statistics

    events = json.loads(trace.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-last_runs:]
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run: list[list[dict[str, Any]]] = [[] for _ in runs]
    for e in nodes:
        for i, (start, stop) in enumerate(runs):
            if start <= e["ts"] <= stop:
                per_run[i].append(e)
                break
    by_op: dict[str, float] = {}
    providers: dict[str, int] = {}
    for e in per_run[-1] if per_run else []:
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3
        provider = e.get("args", {}).get("provider", "?")
        providers[provider] = providers.get(provider, 0) + 1
    return {"runs": len(runs), "nodes_per_step": statistics.median(len(r) for r in per_run) if runs else 0,
            "node_ms_per_step": round(statistics.median(sum(e["dur"] for e in r) / 1e3 for r in per_run), 4)
            if runs else 0,
            "run_ms_per_step": round(statistics.median((b - a) / 1e3 for a, b in runs), 4) if runs else 0,
            "last_step_ms_by_op": dict(sorted(((k, round(v, 4)) for k, v in by_op.items()),
                                              key=lambda kv: -kv[1])[:15]),
            "last_step_nodes_by_provider": providers}


def measure(path: Path, tokens: int, warmup: int, prompt_tokens: int, threads: int | None,
            backend_name: str = "ort-cpu", profile: Path | None = None, cuda_graph: bool = True,
            check_hashes: bool = True) -> dict[str, Any]:
    """One bundle's row, measured in this process (run it in a fresh one).

    On ort-cuda the row also has `device_mem_mb`: the GPU's memory in use at the end of the measured pass
    (this process is meant to be the GPU's only user; the caller subtracts what was in use before it started).
    """
    import resource
    import statistics

    from nectar_runtime.backends import make_backend
    from nectar_runtime.bundle import load_bundle
    from nectar_runtime.errors import GenerationError
    from nectar_runtime.generator import forced_decode, load_tokenizer

    bundle = load_bundle(path, check_hashes=check_hashes)
    if prompt_tokens + max(tokens, warmup) > bundle.manifest.max_new_tokens:
        raise GenerationError(f"{path}: {prompt_tokens} prompt + {max(tokens, warmup)} tokens exceed the bundle's "
                              f"window of {bundle.manifest.max_new_tokens}")
    tokenizer = load_tokenizer(bundle)
    prompt, feed = bench_prompt(tokenizer, bundle, prompt_tokens), forced_tokens(tokenizer, max(tokens, warmup))
    options: dict[str, Any] = {"threads": threads} if backend_name == "ort-cpu" else {}
    if profile is not None:
        options["profile"] = str(profile)
    if backend_name == "ort-cuda" and not cuda_graph:
        options["cuda_graph"] = False
    with make_backend(bundle, backend_name, **options) as backend:
        forced_decode(backend, prompt, feed[:warmup])                      # warm-up: first-run allocations
        result = forced_decode(backend, prompt, feed[:tokens])
        kv_bytes = kv_bytes_held(bundle, len(prompt) + tokens)
        device_mem = harness.gpu_mem_used_mb() if backend_name == "ort-cuda" else None
        graphed = bool(getattr(backend, "cuda_graph", False))
        trace = summarize_profile(Path(backend.end_profiling()), tokens) if profile is not None else None
    return {"kind": bundle.kind, "n": bundle.manifest.n, "ms_per_token": round(statistics.median(result.token_ms), 4),
            "prefill_ms": round(result.prefill_ms, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "bundle_bytes": sum(e.bytes for e in bundle.manifest.files.values()), "kv_bytes": kv_bytes,
            "bundle": str(path), "nectar_params": bundle.manifest.graph.get("nectar_params", 0),
            "tokens": tokens, "prompt_tokens": prompt_tokens, "backend": backend_name, "cuda_graph": graphed,
            "cache_layout": "static" if bundle.static else "dynamic",
            **({"device_mem_mb": device_mem} if device_mem is not None else {}),
            **({"profile": trace} if trace is not None else {})}


def kv_bytes_held(bundle: Any, new_tokens: int) -> int:
    """Bytes of the KV a bundle's step reads after `new_tokens` new tokens (its context tokens included)."""
    m = bundle.manifest
    tokens = new_tokens + m.cached_tokens
    item = {"float32": 4, "float16": 2, "bfloat16": 2}[m.kv_dtype]
    return 2 * m.layers * m.kv_heads * m.head_dim * tokens * item


def measure_in_child(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """measure() in a fresh interpreter (this script with --child); its last stdout line is the row."""
    cmd = harness.python_cmd(__file__, "--child", path, "--tokens", args.tokens, "--warmup", args.warmup,
                             "--prompt-tokens", args.prompt_tokens)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.backend != "ort-cpu":
        cmd += ["--backend", args.backend]
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    if args.no_cuda_graph:
        cmd += ["--no-cuda-graph"]
    if args.no_hash_check:
        cmd += ["--no-hash-check"]
    try:
        return harness.run_json_child(cmd)
    except harness.ChildError as exc:
        raise SystemExit(f"error: measuring {path} failed: {exc.last}") from None


# -- making bundles ----------------------------------------------------------------------------------


FIT_SCRIPT = """
import json, sys
from pathlib import Path
from nectar_export.config import FitConfig
from nectar_export.models import resolve_checkpoint
from nectar_export.fit import run_fit
model, n, heads, out = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
positions = json.loads((resolve_checkpoint(model) / "config.json").read_text())["max_position_embeddings"]
config = FitConfig.recipe("shape", model=model, context_tokens=n, **heads, reserve=min(512, positions - n))
print(json.dumps(run_fit(config, out)["fit_seconds"]))
"""


def _call(cmd: list[str], what: str) -> None:
    print(f"[bench] {what}", file=sys.stderr, flush=True)
    try:
        harness.run_child(cmd)
    except harness.ChildError as exc:
        raise SystemExit(f"error: {what} failed: {exc.last}") from None


def make_bundles(ns: Sequence[int], work: Path, model: str, budget: float, head_params: int | None) -> list[Path]:
    """Fit a quick artifact and export both kinds for every n, skipping what already exists."""
    cli = [sys.executable, "-m", "nectar_export.cli"]
    heads = {"head_params": head_params} if head_params else {"budget": budget}
    tag = f"-h{head_params}" if head_params else ("" if budget == 0.125 else f"-b{budget:g}")
    bundles = []
    for n in ns:
        art, nectar, full = work / f"art-{n}{tag}", work / f"nectar-{n}{tag}", work / f"full-{n}"
        if not (art / "nectar.json").is_file():
            _call([sys.executable, "-c", FIT_SCRIPT, model, str(n), json.dumps(heads), str(art)], f"fit n={n}")
        for out, extra in ((nectar, []), (full, ["--baseline"])):      # full: the context is all that matters
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
    harness.plot_lines({"Nectar": table["nectar"], "full attention": table["full"]},
               "Decode latency, ONNX Runtime CPU, batch 1", png)


# -- command line ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="decode_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundles", nargs="+", default=[], type=Path, help="Bundle folders to measure.")
    p.add_argument("--make", action="store_true", help="Fit and export missing bundles under --work for --ns.")
    p.add_argument("--work", type=Path, default=Path("runs/bench"), help="Where --make keeps artifacts and bundles.")
    p.add_argument("--ns", default=",".join(map(str, NS)), help="Context lengths for --make.")
    p.add_argument("--model", default="default", help="Model for --make.")
    p.add_argument("--budget", type=float, default=0.125, help="Nectar budget fraction for --make.")
    p.add_argument("--head-params", type=int, default=None,
                   help="Heads of this many parameters per layer and KV-head at every n, for --make (beats --budget).")
    p.add_argument("--tokens", type=int, default=64, help="Measured decode steps per bundle.")
    p.add_argument("--warmup", type=int, default=8, help="Decode steps of the warm-up pass.")
    p.add_argument("--prompt-tokens", type=int, default=64, help="Length of the prefilled question.")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
    p.add_argument("--backend", choices=("ort-cpu", "ort-cuda"), default="ort-cpu",
                   help="Runtime backend (the issue-4 table is ort-cpu; bench/gpu_decode.py uses ort-cuda).")
    p.add_argument("--no-cuda-graph", action="store_true", help="ort-cuda: plain runs even for static bundles.")
    p.add_argument("--no-hash-check", action="store_true", help="Skip the sha256 of each bundle's files at load.")
    p.add_argument("--profile", type=Path, default=None,
                   help="ORT trace file prefix; rows get a per-step summary of it (node counts and times).")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="Folder for the JSON and the PNG.")
    p.add_argument("--json", action="store_true", help="Print the rows as JSON (the table goes to stderr).")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child:
        from nectar_runtime.errors import NectarError

        try:
            print(json.dumps(measure(args.child, args.tokens, args.warmup, args.prompt_tokens, args.threads,
                                     args.backend, args.profile, not args.no_cuda_graph, not args.no_hash_check)))
        except NectarError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.tokens < 1 or args.warmup < 0:
        raise SystemExit("error: --tokens must be >= 1 and --warmup >= 0")
    bundles = list(args.bundles)
    if args.make:
        bundles += make_bundles([int(n) for n in args.ns.split(",")], args.work, args.model, args.budget,
                                args.head_params)
    if not bundles:
        raise SystemExit("error: nothing to measure; pass --bundles DIR... or --make")
    rows = []
    for path in dict.fromkeys(bundles):          # in the given order: --make alternates kinds at each n
        print(f"[bench] measuring {path}", file=sys.stderr, flush=True)
        rows.append(measure_in_child(path, args))
    table = split_rows(rows)
    ratio = ratios(table)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("tokens", "warmup", "prompt_tokens", "threads", "backend")}
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
