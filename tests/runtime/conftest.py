"""Runtime fixtures: a tiny random Llama with SmolLM2's tokenizer, its artifact and both bundle kinds, built once.

The artifact comes from the fitting library with few samples (the same pipeline `nectar-export fit` runs; `--quick`
spends ~3 minutes writing self-study questions on 2 cores); the bundles come from the real `nectar-export export`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

N = 512
QUESTIONS = 10          # held-out self-study questions the parity test runs


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A 2-layer random Llama (GQA 6/2, head_dim 16) with SmolLM2's tokenizer and chat template.

    Untied output weights and a wide init (std 0.2): at the default init with tied embeddings a random model's
    greedy answer just repeats the prompt's last token, which would make token-for-token parity vacuous.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nectar_export.models import resolve_checkpoint

    folder = tmp_path_factory.mktemp("ckpt")
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint("default"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, tiny_ckpt) -> Path:
    from nectar_export.config import FitConfig
    from nectar_export.fit import run_fit

    out = tmp_path_factory.mktemp("art") / "art"
    config = FitConfig(model=str(tiny_ckpt), context_tokens=N, continuation=(16, 4, 2), repeat=(4, 1, 1),
                       self_study=(0, 0, QUESTIONS), answer_tokens=16, epochs=2, ablations=False)
    run_fit(config, out)
    return out


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, artifact) -> dict[str, Path]:
    """fp32 bundles exported side by side: "nectar", "full" (full attention), and both with the static KV
    layout ("nectar_static", "full_static")."""
    root = tmp_path_factory.mktemp("bundles")
    outs = {kind: root / kind for kind in ("nectar", "full", "nectar_static", "full_static")}
    procs = {kind: subprocess.Popen([sys.executable, "-m", "nectar_export.cli", "export", str(artifact), "-o",
                                     str(out), *(["--baseline"] if kind.startswith("full") else []),
                                     *(["--cache", "static"] if kind.endswith("static") else [])],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for kind, out in outs.items()}
    for kind, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"export {kind} failed: {err[-2000:]}"
    return outs


@pytest.fixture(scope="session")
def nectar_bundle(bundles) -> Path:
    return bundles["nectar"]


@pytest.fixture(scope="session")
def full_bundle(bundles) -> Path:
    return bundles["full"]


@pytest.fixture
def bundle_copy(tmp_path, nectar_bundle) -> Path:
    """A private copy of the Nectar bundle that a test may damage."""
    return Path(shutil.copytree(nectar_bundle, tmp_path / "copy"))
