"""`nectar-export export / verify / build` on the tiny artifact, and their answers to bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import export_bundle, run_cli


def _verify(bundle: Path, *flags: str) -> dict:
    result = run_cli("verify", str(bundle), "--prompts", "4", "--json", *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def _fails(result, out: Path | None, *words: str) -> None:
    assert result.returncode == 2, result.stderr[-1500:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-1500:]
    for word in words:
        assert word in last, last
    if out is not None:
        assert not out.exists()
        assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def test_nectar_bundle_is_self_describing_and_holds_only_the_heads(nectar_bundle, artifact):
    from safetensors.numpy import load_file

    from nectar_export.artifact import read_manifest
    from nectar_runtime.bundle import FORMAT, load_bundle

    assert json.loads((nectar_bundle / "bundle.json").read_text())["format"] == FORMAT == "nectar-bundle/2"
    manifest, art = load_bundle(nectar_bundle).manifest, read_manifest(artifact)
    assert manifest.kind == "nectar" and manifest.n == art.n == manifest.first_position
    # the exact tokens' KV ships beside the graph as the start of the past, not as constants in it
    exact = min(sum(art.exact_tokens) + art.context.salient, art.n)
    assert exact > 0 and manifest.cached_tokens == exact
    assert set(manifest.files) == {"model.onnx", "tokenizer.json", "context.safetensors"}
    kv = load_file(str(nectar_bundle / "context.safetensors"))
    assert set(kv) == {f"past_key_values.{i}.{t}" for i in range(manifest.layers) for t in ("key", "value")}
    assert {v.shape for v in kv.values()} == {(1, manifest.kv_heads, exact, manifest.head_dim)}
    graph = manifest.graph
    assert graph["nectar_params"] == art.nectar_params
    # an MLP pair runs as one network whose block-diagonal layers hold zeros besides the fitted numbers;
    # nectar_params counts the exact tokens' KV too (outside the graph)
    kv_numbers = sum(v.size for v in kv.values())
    assert graph["nectar_graph_numbers"] > graph["nectar_params"] - kv_numbers
    # the file's weights are the base model's plus the Nectar heads: a few small constants more, and a little
    # less where the cleanup stores identical tensors once (the untrained all-ones norm weights of this model)
    expected = 4 * (graph["base_params"] + graph["nectar_graph_numbers"])
    assert abs(graph["weight_bytes"] - expected) < 4096, (graph["weight_bytes"], expected)
    assert graph["lint"]["unsupported_ops"] == {}
    assert graph["dims_equal_to_n"] == 0
    assert [p["name"] for p in graph["passes"]] == ["fold_constants", "convert_precision",
                                                    "fuse_sibling_matmuls", "cleanup"]
    assert manifest.question_template == art.context.question_template


def test_verify_nectar_bundle_matches_torch(nectar_bundle):
    report = _verify(nectar_bundle)
    assert report["top1_match"] == 1.0 and report["compared_steps"] == 4 * 11
    assert report["max_abs_logit_diff"] < 1e-4
    assert set(report["max_abs_diff_by_output"]) == {"logits"} | {f"present.{i}.{kv}" for i in range(2)
                                                                  for kv in ("key", "value")}
    assert report["fusion_counts"] == {"gate_up": 2, "qkv": 2}   # the MLP pairs are one network already


def test_verify_full_bundle_matches_transformers(full_bundle):
    from nectar_runtime.bundle import load_bundle

    manifest = load_bundle(full_bundle).manifest
    assert manifest.kind == "full" and "context.safetensors" in manifest.files and manifest.cached_tokens == manifest.n
    report = _verify(full_bundle)
    assert report["top1_match"] == 1.0 and report["max_abs_logit_diff"] < 1e-4


def test_fp16_bundle_is_half_the_size_and_close(artifact, nectar_bundle, tmp_path):
    bundle = export_bundle(artifact, tmp_path / "fp16", "--precision", "fp16")
    from nectar_runtime.bundle import load_bundle

    manifest = load_bundle(bundle).manifest
    assert manifest.kv_dtype == "float16"
    full = load_bundle(nectar_bundle).manifest.graph["weight_bytes"]
    assert manifest.graph["weight_bytes"] < 0.52 * full
    report = _verify(bundle)
    assert report["max_abs_logit_diff"] < 0.05 and report["top1_match"] >= 0.9


def test_export_refuses_a_model_that_cannot_be_found(artifact, tmp_path):
    moved = tmp_path / "art"
    shutil.copytree(artifact, moved)
    manifest = json.loads((moved / "nectar.json").read_text())
    manifest["model"]["source"] = str(tmp_path / "gone")
    (moved / "nectar.json").write_text(json.dumps(manifest))
    out = tmp_path / "bundle"
    _fails(run_cli("export", str(moved), "-o", str(out)), out, "model not found")


def test_export_refuses_an_unsupported_architecture(artifact, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "bundle"
    _fails(run_cli("export", str(artifact), "--model", str(tmp_path / "gpt2"), "-o", str(out)), out,
           "unsupported architecture 'gpt2'")


def test_export_leaves_a_foreign_folder_alone(artifact, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_cli("export", str(artifact), "-o", str(out))
    assert result.returncode == 2 and "not a bundle" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_corrupt_onnx_is_refused(nectar_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(nectar_bundle, bundle)
    size = (bundle / "model.onnx").stat().st_size
    (bundle / "model.onnx").write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    _fails(run_cli("verify", str(bundle)), None, "model.onnx", "sha256")


def test_build_without_tensorrt_names_the_package(nectar_bundle, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    bundle = tmp_path / "bundle"
    shutil.copytree(nectar_bundle, bundle)
    before = (bundle / "bundle.json").read_text()
    _fails(run_cli("build", str(bundle), "--engine", "tensorrt"), None, "pip install tensorrt")
    assert (bundle / "bundle.json").read_text() == before and not (bundle / "model.plan").exists()


def test_export_over_an_existing_bundle_needs_overwrite_and_never_deletes_other_files(artifact, nectar_bundle, tmp_path):
    """Issue 18: `export -o` on an existing bundle replaced it without a word, deleting unrelated files inside."""
    out = tmp_path / "bundle"
    shutil.copytree(nectar_bundle, out)
    before = sorted(p.name for p in out.iterdir())
    result = run_cli("export", str(artifact), "-o", str(out))
    assert result.returncode == 2 and "already holds a bundle; pass --overwrite" in result.stderr.splitlines()[-1]
    (out / "notes.txt").write_text("keep me")
    result = run_cli("export", str(artifact), "-o", str(out), "--overwrite")
    assert result.returncode == 2 and "notes.txt" in result.stderr.splitlines()[-1], result.stderr[-1000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(before + ["notes.txt"])
    (out / "notes.txt").unlink()
    result = run_cli("export", str(artifact), "-o", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == before
    assert not any(p.name.startswith(".bundle.") for p in tmp_path.iterdir())


def test_whole_document_with_salient_tokens_fits_evaluates_exports_and_verifies(tmp_path, tiny_ckpt, whole_artifact,
                                                                                  small_qa):
    """A document consumed whole (no continuation text) with per-head salient exact tokens, end to end: eval's
    headline holds no continuation, the bundle ships each KV-head's own exact tokens, and it matches torch."""
    from nectar_export.artifact import load_artifact, read_manifest
    from nectar_export.models import load_model
    from nectar_runtime.bundle import load_bundle

    art, bundle = whole_artifact, tmp_path / "bundle"
    manifest = read_manifest(art)
    salient = manifest.context.salient
    assert manifest.context.document_whole and salient == round(0.25 * manifest.n * 0.125)
    assert "continuation" not in manifest.fit["samples"]["train"]
    blocks = manifest.context.document_tokens // manifest.config.passage_tokens
    assert manifest.fit["samples"]["train"]["repeat"] == blocks          # coverage: every passage is repeated
    sets = load_artifact(art, load_model(str(tiny_ckpt)).fingerprint).exact_sets()
    sinks, window = manifest.exact_tokens
    assert all(s.shape == (manifest.model.kv_heads, sinks + window + salient) for s in sets)
    assert any(not torch.equal(s[0], s[1]) for s in sets)          # the heads keep different tokens
    evaluated = run_cli("eval", str(art), "--json", "--questions", "2", "--qa", str(small_qa))
    report = json.loads(evaluated.stdout)
    assert report["document_whole"] is True and report["headline_sources"] == ["self_study"]
    assert report["qa"]["questions"] == 4 and 0.0 <= report["qa_agreement"] <= 1.0
    assert set(report["qa"]["split_accuracy"]["nectar"]) == {"tune", "untouched"}
    assert set(report["baselines"]) >= {"recent_window", "snapkv", "query_aware"}
    export_bundle(art, bundle)
    assert load_bundle(bundle).manifest.cached_tokens == sinks + window + salient
    verified = _verify(bundle)
    assert verified["top1_match"] == 1.0 and verified["max_abs_logit_diff"] < 1e-4


def test_build_hashes_the_bundle_unless_told_not_to(bundle_copy):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: --no-hash-check would build")
    path = bundle_copy / "model.onnx"
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        fh.write(b"\0" * 4096)
    _fails(run_cli("build", str(bundle_copy)), None, "model.onnx does not match its sha256")
    _fails(run_cli("build", str(bundle_copy), "--no-hash-check"), None, "pip install tensorrt")
