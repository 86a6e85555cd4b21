"""Shared fixtures: tiny random models of every supported architecture, built from configs in code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

TINY = dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6)


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(**TINY, rope_theta=10000.0)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(**TINY, sliding_window=None)


def _qwen2():
    from transformers import Qwen2Config
    return Qwen2Config(**TINY, use_sliding_window=False)


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(**TINY, head_dim=16, use_sliding_window=False)   # q/k norm, head_dim != hidden/heads


def _llama_rope_llama3():
    """Llama 3's rotary scaling (Llama-3.1/3.2 checkpoints), sized so that it changes most frequencies here."""
    from transformers import LlamaConfig
    return LlamaConfig(**TINY, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64})


def _qwen2_rope_yarn():
    """YaRN rotary scaling (Qwen2.5's long-context setting): new frequencies and a scaled cos/sin."""
    from transformers import Qwen2Config
    return Qwen2Config(**TINY, use_sliding_window=False,
                       rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                                        "original_max_position_embeddings": 64})


TINY_CONFIGS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3}
VARIANTS = {"llama-rope-llama3": _llama_rope_llama3, "qwen2-rope-yarn": _qwen2_rope_yarn}       # not every architecture test needs these


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config({**TINY_CONFIGS, **VARIANTS}[arch](), dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request):
    return request.param


# --- a tiny checkpoint with SmolLM2's tokenizer, and an artifact fitted for it through the CLI ---

def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nectar_export.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=900)


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


def export_bundle(artifact: Path, out: Path, *flags: str) -> Path:
    result = run_cli("export", str(artifact), "-o", str(out), *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def nectar_bundle(tmp_path_factory, artifact):
    return export_bundle(artifact, tmp_path_factory.mktemp("bundles") / "nectar")


@pytest.fixture(scope="session")
def full_bundle(tmp_path_factory, artifact):
    return export_bundle(artifact, tmp_path_factory.mktemp("bundles") / "full", "--baseline")
