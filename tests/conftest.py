"""The suite's one set of fixtures: the architecture parameter; a tiny checkpoint with SmolLM2's tokenizer, the
artifact the CLI fits for it and the bundles the CLI exports from that; static-layout step graphs traced once for
tests/graphs. Each is built once per session.

Helpers that tests import (tiny models from configs in code, the CLI in a subprocess) are in tests/helpers.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_CONFIGS, random_heads, run_cli, tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)
# The bench scripts are programs, not a package: `python bench/X.py` puts bench/ first on sys.path, which is how
# they import each other and bench/harness.py. Their tests import them the same way.
BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


@pytest.fixture(params=sorted(TINY_CONFIGS))
def arch(request):
    return request.param


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def static_traces(request):
    """Static-layout step graphs of a tiny model, Nectar (random heads) and full attention, as export_step traces
    them, before any pass: (arch, model, (pairs, keys, values), {kind: serialized ONNX}). Tracing is most of the
    cost; test_trace_static_cache.py (fp32 passes) and test_step.py (fp16 passes) each load their own copy."""
    import onnx_ir as ir

    from nectar_graphs.step import StepModule, nectar_contexts
    from nectar_graphs.trace import export_step

    model = tiny_model(request.param)
    pairs, keys, values = random_heads(model)
    traced = {kind: ir.to_proto(export_step(StepModule(model, contexts, static=True).eval())).SerializeToString()
              for kind, contexts in (("nectar", nectar_contexts(pairs)), ("full", None))}
    return request.param, model, (pairs, keys, values), traced


# --- a tiny checkpoint with SmolLM2's tokenizer, its artifact (fitted through the CLI) and bundles ---

@pytest.fixture(scope="session")
def tokenizer_dir():
    from nectar_export.models import resolve_checkpoint
    return resolve_checkpoint("default")


def _checkpoint(folder: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A 2-layer random Llama (GQA 6/2, head_dim 16) with SmolLM2's tokenizer and chat template.

    Tied embeddings, as SmolLM2 has (the export must store the table once: test_cli_export checks the bundle's
    weight bytes), and a wide init (std 0.2): at the default init a tied random model's greedy answer just
    repeats the prompt's last token, which would make the runtime's token-for-token parity vacuous.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tokenizer_dir) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def other_ckpt(tmp_path_factory, tokenizer_dir) -> Path:
    """tiny_ckpt's architecture with other weights (seed 1): another model fingerprint."""
    return _checkpoint(tmp_path_factory.mktemp("other"), tokenizer_dir, seed=1)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, tiny_ckpt) -> Path:
    """`nectar-export fit --quick --epochs 2` on 512 context tokens: the Nectar heads and both ablations, and
    20 held-out self-study questions (the runtime's parity tests ask 10 of them)."""
    out = tmp_path_factory.mktemp("runs") / "art"
    result = run_cli("fit", "--model", str(tiny_ckpt), "--context-tokens", "512", "--quick", "--epochs", "2",
                     "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def whole_artifact(tmp_path_factory, tiny_ckpt) -> Path:
    """`fit --quick --epochs 1 --salient 0.25` on a document that fits whole (the first 1,500 characters of
    manual-4k): coverage samples, per-head salient exact tokens, no ablations."""
    from nectar_export.context import load_document

    root = tmp_path_factory.mktemp("whole")
    (root / "doc.txt").write_text(load_document("manual-4k").text[:1500])
    result = run_cli("fit", "--model", str(tiny_ckpt), "--context", str(root / "doc.txt"), "--quick", "--epochs", "1",
                     "--no-ablations", "--salient", "0.25", "-o", str(root / "art"))
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "art"


@pytest.fixture(scope="session")
def small_qa(tmp_path_factory) -> Path:
    """Four questions of the shipped manual-4k QA set, both splits (the whole set is 82: too slow for a test)."""
    lines = (Path(__file__).parents[1] / "nectar_export/data/python-manual-4k-qa.jsonl").read_text().splitlines()
    picked = [line for line in lines if '"tune"' in line][:2] + [line for line in lines if '"untouched"' in line][:2]
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("\n".join(picked) + "\n")
    return path


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, artifact) -> dict[str, Path]:
    """fp32 bundles of the artifact, exported side by side by `nectar-export export`: "nectar", "full" (full
    attention), and both with the static KV layout ("nectar_static", "full_static")."""
    root = tmp_path_factory.mktemp("bundles")
    outs = {kind: root / kind for kind in ("nectar", "full", "nectar_static", "full_static")}
    _run_all({kind: ["export", str(artifact), "-o", str(out), *(["--baseline"] if kind.startswith("full") else []),
                     *(["--cache", "static"] if kind.endswith("static") else [])] for kind, out in outs.items()})
    return outs


@pytest.fixture(scope="session")
def nectar_bundle(bundles) -> Path:
    return bundles["nectar"]


@pytest.fixture(scope="session")
def full_bundle(bundles) -> Path:
    return bundles["full"]


@pytest.fixture(scope="session")
def packs(tmp_path_factory, artifact, whole_artifact) -> dict[str, Path]:
    """Base bundles exported from `artifact` (`export --base`, dynamic and static layouts), packs of two documents
    for the dynamic base ("manual": the artifact's 512 tokens, "whole": whole_artifact's document, with salient
    exact tokens and heads of another width), and whole_artifact's single-file Nectar bundle to compare with."""
    root = tmp_path_factory.mktemp("packs")
    jobs = {"base": ["export", str(artifact), "--base"], "base_static": ["export", str(artifact), "--base",
                                                                          "--cache", "static"],
            "whole_bundle": ["export", str(whole_artifact)]}
    _run_all({name: [*cmd, "-o", str(root / name)] for name, cmd in jobs.items()})
    _run_all({name: ["pack", str(art), "--base", str(root / "base"), "-o", str(root / name)]
              for name, art in (("manual", artifact), ("whole", whole_artifact))})
    return {name: root / name for name in [*jobs, "manual", "whole"]}


def _run_all(commands: dict[str, list[str]]) -> None:
    """nectar-export commands side by side; each must succeed."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "nectar_export.cli", *cmd], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, cmd in commands.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name} failed: {err[-2000:]}"


@pytest.fixture
def bundle_copy(tmp_path, nectar_bundle) -> Path:
    """A private copy of the Nectar bundle that a test may damage."""
    return Path(shutil.copytree(nectar_bundle, tmp_path / "copy"))
