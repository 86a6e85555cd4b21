"""bench/decode_latency.py's pieces that need no bundle (tests/runtime/test_bench.py measures real ones)."""

from __future__ import annotations

import decode_latency       # bench/ is on sys.path (tests/bench/conftest.py)


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
