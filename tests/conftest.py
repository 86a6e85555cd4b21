"""Shared fixtures: tiny random models of every supported architecture, built from configs in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_CONFIGS, export_bundle, run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request):
    return request.param


# --- a tiny checkpoint with SmolLM2's tokenizer, and an artifact fitted for it through the CLI ---

@pytest.fixture(scope="session")
def tokenizer_dir():
    from nectar_export.models import resolve_checkpoint
    return resolve_checkpoint("default")


def _checkpoint(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import torch

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer_dir):
    return _checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def other_ckpt(tmp_path_factory, tokenizer_dir):
    return _checkpoint(tmp_path_factory.mktemp("other"), tokenizer_dir, seed=1)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, tiny_ckpt):
    out = tmp_path_factory.mktemp("runs") / "art"
    result = run_cli("fit", "--model", str(tiny_ckpt), "--context-tokens", "512", "--quick", "--epochs", "2",
                     "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def nectar_bundle(tmp_path_factory, artifact):
    return export_bundle(artifact, tmp_path_factory.mktemp("bundles") / "nectar")


@pytest.fixture(scope="session")
def full_bundle(tmp_path_factory, artifact):
    return export_bundle(artifact, tmp_path_factory.mktemp("bundles") / "full", "--baseline")
