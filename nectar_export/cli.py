"""The `nectar-export` command line. Heavy imports live inside the commands so --help is instant."""

from __future__ import annotations

import dataclasses
import json
import sys
from functools import wraps
from pathlib import Path
from typing import Any, Callable

import click

from nectar_export.errors import NectarError
from nectar_runtime.backends import BACKEND_NAMES

NO_HASH_CHECK = click.option("--no-hash-check", is_flag=True,
                             help="Skip the sha256 of the bundle's files at load (sizes and paths are still checked).")


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error (any NectarError, the root of every stage's errors) as one line and exit 2, without a
    traceback; anything else is a bug and keeps its traceback."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NectarError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
    return wrapper


@click.group()
@click.version_option(package_name="nectar-export")
def main() -> None:
    """Compile a long fixed document into Nectar heads that replace its KV cache."""


@main.command()
@click.option("--model", default="default", show_default=True,
              help="'default' (SmolLM2-135M-Instruct), 'gemma3-270m' (Gemma 3 270M base; the gemma extra), a Hugging Face "
                   "checkpoint directory or a .gguf file.")
@click.option("--context", default="default", show_default=True,
              help="'default' (Python reference manual), a shipped document ('manual-4k', 'license-4k'), a UTF-8 file, "
                   "or a directory of files.")
@click.option("--context-tokens", type=int, default=4096, show_default=True,
              help="Context length n: chat prefix plus a deterministic prefix of the document.")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None,
              help="Extra training questions: one per line, or JSONL with a 'prompt' field.")
@click.option("--budget", type=float, default=None,
              help="Parameters as a fraction of the context's KV entries (2*n*d per layer and KV-head).  "
                   "[default: 0.125]")
@click.option("--head-params", type=int, default=None,
              help="Parameters per layer and KV-head, exact tokens included, whatever n is (replaces --budget): "
                   "heads of one size, so per-token cost does not depend on n.")
@click.option("--allocation", type=click.Choice(["adaptive", "uniform"]), default="adaptive", show_default=True)
@click.option("--family", type=click.Choice(["mlp", "quadrature"]), default="mlp", show_default=True)
@click.option("--sinks", type=int, default=4, show_default=True, help="First context tokens kept as exact KV.")
@click.option("--window", type=int, default=None,
              help="Last context tokens kept as exact KV [default: an eighth of the budget, 64 at n=4096].")
@click.option("--salient", type=float, default=0.0, show_default=True,
              help="Share of the budget spent on salient exact tokens: per layer and KV-head, the context tokens "
                   "the training queries attend to most stay exact KV; the networks model the rest.")
@click.option("--coverage/--no-coverage", default=True, show_default=True,
              help="When the document fits whole: train on queries over every passage (held-out ones are shifted "
                   "spans and other questions) instead of holding out a fifth of the document.")
@click.option("--reserve", type=int, default=512, show_default=True,
              help="New-token positions kept free after the context (the bundle's prompt + answer window).")
@click.option("--epochs", type=int, default=None, help="Maximum epochs per layer (early stopping may end sooner).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ablations/--no-ablations", default=True, show_default=True,
              help="Also fit the quadrature and uniform-allocation baselines at equal parameters.")
@click.option("--quick", is_flag=True, help="Fewer samples and epochs: a demo in minutes, lower quality.")
@click.option("--target-agreement", type=float, default=None,
              help="Size the budget itself: fit at the smallest budget whose validation top-1 agreement with full "
                   "attention reaches this value in (0, 1), searched in factors of 2 and bisection (replaces "
                   "--budget and --head-params).")
@click.option("--budget-range", type=(float, float), default=None,
              help="With --target-agreement: the budgets searched, LOW HIGH  [default: 0.015625 0.5]")
@click.option("--max-fits", type=int, default=None,
              help="With --target-agreement: at most this many fits  [default: 8]")
@click.option("--device", default="cpu", show_default=True, help="Where to fit: cpu, cuda or cuda:N.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Artifact folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier artifact at -o (never a folder holding other files).")
@friendly_errors
def fit(output: str, quick: bool, epochs: int | None, device: str, overwrite: bool, target_agreement: float | None,
        budget_range: tuple[float, float] | None, max_fits: int | None, **options: Any) -> None:
    """Fit Nectar heads for a model and a document and write the artifact."""
    from nectar_export.config import FitConfig

    search = budget_search(target_agreement, budget_range, max_fits, options)
    config = FitConfig.recipe("quick" if quick else "default",
                              **{k: v for k, v in options.items() if k != "budget" or v is not None})
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)

    if search is None:
        from nectar_export.fit import run_fit

        metrics = run_fit(config, Path(output), device, overwrite)
    else:
        from nectar_export.fit_target import run_fit_to_target

        metrics = run_fit_to_target(config, search, Path(output), device, overwrite)
        log = metrics["budget_search"]
        click.echo(f"chose budget {log['chosen_budget']:.4g} in {log['fits']} fits: validation top-1 "
                   f"{log['chosen_val_top1']:.4f} >= {log['target_agreement']}; test top-1 {log['test_top1']:.4f} "
                   f"({log['test_minus_target']:+.4f} from the target)")
    click.echo(f"wrote {output}: {metrics['nectar_params']:,} parameters for {metrics['kv_entries']:,} KV entries "
               f"({metrics['params_over_kv']:.3f}); fitting took {metrics['fit_seconds']:.0f} s")


def budget_search(target: float | None, budget_range: tuple[float, float] | None, max_fits: int | None,
                  options: dict[str, Any]) -> Any:
    """fit's budget search settings (nectar_export.budget_search.BudgetSearch), or None without --target-agreement;
    refuses the flags that do not go together."""
    from nectar_export.budget_search import BudgetSearch

    if target is None:
        given = [flag for flag, value in (("--budget-range", budget_range), ("--max-fits", max_fits)) if value is not None]
        if given:
            raise NectarError(f"{' and '.join(given)} only {'go' if len(given) > 1 else 'goes'} with --target-agreement")
        return None
    given = [flag for flag, key in (("--budget", "budget"), ("--head-params", "head_params")) if options[key] is not None]
    if given:
        raise NectarError(f"--target-agreement sizes the budget itself; drop {' and '.join(given)}")
    settings: dict[str, Any] = {"target": target}
    if budget_range is not None:
        settings["low"], settings["high"] = budget_range
    if max_fits is not None:
        settings["max_fits"] = max_fits
    return BudgetSearch(**settings)


@main.command("eval")
@click.argument("artifact", type=click.Path())
@click.option("--model", default=None, help="Model to load instead of the one recorded in the artifact.")
@click.option("--questions", type=int, default=None, help="Use at most this many held-out questions.")
@click.option("--qa", default=None,
              help="Also score answers to a QA file (JSONL: question, answer, split; or a shipped set: 'manual-4k', 'license-4k').")
@click.option("--device", default="cpu", show_default=True, help="Where to run: cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@friendly_errors
def evaluate(artifact: str, model: str | None, questions: int | None, qa: str | None, device: str,
             as_json: bool) -> None:
    """Measure an artifact against full attention and the baselines on held-out text."""
    from nectar_export.evaluate import run_eval
    from nectar_export.report import table
    from nectar_graphs.files import check_writable

    if Path(artifact).expanduser().is_dir():
        check_writable(Path(artifact))        # eval stores its report in nectar.json: refuse now, not after the work
    report = run_eval(Path(artifact), model, questions, qa, device)
    click.echo(json.dumps(report, indent=2) if as_json else table(report))


@main.command("export")
@click.argument("artifact", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int4"]), default="fp32", show_default=True,
              help="Weights and arithmetic; RMS normalization and rotary matrices stay fp32. int4: the base's "
                   "projections and lm_head as 4-bit weights (ONNX Runtime's MatMulNBits), the rest in fp16.")
@click.option("--baseline", is_flag=True, help="Export the full-attention graph (context KV as past input) instead.")
@click.option("--all-logits", is_flag=True, help="Return logits for every new token, not only the last.")
@click.option("--variant", default="nectar", show_default=True, help="Which head set of the artifact to export.")
@click.option("--model", default=None, help="Model to load instead of the one recorded in the artifact.")
@click.option("--device", default="cpu", show_default=True,
              help="Where to prefill the context (cpu, cuda, cuda:N); tracing always runs on the CPU.")
@click.option("--cache", type=click.Choice(["dynamic", "static"]), default=None,
              help="KV layout: 'static' keeps fixed KV buffers written in place, so a GPU step can be a CUDA graph. "
                   "[default: dynamic; static with --ops ort]")
@click.option("--overwrite", is_flag=True, help="Replace an earlier bundle at -o (never a folder holding other files).")
@click.option("--ops", type=click.Choice(["portable", "ort"]), default="portable", show_default=True,
              help="portable: standard ONNX operators (the TensorRT input); ort: ONNX Runtime's contrib operators "
                   "(GroupQueryAttention, SkipSimplifiedLayerNormalization, ...), fp32 or fp16, with --cache static.")
@click.option("--base", is_flag=True,
              help="Write a base bundle: the graph with the heads as inputs and no document inside; documents "
                   "then ship as packs (`nectar-export pack ARTIFACT --base BASE`).")
@friendly_errors
def export_command(artifact: str, output: str, **options: Any) -> None:
    """Fuse an artifact's heads with the base decoder into an ONNX bundle."""
    from nectar_export.export import ExportConfig, run_export

    if options["cache"] is None:
        options["cache"] = "static" if options["ops"] == "ort" else "dynamic"
    manifest = run_export(ExportConfig(artifact=Path(artifact), output=Path(output), **options))
    graph = manifest.graph
    click.echo(f"wrote {output}: {manifest.kind} {manifest.precision} graph, "
               f"{manifest.files['model.onnx'].bytes:,} bytes, {sum(graph['op_counts'].values())} nodes; "
               f"lint: {len(graph['lint']['unsupported_ops']) + len(graph['lint']['custom_domain_ops'])} operators TensorRT lacks")


@main.command()
@click.argument("artifact", type=click.Path())
@click.option("--base", "base", required=True, type=click.Path(), help="The base bundle the pack runs on.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Pack folder to write.")
@click.option("--variant", default="nectar", show_default=True, help="Which head set of the artifact to pack.")
@click.option("--model", default=None, help="Model to load instead of the one recorded in the artifact.")
@click.option("--device", default="cpu", show_default=True, help="Where to prefill the document's exact tokens.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier pack at -o.")
@NO_HASH_CHECK
@friendly_errors
def pack(artifact: str, base: str, output: str, no_hash_check: bool, **options: Any) -> None:
    """Write an artifact's document as a pack for a base bundle: its heads and exact tokens' KV, no base weights."""
    from nectar_export.pack import PackConfig, run_pack

    written = run_pack(PackConfig(artifact=Path(artifact), base=Path(base), output=Path(output),
                                  check_hashes=not no_hash_check, **options))
    size = sum(entry.bytes for entry in written.files.values())
    click.echo(f"wrote {output}: pack of {written.n} context tokens ({written.cached_tokens} exact) for "
               f"{written.layout.describe()}, {size:,} bytes")


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--prompts", type=int, default=24, show_default=True, help="Held-out questions to run.")
@click.option("--steps", type=int, default=10, show_default=True, help="Greedy decode steps after each prompt.")
@click.option("--backend", default="ort-cpu", show_default=True, type=click.Choice(BACKEND_NAMES),
              help="Where the graph runs; the logits and the present KV are compared on every backend.")
@click.option("--model", default=None, help="Model to load instead of the one recorded in the bundle.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--pack", default=None, type=click.Path(), help="For a base bundle: the pack to verify on it.")
@NO_HASH_CHECK
@friendly_errors
def verify(bundle: str, prompts: int, steps: int, backend: str, model: str | None, as_json: bool,
           no_hash_check: bool, pack: str | None) -> None:
    """Run a bundle in ONNX Runtime beside the torch model and report the logit gaps."""
    from nectar_export.verify import run_verify

    report = run_verify(Path(bundle), prompts, steps, backend, model, check_hashes=not no_hash_check,
                        pack=Path(pack) if pack else None)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['kind']} {report['precision']} on {report['backend']}: {report['prompts']} prompts x "
               f"{report['steps_per_prompt']} steps, top1_match {report['top1_match']:.4f}, "
               f"max_abs_logit_diff {report['max_abs_logit_diff']:.3g} "
               f"(median {report['median_abs_logit_diff']:.3g}), fusions {report['fusion_counts']}")


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--engine", type=click.Choice(["tensorrt"]), default="tensorrt", show_default=True)
@click.option("--profile", default=None,
              help="Largest shapes for the optimization profile, e.g. 'batch=1,sequence=128,past=512'.")
@NO_HASH_CHECK
@friendly_errors
def build(bundle: str, engine: str, profile: str | None, no_hash_check: bool) -> None:
    """Build an inference engine (TensorRT) from a bundle's ONNX graph and add it to the bundle."""
    from nectar_export.engine import build_tensorrt

    info = build_tensorrt(Path(bundle), profile, check_hashes=not no_hash_check)
    click.echo(f"wrote {Path(bundle) / info['file']} (TensorRT {info['tensorrt_version']}, "
               f"{info['build_seconds']:.0f} s)")


def decoding_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options run and chat share: backend and sampling."""
    options = [
        click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Answer tokens at most."),
        click.option("--backend", type=click.Choice(BACKEND_NAMES), default="ort-cpu", show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k likeliest (0: off)."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (1: off)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--pack", default=None, type=click.Path(),
                     help="For a base bundle: the pack of the document to answer about."),
        NO_HASH_CHECK,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _sampling(options: dict[str, Any]) -> Any:
    from nectar_runtime.sampling import Sampling

    return Sampling(**{k: options[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")})


def _echo_text(text: str) -> None:
    click.echo(text, nl=False)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--prompt", required=True, help="The question about the bundle's document.")
@click.option("--stream", is_flag=True, help="Print the answer as it is produced.")
@decoding_options
@friendly_errors
def run(bundle: str, prompt: str, stream: bool, backend: str, no_hash_check: bool, pack: str | None,
        **options: Any) -> None:
    """Answer one question with a bundle (torch-free runtime); the last line gives the measured latency."""
    from nectar_runtime.generator import Generator

    sampling = _sampling(options)
    with Generator(bundle, backend, check_hashes=not no_hash_check, pack=pack) as generator:
        result = generator.generate(prompt, sampling, on_text=_echo_text if stream else None)
    click.echo("" if stream else result.text)
    click.echo(result.timing_line(backend))


@main.command()
@click.argument("bundle", type=click.Path())
@decoding_options
@friendly_errors
def chat(bundle: str, backend: str, no_hash_check: bool, pack: str | None, **options: Any) -> None:
    """Ask questions about the bundle's document, one per line (each a fresh question); an empty line or EOF ends."""
    from nectar_runtime.errors import GenerationError
    from nectar_runtime.generator import Generator

    sampling = _sampling(options)
    interactive = sys.stdin.isatty()
    with Generator(bundle, backend, check_hashes=not no_hash_check, pack=pack) as generator:
        while True:
            if interactive:
                click.echo("> ", nl=False, err=True)
            line = sys.stdin.buffer.readline()
            if not line.strip():
                break
            try:
                question = line.decode("utf-8").strip()
            except UnicodeDecodeError as exc:       # one bad line does not end the session either
                click.echo(f"error: the question is not valid UTF-8 (byte {exc.start}); pass UTF-8 text", err=True)
                continue
            try:
                result = generator.generate(question, sampling, on_text=_echo_text)
            except GenerationError as exc:          # one bad question does not end the session
                click.echo(f"error: {exc}", err=True)
                continue
            click.echo("")
            click.echo(result.timing_line(backend))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@friendly_errors
def bench(args: tuple[str, ...]) -> None:
    """Decode latency of Nectar and full-attention bundles against n (bench/decode_latency.py; --help there)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / "decode_latency.py"
    if not script.is_file():
        raise NectarError(f"{script} not found: the benchmark runs from a source checkout of nectar-export")
    # run as a program, as `python bench/decode_latency.py` is: its sibling modules (bench/harness.py) resolve
    sys.exit(subprocess.call([sys.executable, str(script), *args]))


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def serve(args: tuple[str, ...]) -> None:
    """Serve bundles and packs over an OpenAI-compatible HTTP API (nectar_runtime.serve, torch-free; --help there)."""
    from nectar_runtime.serve import main as serve_main

    sys.exit(serve_main(list(args), prog="nectar-export serve"))


if __name__ == "__main__":
    main()
