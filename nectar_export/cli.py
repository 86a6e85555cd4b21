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

QUICK = {"continuation": (24, 4, 12), "repeat": (8, 2, 4), "self_study": (24, 4, 20), "epochs": 12}


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as one line and exit non-zero, without a traceback."""
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
              help="'default' (SmolLM2-135M-Instruct), a Hugging Face checkpoint directory or a .gguf file.")
@click.option("--context", default="default", show_default=True,
              help="'default' (Python reference manual), a UTF-8 file, or a directory of files.")
@click.option("--context-tokens", type=int, default=4096, show_default=True,
              help="Context length n: chat prefix plus a deterministic prefix of the document.")
@click.option("--prompts", type=click.Path(dir_okay=False), default=None,
              help="Extra training questions: one per line, or JSONL with a 'prompt' field.")
@click.option("--budget", type=float, default=0.125, show_default=True,
              help="Parameters as a fraction of the context's KV entries (2*n*d per layer and KV-head).")
@click.option("--allocation", type=click.Choice(["adaptive", "uniform"]), default="adaptive", show_default=True)
@click.option("--family", type=click.Choice(["mlp", "quadrature"]), default="mlp", show_default=True)
@click.option("--sinks", type=int, default=4, show_default=True, help="First context tokens kept as exact KV.")
@click.option("--window", type=int, default=None,
              help="Last context tokens kept as exact KV [default: an eighth of the budget, 64 at n=4096].")
@click.option("--epochs", type=int, default=None, help="Maximum epochs per layer (early stopping may end sooner).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--ablations/--no-ablations", default=True, show_default=True,
              help="Also fit the quadrature and uniform-allocation baselines at equal parameters.")
@click.option("--quick", is_flag=True, help="Fewer samples and epochs: a demo in minutes, lower quality.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Artifact folder to write.")
@friendly_errors
def fit(output: str, quick: bool, epochs: int | None, **options: Any) -> None:
    """Fit Nectar heads for a model and a document and write the artifact."""
    from nectar_export.config import FitConfig

    config = FitConfig(**options, **(QUICK if quick else {}))
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)

    from nectar_export.pipeline import run_fit

    metrics = run_fit(config, Path(output))
    click.echo(f"wrote {output}: {metrics['nectar_params']:,} parameters for {metrics['kv_entries']:,} KV entries "
               f"({metrics['params_over_kv']:.3f}); fitting took {metrics['fit_seconds']:.0f} s")


@main.command("eval")
@click.argument("artifact", type=click.Path())
@click.option("--model", default=None, help="Model to load instead of the one recorded in the artifact.")
@click.option("--questions", type=int, default=None, help="Use at most this many held-out questions.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@friendly_errors
def evaluate(artifact: str, model: str | None, questions: int | None, as_json: bool) -> None:
    """Measure an artifact against full attention and the baselines on held-out text."""
    from nectar_export.evaluate import run_eval
    from nectar_export.report import table

    report = run_eval(Path(artifact), model, questions)
    click.echo(json.dumps(report, indent=2) if as_json else table(report))


if __name__ == "__main__":
    main()
