"""bench/quality_curve.py on the whole-document tiny artifact: every method measured, rows plotted."""

from __future__ import annotations

import json

import quality_curve


def test_measure_reports_every_method_on_the_test_and_validation_splits(whole_artifact, tiny_ckpt, tmp_path,
                                                                        small_qa):
    from nectar_export.models import load_model

    args = quality_curve.parser().parse_args(["--model", str(tiny_ckpt), "--work", str(tmp_path), "--qa", str(small_qa)])
    rows = quality_curve.measure(whole_artifact, args, load_model(str(tiny_ckpt)))
    assert set(rows) == {"nectar", "no_context", "recent_window", "snapkv", "query_aware", "full"}
    for name, row in rows.items():
        if name != "full":
            assert 0.0 <= row["top1"] <= 1.0 and row["kl"] >= 0.0 and row["val_top1"] is not None
            assert 0.0 <= row["qa_agreement"] <= 1.0
    # the exact-token caches differ in which tokens they keep, so their test KL differs
    assert len({round(rows[m]["kl"], 9) for m in ("recent_window", "snapkv", "query_aware")}) == 3
    result = {"config": {}, "rows": [{"budget": 0.125, "salient": 0.25, "method": m, **r} for m, r in rows.items()]}
    quality_curve.plot(json.loads(json.dumps(result)), tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000
