"""Artifact round trip and refusal of artifacts that belong to another model or document."""

from __future__ import annotations

import json

import pytest
import torch

from nectar_export.artifact import load_artifact, read_manifest, save_artifact
from nectar_export.errors import NectarError
from nectar_export.heads import MLPPair, QuadraturePair

MODEL, CONTEXT = "a" * 64, "c" * 64


def _manifest():
    return {"model": {"fingerprint": MODEL, "kv_heads": 2, "head_dim": 8},
            "context": {"sha256": CONTEXT, "n": 100, "sinks": 4, "window": 2}}


def _heads():
    torch.manual_seed(0)
    mlp = [MLPPair(2, 8, 16, 8), MLPPair(2, 8, 24, 8)]
    for p in mlp:
        for w in p.parameters():
            torch.nn.init.normal_(w)
    return {"nectar": mlp, "quadrature": [QuadraturePair(2, 8, 5), QuadraturePair(2, 8, 7)]}


def test_round_trip_keeps_every_weight(tmp_path):
    heads = _heads()
    save_artifact(tmp_path / "art", _manifest(), heads)
    loaded = load_artifact(tmp_path / "art", MODEL, CONTEXT)
    assert loaded.exact_tokens == (4, 2) and loaded.n == 100
    q = torch.randn(2, 11, 8)
    for variant in heads:
        for a, b in zip(heads[variant], loaded.heads[variant]):
            torch.testing.assert_close(a(q, 0.3), b(q, 0.3), rtol=0, atol=0)


def test_other_model_or_context_is_refused_naming_both(tmp_path):
    save_artifact(tmp_path / "art", _manifest(), _heads())
    with pytest.raises(NectarError, match=f"{MODEL[:16]}.*{'b' * 16}"):
        load_artifact(tmp_path / "art", "b" * 64)
    with pytest.raises(NectarError, match=f"{CONTEXT[:16]}.*{'d' * 16}"):
        load_artifact(tmp_path / "art", MODEL, "d" * 64)


def test_corrupt_weights_and_foreign_folders_are_refused(tmp_path):
    save_artifact(tmp_path / "art", _manifest(), _heads())
    (tmp_path / "art" / "nectar.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NectarError, match="cannot read"):
        load_artifact(tmp_path / "art", MODEL)
    with pytest.raises(NectarError, match="not a Nectar artifact"):
        read_manifest(tmp_path)
    (tmp_path / "art" / "nectar.json").write_text("{broken")
    with pytest.raises(NectarError, match="not valid JSON"):
        read_manifest(tmp_path / "art")


def test_rewriting_an_artifact_replaces_it_whole(tmp_path):
    save_artifact(tmp_path / "art", _manifest(), _heads())
    save_artifact(tmp_path / "art", _manifest(), {"nectar": _heads()["nectar"]})
    manifest = json.loads((tmp_path / "art" / "nectar.json").read_text())
    assert set(manifest["variants"]) == {"nectar"} and not (tmp_path / "art" / "ablations").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
