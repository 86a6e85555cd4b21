"""Shared fixtures: tiny random models of every supported architecture, built from configs in code."""

from __future__ import annotations

import os

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


TINY_CONFIGS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3}


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request):
    return request.param
