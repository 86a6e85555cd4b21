"""nectar_export/fit_target.py: `fit --target-agreement` end to end on the tiny checkpoint (a whole document, the
quick recipe, one epoch): the search's record in nectar.json, the choice, the unreachable case, flag conflicts."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import run_cli


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    from nectar_export.context import load_document

    path = tmp_path_factory.mktemp("target") / "doc.txt"
    path.write_text(load_document("manual-4k").text[:1500])
    return path


def search(tiny_ckpt, document, out, *flags):
    return run_cli("fit", "--model", str(tiny_ckpt), "--context", str(document), "--quick", "--epochs", "1",
                   "--no-ablations", *flags, "-o", str(out))


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_ckpt, document):
    """A search for a target every fittable budget of the tiny model reaches: it steps down to the range's end."""
    out = tmp_path_factory.mktemp("searched") / "art"
    result = search(tiny_ckpt, document, out, "--target-agreement", "1e-6")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_search_records_every_trial_and_writes_the_smallest_reaching_budget(searched):
    from nectar_export.artifact import read_manifest

    out, result = searched
    manifest = read_manifest(out)
    log = manifest.fit["budget_search"]
    trials = log["trials"]
    assert [t["budget"] for t in trials[:2]] == [0.125, 0.0625]             # the start, then a factor of 2 down
    assert len(trials) == len({t["budget"] for t in trials}) and log["fits"] <= log["max_fits"]
    reaching = [t["budget"] for t in trials if t["val_top1"] is not None and t["val_top1"] >= 1e-6]
    assert log["chosen_budget"] == min(reaching) == manifest.config.budget
    assert all(t["val_top1"] is None or t["val_top1"] < 1e-6 for t in trials if t["budget"] < log["chosen_budget"])
    # the tiny model's n = 375 and d = 16 leave nothing for the networks at 1/64: recorded, not fitted
    assert any(t["val_top1"] is None and "leaves" in t["unfittable"] for t in trials)
    for t in trials:
        if t["val_top1"] is not None:
            assert 0 <= t["val_top1"] <= 1 and t["val_kl"] >= 0 and t["val_tokens"] > 0 and t["fit_seconds"] >= 0
    chosen = next(t for t in trials if t["budget"] == log["chosen_budget"])
    assert manifest.nectar_params == chosen["nectar_params"] and chosen["val_top1"] == log["chosen_val_top1"]
    assert 0 <= log["test_top1"] <= 1 and math.isclose(log["test_minus_target"], log["test_top1"] - 1e-6, abs_tol=1e-5)
    assert result.stderr.count("budget search: ") == len(trials) + 1          # a line per trial, one for the choice
    assert f"chose budget {log['chosen_budget']:.4g}" in result.stdout


def test_recorded_validation_top1_is_what_the_artifact_measures(searched, tiny_ckpt):
    """The record is honest: the chosen trial's score equals bench/quality_curve's val_top1 of the written heads."""
    from nectar_export.artifact import load_artifact, read_manifest
    from nectar_export.evaluate import heads_contexts, teacher_forced
    from nectar_export.models import load_model
    from nectar_export.prefill import prefill

    out, _ = searched
    log = read_manifest(out).fit["budget_search"]
    loaded = load_model(str(tiny_ckpt))
    artifact = load_artifact(out, loaded.fingerprint)
    heldout = artifact.heldout()
    cache = prefill(loaded.model, heldout.context_ids, progress=False)
    methods = {"full": cache.exact(), "nectar": heads_contexts(artifact.heads["nectar"], cache, artifact.exact_sets())}
    val = teacher_forced(loaded.model, list(heldout.val), methods, artifact.n)["nectar"]["headline"]
    assert val["top1"] == pytest.approx(log["chosen_val_top1"], abs=1e-9)


def test_unreachable_target_writes_nothing(searched, tiny_ckpt, document, tmp_path):
    """A target just above what 1/8 measured in the first search (trials repeat exactly): the range's top is the
    start, so one fit settles it."""
    from nectar_export.artifact import read_manifest

    trials = {t["budget"]: t["val_top1"] for t in read_manifest(searched[0]).fit["budget_search"]["trials"]}
    best = trials[0.125]
    if best >= 0.999:
        pytest.skip(f"the tiny model agrees {best} at 1/8: no target in (0, 1) lies above it")
    target = f"{best + 0.0005:.6f}"
    result = search(tiny_ckpt, document, tmp_path / "art", "--target-agreement", target,
                    "--budget-range", "0.0625", "0.125")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: no budget in [0.0625, 0.125] reaches validation top-1 {float(target)} in 1 fit ")
    assert f"(budget: top-1 0.125: {best:.4f})" in line and "nothing was written" in line
    assert not (tmp_path / "art").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--target-agreement", "0.9", "--budget", "0.25"], "drop --budget"),
    (["--target-agreement", "0.9", "--head-params", "3000"], "drop --head-params"),
    (["--budget-range", "0.1", "0.2"], "--budget-range only goes with --target-agreement"),
    (["--target-agreement", "1.5"], "--target-agreement must be a top-1 agreement in (0, 1)"),
    (["--target-agreement", "0.9", "--budget-range", "0.3", "0.2"], "--budget-range LOW HIGH must satisfy")])
def test_flag_conflicts_are_refused_before_any_work(flags, message, tiny_ckpt, tmp_path):
    result = run_cli("fit", "--model", str(tiny_ckpt), *flags, "-o", str(tmp_path / "art"))
    assert result.returncode == 2 and result.stderr.strip() == result.stderr.strip().splitlines()[0]
    assert result.stderr.startswith("error: ") and message in result.stderr and not (tmp_path / "art").exists()
