"""bench/decode_latency.py (`nectar-export bench`) on the tiny bundles with a few tokens: rows, ratios, JSON and PNG."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import run_cli


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
    exact = json.loads((bundles["nectar"] / "bundle.json").read_text())["context_tokens"]   # sinks + window
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
    exact = json.loads((bundles["nectar_static"] / "bundle.json").read_text())["context_tokens"]
    assert row["cache_layout"] == "static" and row["kv_bytes"] == (exact + 8 + 4) * 2 * 2 * 2 * 16 * 4
