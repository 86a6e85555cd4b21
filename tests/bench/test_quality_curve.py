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


def _run(config, points, methods=("nectar", "snapkv")):
    rows = [{"budget": b, "salient": s, "method": m, "top1": 0.5 + b, "kl": 0.1, "repeat_top1": 0.4,
             "qa_accuracy": 0.1} for b, s in points for m in methods]
    return {"config": config, "rows": rows}


def test_merge_joins_runs_in_budget_order_and_plots(tmp_path):
    config = {"context": "manual-4k", "context_tokens": 8192, "qa": "manual-4k", "recipe": "default",
              "coverage": True, "ablations": True, "budgets": [0.125], "model": "/tmp/a.gguf"}
    paths = []
    for name, points in (("old", [(0.125, 0.0), (0.125, 0.5)]), ("new", [(0.03125, 0.0), (0.25, 0.5), (0.25, 0.0)])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_run({**config, "model": f"/tmp/{name}.gguf"}, points)))
        paths.append(path)
    assert quality_curve.main(["--merge", *map(str, paths), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged/quality_curve.json").read_text())
    assert [(r["budget"], r["salient"]) for r in merged["rows"][::2]] == [(0.25, 0.0), (0.25, 0.5), (0.125, 0.0),
                                                                         (0.125, 0.5), (0.03125, 0.0)]
    assert [r["method"] for r in merged["rows"][:2]] == ["nectar", "snapkv"]
    assert [c["model"] for c in merged["config"]["merged"]] == ["/tmp/old.gguf", "/tmp/new.gguf"]
    assert (tmp_path / "merged/quality_curve.png").stat().st_size > 10_000
    lines = quality_curve.series(merged["rows"], "top1")     # a baseline's line spans every budget it was measured at
    assert [b for b, _ in lines["snapkv"]] == [0.03125, 0.125, 0.25]
    assert [b for b, _ in lines["nectar (salient 0.5)"]] == [0.125, 0.25]


def test_merge_refuses_another_document_and_a_point_measured_twice(tmp_path, capsys):
    config = {"context": "manual-4k", "context_tokens": 8192, "qa": "manual-4k", "recipe": "default",
              "coverage": True, "ablations": True}
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(_run(config, [(0.125, 0.0)])))
    b.write_text(json.dumps(_run({**config, "context": "license-4k"}, [(0.25, 0.0)])))
    c.write_text(json.dumps(_run(config, [(0.125, 0.0)])))
    assert quality_curve.main(["--merge", str(a), str(b), "--out", str(tmp_path / "o")]) == 2
    assert "differ in context: context 'manual-4k' vs 'license-4k'" in capsys.readouterr().err
    assert quality_curve.main(["--merge", str(a), str(c), "--out", str(tmp_path / "o")]) == 2
    assert "budget 0.125, salient 0, method nectar is in two" in capsys.readouterr().err
    assert not (tmp_path / "o/quality_curve.json").exists()


def test_quadrature_family_point_is_one_row_that_merges_with_the_mlp_run(tiny_ckpt, tmp_path):
    from nectar_export.context import load_document

    doc = tmp_path / "doc.txt"
    doc.write_text(load_document("manual-4k").text[:700])
    common = ["--model", str(tiny_ckpt), "--context", str(doc), "--budgets", "0.25", "--salient", "0.25",
              "--recipe", "quick", "--no-ablations"]
    assert quality_curve.main([*common, "--family", "quadrature", "--work", str(tmp_path / "q")]) == 0
    quad = json.loads((tmp_path / "q/quality_curve.json").read_text())
    assert [r["method"] for r in quad["rows"]] == ["nectar_quadrature"]
    assert quad["rows"][0]["fit_seconds"] > 0 and 0.0 <= quad["rows"][0]["top1"] <= 1.0
    from nectar_export.artifact import read_manifest

    manifest = read_manifest(tmp_path / "q/b0.25-s0.25")
    assert manifest.config.family == "quadrature" and manifest.context.salient > 0
    mlp = {"config": quad["config"], "rows": [{**quad["rows"][0], "method": m} for m in ("nectar", "snapkv")]}
    (tmp_path / "mlp.json").write_text(json.dumps(mlp))
    assert quality_curve.main(["--merge", str(tmp_path / "mlp.json"), str(tmp_path / "q/quality_curve.json"),
                               "--out", str(tmp_path / "m")]) == 0
    lines = quality_curve.series(json.loads((tmp_path / "m/quality_curve.json").read_text())["rows"], "top1")
    assert set(lines) == {"nectar (salient 0.25)", "nectar quadrature (salient 0.25)", "snapkv"}
