"""Artifact round trip and refusal of artifacts that belong to another model or document."""

from __future__ import annotations

import json

import pytest
import torch

from nectar_export.artifact import (ArtifactManifest, ContextRecord, HeldOut, ModelRecord, load_artifact,
                                    read_heldout, read_manifest, save_artifact)
from nectar_export.config import FitConfig
from nectar_export.errors import NectarError
from nectar_export.heads import MLPPair, QuadraturePair
from nectar_export.samples import Sample

MODEL, CONTEXT = "a" * 64, "c" * 64


def _manifest():
    model = ModelRecord(source="tiny", fingerprint=MODEL, model_type="llama", layers=2, kv_heads=2, query_heads=4,
                        head_dim=8, scaling=8 ** -0.5, max_positions=1024)
    context = ContextRecord(source="text", sha256=CONTEXT, n=100, sinks=4, window=2, document_tokens=90,
                            prefix_text="<user>", question_template="{question}<assistant>")
    return ArtifactManifest(model=model, context=context, max_new_tokens=32, config=FitConfig(),
                            fit={"nectar_params": 1000, "kv_entries": 6400})


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
    with pytest.raises(NectarError, match="already holds a Nectar artifact; pass --overwrite"):
        save_artifact(tmp_path / "art", _manifest(), {"nectar": _heads()["nectar"]})
    save_artifact(tmp_path / "art", _manifest(), {"nectar": _heads()["nectar"]}, overwrite=True)
    assert set(read_manifest(tmp_path / "art").variants) == {"nectar"} and not (tmp_path / "art" / "ablations").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_manifest_and_heldout_round_trip_through_their_json(tmp_path):
    heldout = HeldOut(context_ids=(5, 6, 7), test=(Sample("repeat", (1, 2)), Sample("self_study", (3,), "Why?")))
    written = save_artifact(tmp_path / "art", _manifest(), _heads(), heldout)
    assert read_manifest(tmp_path / "art") == written and written.exact_tokens == (4, 2)
    assert read_heldout(tmp_path / "art") == heldout and [s.question for s in heldout.questions()] == ["Why?"]


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.pop("context"), "lacks context"),
    (lambda m: m["model"].update(kv_heads="2"), "kv_heads is '2', expected an integer"),
    (lambda m: m["context"].update(n=-1), "n is -1, expected an integer in"),
    (lambda m: m["variants"]["nectar"].update(file="../../etc/passwd"), "a path inside the artifact folder"),
    (lambda m: m["variants"]["nectar"]["layers"].pop(), "2 pair shapes"),
    (lambda m: m["config"].update(family="rnn"), "config is not a fit configuration"),
    (lambda m: m["context"].update(question_template="{question:>30000000}"), "exactly one plain {question}"),
    (lambda m: m["context"].update(question_template="{question.__class__}"), "exactly one plain {question}"),
    (lambda m: m.update(format="nectar-artifact/9"), "this version reads 'nectar-artifact/1'"),
])
def test_a_hand_edited_manifest_gets_one_line_naming_the_key(tmp_path, edit, words):
    save_artifact(tmp_path / "art", _manifest(), _heads())
    file = tmp_path / "art" / "nectar.json"
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))
    with pytest.raises(NectarError, match=words) as info:
        load_artifact(tmp_path / "art", MODEL)
    assert "\n" not in str(info.value)


def test_a_missing_or_broken_heldout_is_a_clear_error(tmp_path):
    save_artifact(tmp_path / "art", _manifest(), _heads())
    with pytest.raises(NectarError, match="no heldout.json.*refit"):
        read_heldout(tmp_path / "art")
    (tmp_path / "art" / "heldout.json").write_text('{"context_ids": [1, "x"], "test": []}')
    with pytest.raises(NectarError, match="context_ids .* expected a list of token ids"):
        read_heldout(tmp_path / "art")


def test_a_weights_file_reached_through_a_symbolic_link_is_refused(tmp_path):
    save_artifact(tmp_path / "art", _manifest(), _heads())
    weights = tmp_path / "art" / "nectar.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)
    with pytest.raises(NectarError, match="is a symbolic link"):
        load_artifact(tmp_path / "art", MODEL)
