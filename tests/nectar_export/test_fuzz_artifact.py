"""Fuzz nectar.json (issue 18), as tests/runtime/test_fuzz_bundle.py fuzzes bundle.json: every node of a real
artifact's manifest, walked recursively, gets the same wrong types, bounds, sizes, paths and nesting, and the whole
file is damaged. Each case runs `nectar-export eval ARTIFACT --model MISSING` in this process, which reads nectar.json
first and stops at the missing model when the manifest is accepted: it must end with one `error:` line and exit 2,
never a traceback, within CASE_SECONDS, changing no file and reading nothing outside the folder. For an accepted
manifest, what export, eval and verify read next must also return or raise a one-line NectarError: the heads
(load_artifact, once per distinct model record and variant list), heldout.json and the fit numbers eval reports.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner

from nectar_export.artifact import ArtifactManifest, load_artifact, read_manifest
from nectar_export.cli import main
from nectar_runtime.errors import NectarError
from tests.helpers import Raw, dump, hostile_copy, mutations
from tests.runtime.test_fuzz_bundle import CASE_SECONDS, MEMORY_MB, Outcome, Watch, summary


def run_in_process(artifact: Path, model: Path) -> Outcome:
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["eval", str(artifact), "--model", str(model)])
    err = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        err += "".join(traceback.format_exception(result.exception))
    return Outcome(result.exit_code, result.stdout, err, time.perf_counter() - start)


def read_next(artifact: Path, fingerprint: str, seen: set[str]) -> str | None:
    """What commands read after nectar.json: the fit numbers eval reports, heldout.json, and the heads (for each
    distinct model record and variant list). A one-line NectarError is fine; anything else is returned."""
    try:
        manifest = read_manifest(artifact)
        json.dumps([manifest.nectar_params, manifest.kv_entries,
                    [manifest.variant_params(v) for v in ("quadrature", "uniform_allocation")]])
        key = json.dumps([manifest.to_json()["model"], manifest.to_json()["variants"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            load_artifact(artifact, fingerprint).heldout()
    except NectarError as exc:
        return f"a NectarError of several lines: {exc}" if "\n" in str(exc) else None
    except Exception as exc:
        return "".join(traceback.format_exception(exc))[-1500:]
    return None


@pytest.fixture
def fuzz_artifact(tmp_path, artifact):
    return hostile_copy(artifact, tmp_path, "nectar.safetensors")    # what a weights path leading out would find


def test_every_mutation_of_nectar_json_is_one_error_line(fuzz_artifact, tmp_path):
    art, secret, paths = fuzz_artifact
    manifest = art / "nectar.json"
    original = json.loads(manifest.read_text())
    fingerprint = ArtifactManifest.from_json(original).model.fingerprint
    missing = tmp_path / "no-such-model"
    baseline = run_in_process(art, missing)
    assert baseline.code == 2 and "model not found" in baseline.err, baseline.err
    watch = Watch(tmp_path, manifest, secret)
    counts, problems, seen = {"cases": 0, "accepted": 0}, [], set()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for label, document in mutations(original, paths):
        manifest.write_bytes(dump(document))
        outcome = run_in_process(art, missing)
        counts["cases"] += 1
        accepted = "model not found" in outcome.err
        counts["accepted"] += accepted
        found = [outcome.problem() if outcome.code == 2 else f"exit {outcome.code}: {outcome.err[-1500:]}",
                 read_next(art, fingerprint, seen) if accepted else None, watch.problem()]
        problems += [f"{label}: {p}" for p in found if p]
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    print(f"nectar.json fuzz: {counts} ({len(seen)} head loads) in {seconds:.1f} s, peak memory +{grown:.0f} MB")
    assert not problems, f"{len(problems)} of {counts['cases']} cases:\n" + "\n".join(summary(problems))
    assert counts["cases"] > 1000 and 0 < counts["accepted"] < counts["cases"]
    assert grown < MEMORY_MB, f"peak memory grew by {grown:.0f} MB"


def test_the_in_process_eval_says_what_the_program_says(fuzz_artifact, tmp_path):
    art, _, paths = fuzz_artifact
    manifest = art / "nectar.json"
    original = json.loads(manifest.read_text())
    variants = original["variants"]
    cases = {"path": {**original, "variants": {**variants, "nectar": {**variants["nectar"], "file": paths.parent}}},
             "text": Raw("[" * 100_000)}
    for name, document in cases.items():
        manifest.write_bytes(dump(document))
        inside = run_in_process(art, tmp_path / "gone")
        done = subprocess.run([sys.executable, "-m", "nectar_export.cli", "eval", str(art), "--model",
                               str(tmp_path / "gone")], capture_output=True, text=True, timeout=300)
        outside = Outcome(done.returncode, done.stdout, done.stderr)
        assert inside.problem() is None and (inside.code, inside.err) == (outside.code, outside.err), (name, inside,
                                                                                                        outside)
