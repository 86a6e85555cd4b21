"""bench/gpu_decode.py's report on rows: the issue's ratios, the JSON and the PNG (the GPU stages run on the H200)."""

from __future__ import annotations

import json

import gpu_decode           # bench/ is on sys.path (tests/conftest.py)


def _row(engine: str, n: int, ms: float) -> dict:
    return {"engine": engine, "n": n, "ms_per_token": ms, "prefill_ms": 30.0, "device_mem_mb": 5000.0}


def test_checks_compare_engines_at_the_largest_common_n():
    rows = [_row("nectar_ort_cuda", 4096, 9.0), _row("nectar_ort_cuda", 131072, 9.9),
            _row("full_ort_cuda", 131072, 33.0), _row("hf_static", 4096, 4.0)]
    checks = gpu_decode.checks(rows, floor_ms=0.9)
    assert checks["nectar_large_over_small"] == {"n_small": 4096, "n_large": 131072, "ratio": 1.1}
    assert checks["full_ort_cuda_over_nectar"] == {"n": 131072, "ratio": round(33.0 / 9.9, 3)}
    assert checks["hf_static_over_nectar"] == {"n": 4096, "ratio": round(4.0 / 9.0, 3)}
    assert checks["nectar_over_floor"] == {4096: 10.0, 131072: 11.0}
    assert gpu_decode.checks([_row("hf_static", 4096, 4.0)], None) == {}
    fused = gpu_decode.checks(rows + [_row("nectar_ort_fused", 4096, 1.2), _row("nectar_ort_fused", 131072, 1.25),
                                      _row("full_ort_fused", 131072, 5.0)], floor_ms=1.0)["fused"]
    assert fused == {"nectar_over_floor": {4096: 1.2, 131072: 1.25}, "nectar_large_over_small": round(1.25 / 1.2, 4),
                     "full_over_nectar": {131072: 4.0},
                     "portable_nectar_over_fused": {4096: 7.5, 131072: round(9.9 / 1.25, 3)}}


def test_report_keeps_row_keys_and_draws(tmp_path):
    state = gpu_decode.State(shape="qwen3-1.7b", gpu="test", floor={"floor_ms": 0.84},
                             rows=[{**_row("nectar_ort_cuda", 4096, 9.0), "variants": []}, _row("hf_static", 4096, 4.0)])
    report = gpu_decode.write_report(state, tmp_path / "r.json", tmp_path / "r.png")
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["rows"] == report["rows"] and written["floor_ms"] == 0.84
    assert all(set(r) == set(gpu_decode.ROW_KEYS) for r in written["rows"])
    assert [r["engine"] for r in written["rows"]] == ["nectar_ort_cuda", "hf_static"]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_recipe_flag_keeps_its_meaning(tmp_path):
    """--recipe quick: heads of the right shape only (FitConfig's "shape" recipe, as the old QUICK fields);
    default: the measured recipe; neither fits the ablations."""
    from nectar_export.config import FitConfig

    ckpt, context = tmp_path / "ckpt", tmp_path / "context.txt"
    quick = gpu_decode.fit_config(ckpt, context, 4096, 1000, "quick", 32)
    assert (quick.continuation, quick.repeat, quick.self_study, quick.answer_tokens, quick.epochs,
            quick.ablations) == ((16, 4, 2), (4, 1, 1), (4, 1, 1), 16, 1, False)
    assert quick == FitConfig.recipe("shape", model=str(ckpt), context=str(context), context_tokens=4096,
                                     head_params=1000, reserve=32)
    assert gpu_decode.fit_config(ckpt, context, 4096, 1000, "default", 32) == FitConfig(
        model=str(ckpt), context=str(context), context_tokens=4096, head_params=1000, reserve=32, ablations=False)
    assert gpu_decode.parser().parse_args(["--recipe", "quick"]).recipe == "quick"


def test_state_file_keeps_its_keys(tmp_path):
    """A state file as earlier runs wrote it loads and saves unchanged; a fresh one has only what exists yet."""
    path = tmp_path / "qwen3-1.7b-state.json"
    earlier = {"rows": [_row("nectar_ort_cuda", 4096, 9.0)], "fit": {"4096": {"recipe": "quick", "seconds": {}}},
               "export": {"b": {"weight_bytes": 1}}, "errors": [{"step": "floor", "error": "x"}],
               "shape": "qwen3-1.7b", "gpu": "test", "settings": {"ns": "4096"}, "disk_plan": {"b": 10},
               "checkpoint": {"params": 5, "weight_bytes_fp32": 20}, "floor": {"floor_ms": 0.8}}
    path.write_text(json.dumps(earlier))
    state = gpu_decode.State.load(path)
    state.add_row(_row("nectar_ort_cuda", 4096, 8.0))            # the same engine and n: replaced
    state.save(path)
    assert json.loads(path.read_text()) == {**earlier, "rows": [_row("nectar_ort_cuda", 4096, 8.0)]}
    gpu_decode.State.load(tmp_path / "none.json").save(path)
    assert set(json.loads(path.read_text())) == {"rows", "fit", "export", "errors", "shape", "gpu", "settings"}


TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152}


def test_stages_before_measuring_run_on_the_cpu_with_parallel_exports(tmp_path, tokenizer_dir):
    """checkpoint, fit and export of a tiny Qwen3-shaped model, exports two at a time in child processes."""
    from nectar_runtime.bundle import load_bundle

    work = tmp_path / "work"
    code = gpu_decode.main(["--shape", "qwen3-1.7b", "--overrides", json.dumps(TINY), "--ns", "96,64",
                            "--stages", "checkpoint,fit,export", "--device", "cpu", "--jobs", "2",
                            "--recipe", "quick", "--timed-n", "0", "--head-params", "4096", "--reserve", "32",
                            "--tokenizer", str(tokenizer_dir), "--work", str(work), "--out", str(tmp_path / "out")])
    state = json.loads((work / "qwen3-1.7b-state.json").read_text())
    assert code == 0 and state["errors"] == [], state["errors"]
    names = {f"qwen3-1.7b-{kind}-{n}" for kind in ("nectar", "full", "nectar-fused", "full-fused", "nectar-int4")
             for n in (96, 64)}
    assert set(state["export"]) == names
    for name in names:
        manifest = load_bundle(work / name, check_hashes=True).manifest
        assert manifest.cache_layout == "static" and manifest.kind == name.split("-")[2]
        assert manifest.ops == ("ort" if "-fused-" in name else "portable")
        assert state["export"][name]["export_seconds"]["torch.onnx.export"] > 0
    assert set(state["fit"]) == {"96", "64"} and all(f["recipe"] == "quick" for f in state["fit"].values())
    # the disk plan made before any stage ran, against what the stages wrote
    written = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
               for p in work.iterdir() if p.name in state["disk_plan"]}
    assert set(written) == set(state["disk_plan"]) == names | {"qwen3-1.7b-ckpt"}
    for name, size in written.items():
        assert abs(state["disk_plan"][name] - size) < 0.1 * size, (name, state["disk_plan"][name], size)


def test_a_run_that_cannot_fit_on_the_disk_is_refused_before_any_stage(tmp_path, tokenizer_dir):
    """A vocabulary of 10^9 rows makes the float32 checkpoint alone 16 TB: refused, nothing written."""
    import pytest

    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=r"writes \d+\.\d GB under .* GB is free there"):
        gpu_decode.main(["--shape", "llama-3.1-8b", "--overrides", json.dumps({"vocab_size": 10**9}),
                         "--ns", "4096", "--device", "cpu", "--tokenizer", str(tokenizer_dir), "--work", str(work),
                         "--out", str(tmp_path / "out")])
    assert list(work.iterdir()) == []
