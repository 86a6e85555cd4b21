"""bench/gpu_reference.py on CPU: published shapes, tiny random models, StaticCache parity, bandwidth floor, plot."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import gpu_reference as ref  # bench/ is on sys.path (tests/conftest.py)

TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=256, bos_token_id=1, eos_token_id=2)
CONTEXT = [(7 * i + 3) % 256 for i in range(40)]
PROMPT = [(11 * i + 5) % 256 for i in range(8)]


def tiny_model(shape: str, **overrides):
    return ref.random_model(ref.make_config(shape, **TINY | overrides), torch.float32, "cpu")


@pytest.mark.parametrize("shape, params, fields", [
    ("qwen3-1.7b", 1.72e9, dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                                num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)),
    ("llama-3.1-8b", 8.03e9, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                  tie_word_embeddings=False)),
])
def test_shapes_have_published_sizes(shape, params, fields):
    from transformers import AutoModelForCausalLM

    config = ref.make_config(shape)
    assert {k: getattr(config, k) for k in fields} == fields
    assert config.max_position_embeddings == 139264
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / params - 1) < 0.02
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_rope_parameters_are_published_values():
    qwen, llama = ref.make_config("qwen3-1.7b"), ref.make_config("llama-3.1-8b")
    assert qwen.rope_parameters["rope_theta"] == 1e6 and qwen.rms_norm_eps == 1e-6
    assert llama.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}
    assert llama.rms_norm_eps == 1e-5
    assert ref.SHAPES["llama-3.1-8b"]["rope_parameters"]["rope_type"] == "llama3"      # make_config copies
    with pytest.raises(ValueError, match="unknown shape"):
        ref.make_config("gpt-2")


def test_random_model_is_seeded_eval_sdpa_in_dtype():
    model, same = tiny_model("qwen3-1.7b"), tiny_model("qwen3-1.7b")
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.float32 and weight.device.type == "cpu"
    assert not model.training and model.config._attn_implementation == "sdpa"
    assert torch.equal(weight, same.model.layers[0].mlp.up_proj.weight)
    reseeded = ref.random_model(ref.make_config("qwen3-1.7b", **TINY), torch.float32, "cpu", seed=1)
    assert not torch.equal(weight, reseeded.model.layers[0].mlp.up_proj.weight)
    half = ref.random_model(ref.make_config("llama-3.1-8b", **TINY), torch.bfloat16, "cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_weight_bytes_counts_tied_embedding_once():
    tied, untied = tiny_model("qwen3-1.7b"), tiny_model("qwen3-1.7b", tie_word_embeddings=False)
    embedding = 256 * 64 * 4
    with_duplicates = sum(p.numel() * 4 for _, p in tied.named_parameters(remove_duplicate=False))
    assert tied.get_input_embeddings().weight is tied.get_output_embeddings().weight
    assert ref.weight_bytes(tied) == with_duplicates - embedding
    assert ref.weight_bytes(untied) == ref.weight_bytes(tied) + 64 * 4      # lm_head in full, one embedding row


@pytest.mark.parametrize("shape", sorted(ref.SHAPES))
def test_static_cache_decode_matches_full_forward(shape):
    model = tiny_model(shape)
    token = torch.tensor([[17]])
    with torch.inference_mode():
        cache = ref.static_cache(model, 64)
        ref.prefill(model, cache, CONTEXT, chunk=16)
        prompt_logits = ref.prefill(model, cache, PROMPT)
        step = ref.forward(model, model, token, cache)
        full = model(input_ids=torch.tensor([CONTEXT + PROMPT + [17]]), use_cache=False).logits
    torch.testing.assert_close(prompt_logits, full[:, -2], atol=1e-4, rtol=0)
    torch.testing.assert_close(step, full[:, -1], atol=1e-4, rtol=0)


def test_hf_static_decode_reports_positive_numbers():
    row = ref.hf_static_decode(tiny_model("llama-3.1-8b"), CONTEXT, PROMPT, tokens=4, warmup=1)
    assert row["ms_per_token"] > 0 and row["prefill_ms"] > 0
    assert row["device_mem_mb"] == 0 and row["tokens"] == 4 and row["compiled"] is False
    with pytest.raises(ValueError, match="warmup >= 3"):
        ref.hf_static_decode(tiny_model("llama-3.1-8b"), CONTEXT, PROMPT, tokens=4, warmup=1, compile=True)


def test_copy_bandwidth_and_floor():
    bandwidth = ref.copy_bandwidth("cpu", nbytes=2**20, repeats=3)
    assert bandwidth["bytes"] == 2**20 and bandwidth["gb_per_s"] > 0
    assert bandwidth["gb_per_s"] == pytest.approx(2 * bandwidth["read_gb_per_s"])
    assert ref.floor_ms(16_000_000_000, 4000.0) == pytest.approx(4.0)       # 16 GB of weights at 4 TB/s


def test_plot_rows_writes_png(tmp_path):
    rows = [{"engine": engine, "n": n, "ms_per_token": ms * scale, "prefill_ms": 1.0, "device_mem_mb": 0.0}
            for engine, scale in (("hf-static", 1.0), ("nectar", 0.5)) for n, ms in ((1024, 8.0), (512, 7.0))]
    png = tmp_path / "decode.png"
    ref.plot_rows(rows, floor=3.0, title="tiny", png=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_module_imports_no_project_package():
    tree = ast.parse(Path(ref.__file__).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in names if name.startswith("nectar")}
