"""bench/decode_latency.py (`nectar-export bench`): on the tiny bundles with a few tokens (rows, ratios, JSON, PNG,
ONNX Runtime's trace), and its table pieces on rows made in code."""

from __future__ import annotations

import json
import subprocess
import sys

import decode_latency       # bench/ is on sys.path (tests/conftest.py)
from nectar_runtime.bundle import load_bundle
from tests.helpers import run_cli


def _row(kind: str, n: int, ms: float) -> dict:
    return {"kind": kind, "n": n, "ms_per_token": ms, "prefill_ms": 2.0, "peak_rss_mb": 300.0,
            "bundle_bytes": 10**6, "kv_bytes": 10**5, "bundle": f"{kind}-{n}"}


def test_rows_split_by_kind_and_ratio_of_the_largest_n_to_the_smallest():
    table = decode_latency.split_rows([_row("nectar", 8000, 5.5), _row("full", 512, 4.0), _row("nectar", 512, 5.0),
                                       _row("full", 8000, 11.0)])
    assert [r["n"] for r in table["nectar"]] == [512, 8000]
    assert all(set(r) == set(decode_latency.ROW_KEYS) for rows in table.values() for r in rows)
    ratio = decode_latency.ratios(table)
    assert ratio == {"nectar": {"n_small": 512, "n_large": 8000, "ratio": 1.1},
                     "full": {"n_small": 512, "n_large": 8000, "ratio": 2.75}}
    text = decode_latency.format_table(table, ratio)
    assert "acceptance <= 1.10: pass" in text and text.count("\n") == 6


def test_the_fit_child_uses_the_shape_recipe():
    compile(decode_latency.FIT_SCRIPT, "FIT_SCRIPT", "exec")
    assert 'FitConfig.recipe("shape", ' in decode_latency.FIT_SCRIPT


KEYS = {"n", "ms_per_token", "prefill_ms", "peak_rss_mb", "bundle_bytes", "kv_bytes"}


def test_bench_measures_both_kinds(bundles, tmp_path):
    done = run_cli("bench", "--bundles", str(bundles["nectar"]), str(bundles["full"]), "--tokens", "8",
                   "--warmup", "2", "--prompt-tokens", "16", "--out", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    table = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(table) == {"nectar", "full"}
    nectar, full = table["nectar"][0], table["full"][0]
    for row in (nectar, full):
        assert set(row) == KEYS and row["n"] == 512
        assert row["ms_per_token"] > 0 and row["prefill_ms"] > 0 and row["peak_rss_mb"] > 10
    kv_per_token = full["kv_bytes"] // (512 + 16 + 8)        # fp32 KV of 2 layers x 2 heads x 16 dims, K and V
    exact = load_bundle(bundles["nectar"]).cached_tokens                        # sinks + window
    assert kv_per_token == 2 * 2 * 2 * 16 * 4 and nectar["kv_bytes"] == (exact + 16 + 8) * kv_per_token
    assert full["bundle_bytes"] > nectar["bundle_bytes"] - 1_000_000        # the baseline carries the context KV
    written = json.loads((tmp_path / "decode_latency.json").read_text())
    assert written["nectar"] == table["nectar"] and written["settings"]["tokens"] == 8
    assert (tmp_path / "decode_latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ms/token" in done.stderr                                           # the table, beside --json


def test_bench_needs_something_to_measure(tmp_path):
    done = run_cli("bench", "--out", str(tmp_path))
    assert done.returncode != 0 and "nothing to measure" in done.stderr


def test_profile_summary_from_a_real_trace(bundles, tmp_path):
    """--profile: ONNX Runtime's own trace, reduced to the measured steps (one run per decode step)."""
    done = subprocess.run([sys.executable, "bench/decode_latency.py", "--child", str(bundles["nectar_static"]),
                           "--tokens", "4", "--warmup", "1", "--prompt-tokens", "8", "--profile",
                           str(tmp_path / "trace")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.strip().splitlines()[-1])
    profile = row["profile"]
    assert profile["runs"] == 4 and profile["nodes_per_step"] > 50
    assert 0 < profile["node_ms_per_step"] <= profile["run_ms_per_step"] * 1.05
    assert set(profile["last_step_nodes_by_provider"]) == {"CPUExecutionProvider"}
    exact = load_bundle(bundles["nectar_static"]).cached_tokens
    assert row["cache_layout"] == "static" and row["kv_bytes"] == (exact + 8 + 4) * 2 * 2 * 2 * 16 * 4
