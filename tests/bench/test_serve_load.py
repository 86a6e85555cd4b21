"""bench/serve_load.py on the tiny bundles with tiny counts: every level answered, no crossed answers, a plot."""

from __future__ import annotations

import json

import pytest

import serve_load           # bench/ is on sys.path (tests/conftest.py)


def test_serve_load_measures_every_level_and_the_servers_memory(bundles, tmp_path, capsys):
    argv = ["--bundle", f"nectar={bundles['nectar']}", "--bundle", f"full={bundles['full']}", "--clients", "1,3",
            "--requests", "6", "--max-tokens", "4", "--out", str(tmp_path)]
    assert serve_load.main(argv) == 0
    result = json.loads((tmp_path / "serve_load.json").read_text())
    assert result["models"] == ["nectar", "full"] and [r["clients"] for r in result["levels"]] == [1, 3]
    for row in result["levels"]:
        assert (row["ok"], row["rejected_429"], row["failed"], row["mismatches"]) == (6, 0, 0, 0)
        assert row["requests_per_s"] > 0 and row["tokens_per_s"] == pytest.approx(4 * row["requests_per_s"], rel=0.01)
        assert 0 < row["ttft_ms"]["p50"] <= row["latency_ms"]["p50"] <= row["latency_ms"]["p95"] <= row["latency_ms"]["max"]
    assert 50 < result["memory_loaded"]["rss_mib"] <= result["memory_after"]["peak_rss_mib"]
    assert result["pack_switches"]["count"] == 0                      # bundles: nothing to switch
    assert (tmp_path / "serve_load.png").stat().st_size > 10_000
    assert "requests/s" in capsys.readouterr().out


def test_percentiles_interpolate():
    assert serve_load.percentile([10, 20, 30, 40], 0.5) == 25
    assert serve_load.percentile([5], 0.95) == 5 and serve_load.percentile([1, 2, 3, 4, 5], 0.95) == pytest.approx(4.8)


def test_serve_load_switches_packs_and_measures_memory_per_pack_count(packs, tmp_path, capsys):
    argv = ["--base", str(packs["base"]), "--pack", f"manual={packs['manual']}", "--pack", f"whole={packs['whole']}",
            "--clients", "1,2", "--requests", "4", "--max-tokens", "2", "--pack-counts", "1,2", "--out", str(tmp_path)]
    assert serve_load.main(argv) == 0
    result = json.loads((tmp_path / "serve_load.json").read_text())
    assert all(row["mismatches"] == row["failed"] == 0 and row["ok"] == 4 for row in result["levels"])
    assert result["pack_switches"]["count"] >= 3 and result["pack_switches"]["ms_sum"] > 0
    one, two = result["pack_memory"]
    assert (one["packs"], one["switches"], one["switch_ms_mean"]) == (1, 0, None)
    assert two["packs"] == 2 and two["switches"] >= 3 and 0 < two["switch_ms_mean"] < 100
    assert "2 packs: RSS" in capsys.readouterr().out
