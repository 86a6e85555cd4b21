"""nectar_export/cli.py: `nectar-export fit` and `eval` end to end on a tiny checkpoint, and their handling of bad
input (clear error, no artifact). The other commands: test_cli_export.py (export, verify, build) and
test_cli_run.py (run, chat); bench: tests/bench/test_decode_latency.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_cli


def _assert_clean_failure(result: subprocess.CompletedProcess, out: Path, *words: str) -> None:
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-1500:]
    for word in words:
        assert word in last, last
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def test_fit_writes_a_self_describing_artifact(artifact, tiny_ckpt):
    from nectar_export.artifact import read_heldout, read_manifest

    manifest = read_manifest(artifact)
    assert manifest.n == 512 and manifest.context.question_template.count("{question}") == 1
    assert set(manifest.variants) == {"nectar", "quadrature", "uniform_allocation"}
    assert manifest.nectar_params <= 0.125 * manifest.kv_entries
    for variant in ("quadrature", "uniform_allocation"):
        assert manifest.variant_params(variant) <= 0.125 * manifest.kv_entries
    assert (artifact / "nectar.safetensors").is_file() and read_heldout(artifact).test


def test_eval_reports_every_metric(artifact):
    result = run_cli("eval", str(artifact), "--json", "--questions", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    def no_constants(name: str) -> None:
        raise AssertionError(f"eval --json printed {name}, which is not JSON")

    report = json.loads(result.stdout, parse_constant=no_constants)
    for key in ("top1_agreement", "kl", "approx_error_by_layer", "lse_error_by_layer", "generation_similarity",
                "generation_prefix_match", "nectar_params", "kv_entries"):
        assert key in report
    assert set(report["baselines"]) == {"no_context", "recent_window", "snapkv", "query_aware", "quadrature",
                                        "uniform_allocation"}
    assert report["document_whole"] is False and "continuation" in report["headline_sources"]
    for name in ("recent_window", "snapkv", "query_aware"):     # three different selections of equal size
        assert report["baselines"][name]["approx_error_by_layer"] != report["approx_error_by_layer"]
    assert report["baselines"]["snapkv"]["approx_error_by_layer"] != report["baselines"]["query_aware"]["approx_error_by_layer"]
    assert 0.0 <= report["top1_agreement"] <= 1.0 and report["kl"] >= 0.0
    assert len(report["approx_error_by_layer"]) == 2
    assert report["baselines"]["recent_window"]["approx_error_by_layer"] != report["approx_error_by_layer"]
    assert report["baselines"]["no_context"]["lse_error_by_layer"] == [None, None]
    assert all(e >= 0 for e in report["lse_error_by_layer"])
    assert json.loads((artifact / "nectar.json").read_text())["eval"]["n"] == 512


def test_missing_context(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    result = run_cli("fit", "--model", str(tiny_ckpt), "--context", str(tmp_path / "nope.txt"), "-o", str(out))
    _assert_clean_failure(result, out, "context not found")


def test_non_utf8_context(tmp_path, tiny_ckpt):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    out = tmp_path / "out"
    result = run_cli("fit", "--model", str(tiny_ckpt), "--context", str(bad), "-o", str(out))
    _assert_clean_failure(result, out, "not UTF-8")


def test_context_too_long(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    result = run_cli("fit", "--model", str(tiny_ckpt), "--context-tokens", "900", "-o", str(out))
    _assert_clean_failure(result, out, "exceeds the model's 1024 positions")


def test_unknown_model_path(tmp_path):
    out = tmp_path / "out"
    result = run_cli("fit", "--model", str(tmp_path / "no-such-model"), "-o", str(out))
    _assert_clean_failure(result, out, "model not found")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "out"
    result = run_cli("fit", "--model", str(tmp_path / "gpt2"), "-o", str(out))
    _assert_clean_failure(result, out, "unsupported architecture 'gpt2'", "llama, mistral, qwen2, qwen3")


def test_length_dependent_rotary_scaling_is_refused(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                 "rope_theta": 10000.0})
    config.save_pretrained(tmp_path / "dynamic")
    out = tmp_path / "out"
    result = run_cli("fit", "--model", str(tmp_path / "dynamic"), "-o", str(out))
    _assert_clean_failure(result, out, "'dynamic' rotary scaling", "default, linear, llama3, yarn")


def test_artifact_of_another_model_is_refused(artifact, other_ckpt):
    result = run_cli("eval", str(artifact), "--model", str(other_ckpt))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    from nectar_export.artifact import read_manifest

    assert last.startswith("error: ") and read_manifest(artifact).model.fingerprint[:16] in last


def test_output_folder_that_is_not_an_artifact_is_left_alone(tmp_path, tiny_ckpt):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_cli("fit", "--model", str(tiny_ckpt), "--context-tokens", "512", "--quick", "--epochs", "1",
                     "--no-ablations", "-o", str(out))
    assert result.returncode != 0 and "not a Nectar artifact" in result.stderr
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_fit_on_a_gpu_this_torch_cannot_see(tmp_path, tiny_ckpt):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA device: fitting there is allowed, there is nothing to refuse")
    out = tmp_path / "out"
    result = run_cli("fit", "--model", str(tiny_ckpt), "--device", "cuda", "-o", str(out))
    _assert_clean_failure(result, out, "--device cuda", "no CUDA device")


def test_head_params_too_small_for_the_exact_tokens(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    result = run_cli("fit", "--model", str(tiny_ckpt), "--context-tokens", "256", "--head-params", "300",
                     "--window", "8", "-o", str(out))
    _assert_clean_failure(result, out, "--head-params 300 leaves", "raise the budget")
    result = run_cli("fit", "--model", str(tiny_ckpt), "--head-params", "0", "-o", str(out))
    _assert_clean_failure(result, out, "--head-params must be a positive")


def test_fit_over_an_existing_artifact_needs_overwrite_and_never_deletes_other_files(artifact, tiny_ckpt, tmp_path):
    """Issue 18: `fit -o` on an existing artifact replaced it without a word. Both refusals come before any work."""
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    result = run_cli("fit", "--model", str(tiny_ckpt), "--context-tokens", "512", "-o", str(out))
    assert result.returncode == 2 and "already holds a Nectar artifact; pass --overwrite" in result.stderr
    (out / "ablations" / "notes.txt").write_text("keep me")
    result = run_cli("fit", "--model", str(tiny_ckpt), "--context-tokens", "512", "-o", str(out), "--overwrite")
    assert result.returncode == 2 and "ablations/notes.txt" in result.stderr.strip().splitlines()[-1]
    assert (out / "ablations" / "notes.txt").read_text() == "keep me"
