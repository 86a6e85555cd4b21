"""`fit --target-agreement A`: fit at the smallest budget whose validation top-1 reaches A, and record the search.

What the fits share is computed once (fit.record: the model, the context's cache, the samples, the train and
validation queries under full attention and their attention mass); each tried budget recomputes only what the
budget moves: the exact tokens, the targets over the modeled rest, the layers' difficulty, and the 'nectar' fit.
Each trial starts from the random state a plain `fit --budget B` has at that point, so a trial's heads are the
ones `fit --budget B` writes. The ablations are fitted once, at the chosen budget, after the choice.

The score is the teacher-forced top-1 agreement with full attention on the validation split's headline sources
(as `bench/quality_curve.py` measures `val_top1`). The test split is read once, after the choice, to report how
far test agreement lands from A. Trials live in memory (the heads are small); the artifact is written once, by
save_artifact's atomic rename, so an interrupted search leaves nothing at -o. When no budget in the range reaches
A, nothing is written and the error line lists every trial.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from nectar_export.artifact import check_output
from nectar_export.budget_search import BudgetSearch, SearchResult, search_budget
from nectar_export.config import FitConfig
from nectar_export.errors import NectarError, NectarInternalError
from nectar_export.evaluate import heads_contexts, teacher_forced
from nectar_export.fit import Recorded, Stopwatch, fit_variants, layer_budget, layer_sets, load, record, variant_plans, write
from nectar_export.heads import Pair
from nectar_export.samples import Sample
from nectar_graphs.files import writing

METRIC = "teacher-forced top-1 agreement with full attention, validation split, headline sources"


def run_fit_to_target(config: FitConfig, search: BudgetSearch, out: Path, device: str = "cpu",
                      overwrite: bool = False) -> dict[str, Any]:
    """Search the budget (module docstring), write the chosen fit's artifact to `out`, return its fit metrics
    (with `budget_search`). config.budget and config.head_params are ignored: the search sets the budget."""
    if config.head_params is not None:
        raise NectarError("--target-agreement sizes the budget itself; drop --head-params")
    with writing(out):
        check_output(out, overwrite)
        clock = Stopwatch()
        base = load(config, device, clock)
        layer_budget(dataclasses.replace(config, budget=search.high), base.context.n, base.shape["head_dim"])
        recorded = record(config, base, clock)
        trials = Trials(config, search.target, recorded, clock)
        result = search_budget(trials.measure, search)
        if result.chosen is None:
            raise NectarError(unreached(search, result))
        return finish(config, search, result, trials, out, overwrite)


@dataclass
class Kept:
    """The smallest trial so far that reaches the target: its heads, their report, and the random state its fit
    left (where a plain fit would go on to the ablations)."""

    budget: float
    pairs: list[Pair]
    report: dict[str, Any]
    rng_after: torch.Tensor


class Trials:
    """measure(budget) for search_budget: one 'nectar' fit at that budget, scored on the validation split."""

    def __init__(self, config: FitConfig, target: float, recorded: Recorded, clock: Stopwatch):
        self.config, self.target, self.recorded, self.clock = config, target, recorded, clock
        self.rng_start = torch.get_rng_state()
        self.rows: list[dict[str, Any]] = []
        self.kept: Kept | None = None

    def measure(self, budget: float) -> float | None:
        config = dataclasses.replace(self.config, budget=budget, ablations=False)
        recorded = self.recorded
        try:
            net = layer_budget(config, recorded.context.n, recorded.shape["head_dim"])
        except NectarError as exc:
            self.rows.append({"budget": budget, "val_top1": None, "unfittable": str(exc)})
            progress(f"budget search: {budget:.4g} of the KV entries is too small to fit ({exc})")
            return None
        torch.set_rng_state(self.rng_start)
        start = time.perf_counter()
        sets = layer_sets(recorded, config, self.clock)
        heads, reports = fit_variants(config, sets, net, recorded.shape, recorded.cache, self.clock)
        rng_after = torch.get_rng_state()
        fitted = time.perf_counter()
        score = self.clock.run("search_validation", lambda: agreement(recorded, sets.exact, heads["nectar"],
                                                                      recorded.samples.splits["val"], "validation"))
        self.rows.append({"budget": budget, "val_top1": score["top1"], "val_kl": score["kl"],
                          "val_tokens": score["tokens"], "val_repeat_top1": score["repeat_top1"],
                          "nectar_params": reports["nectar"]["params"],
                          "fit_seconds": round(fitted - start, 2),
                          "validation_seconds": round(time.perf_counter() - fitted, 2)})
        reached = score["top1"] >= self.target
        if reached and (self.kept is None or budget < self.kept.budget):
            self.kept = Kept(budget, heads["nectar"], reports["nectar"], rng_after)
        progress(f"budget search: {budget:.4g} of the KV entries: validation top-1 {score['top1']:.4f} "
                 f"(KL {score['kl']:.4f}, {score['tokens']} tokens), {'reaches' if reached else 'below'} "
                 f"{self.target}; fit {fitted - start:.0f} s")
        return score["top1"]


def finish(config: FitConfig, search: BudgetSearch, result: SearchResult, trials: Trials, out: Path,
           overwrite: bool) -> dict[str, Any]:
    """The chosen budget's artifact: its 'nectar' heads from the search, the ablations fitted now, the test split's
    agreement measured after the choice, and the search's record."""
    kept, recorded, clock = trials.kept, trials.recorded, trials.clock
    if kept is None or kept.budget != result.chosen:
        raise NectarInternalError(f"the kept trial ({kept and kept.budget}) is not the chosen budget {result.chosen}")
    chosen = dataclasses.replace(config, budget=kept.budget)
    torch.set_rng_state(trials.rng_start)
    sets = layer_sets(recorded, chosen, clock)                    # the chosen trial's targets again (not kept)
    heads, reports = {"nectar": kept.pairs}, {"nectar": kept.report}
    if len(variant_plans(chosen)) > 1:
        torch.set_rng_state(kept.rng_after)
        net = layer_budget(chosen, recorded.context.n, recorded.shape["head_dim"])
        more, more_reports = fit_variants(chosen, sets, net, recorded.shape, recorded.cache, clock,
                                          only=[v for v in variant_plans(chosen) if v != "nectar"])
        heads.update(more)
        reports.update(more_reports)
    test = clock.run("test_agreement", lambda: agreement(recorded, sets.exact, kept.pairs,
                                                         recorded.samples.splits["test"], "test"))
    log = search_record(search, result, trials.rows, test, config.ablations)
    progress(f"budget search: chose {kept.budget:.4g} after {result.fits} fits ({result.stop}); test top-1 "
             f"{test['top1']:.4f}, {test['top1'] - search.target:+.4f} from the target")
    return write(out, overwrite, chosen, recorded, sets, heads, reports, clock, {"budget_search": log})


def agreement(recorded: Recorded, exact: Sequence[torch.Tensor], pairs: list[Pair], samples: Sequence[Sample],
              split: str) -> dict[str, Any]:
    """The heads' headline top-1 and KL against full attention on `samples` (and repeat top-1 where present)."""
    cache = recorded.cache
    methods = {"full": cache.exact(), "nectar": heads_contexts(pairs, cache, exact)}
    scores = teacher_forced(recorded.model, list(samples), methods, recorded.context.n)["nectar"]
    headline = scores["headline"]
    if headline["tokens"] == 0:
        raise NectarError(f"the {split} split holds no continuation, self-study or prompt tokens to measure "
                          "agreement on; --target-agreement needs them (raise the recipe's sample counts)")
    return {"top1": headline["top1"], "kl": headline["kl"], "tokens": headline["tokens"],
            "repeat_top1": scores.get("repeat", {}).get("top1")}


def search_record(search: BudgetSearch, result: SearchResult, rows: list[dict[str, Any]], test: dict[str, Any],
                  ablations: bool) -> dict[str, Any]:
    """nectar.json's `budget_search`: the settings, every trial in the order measured, the choice, the test split."""
    chosen = next(row for row in rows if row["budget"] == result.chosen)
    return {**search.to_json(), "metric": METRIC, "trials": rows, "fits": result.fits, "stop": result.stop,
            "bracket": list(result.bracket), "chosen_budget": result.chosen, "chosen_val_top1": chosen["val_top1"],
            "ablations": "fitted at the chosen budget only" if ablations else None,
            "test_top1": test["top1"], "test_kl": test["kl"], "test_tokens": test["tokens"],
            "test_repeat_top1": test["repeat_top1"], "test_minus_target": round(test["top1"] - search.target, 5)}


def unreached(search: BudgetSearch, result: SearchResult) -> str:
    """The one-line error when no measured budget reaches the target."""
    tried = ", ".join(f"{b:.4g}: {'too small' if s is None else f'{s:.4f}'}" for b, s in sorted(result.trials))
    more = "raise --max-fits, " if result.stop == "max_fits" else ""
    return (f"no budget in [{search.low:.4g}, {search.high:.4g}] reaches validation top-1 {search.target} "
            f"in {result.fits} fit{'' if result.fits == 1 else 's'} (budget: top-1 {tried}); nothing was written: {more}lower --target-agreement "
            "or raise the --budget-range's upper end")


def progress(line: str) -> None:
    """One line of the search's progress on stderr, between tqdm's bars."""
    tqdm.write(line, file=sys.stderr)
