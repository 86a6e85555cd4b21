"""TensorRT backend: imports without TensorRT, refuses clearly to activate, and its step feeds and sizes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import save_file

from nectar_runtime.backends import make_backend
from nectar_runtime.backends.base import SLOT_ALIGN, first_slot, kv_capacity, positions_of
from nectar_runtime.backends.tensorrt import TensorRTBackend
from nectar_runtime.bundle import BundleManifest, TensorSpec, load_bundle, past_names
from nectar_runtime.errors import BackendError, BundleError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
LAYERS, KV_HEADS, HEAD_DIM, N, WINDOW = 2, 2, 4, 12, 16


def _write_bundle(path, kind="nectar", engine=False, cached_tokens=None, layout="dynamic"):
    """A small but complete bundle directory: real ONNX file, tokenizer file, manifest (and context KV, plan),
    written through BundleManifest. cached_tokens: None means N for a full bundle and 0 for a Nectar one."""
    path.mkdir()
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "sequence"])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])],
                                                  "step", [x], [y])), path / "model.onnx")
    (path / "tokenizer.json").write_text("{}")
    files = ["model.onnx", "tokenizer.json"]
    cached = (N if kind == "full" else 0) if cached_tokens is None else cached_tokens
    if cached:
        kv = np.zeros((1, KV_HEADS, cached, HEAD_DIM), np.float16)
        save_file({name: kv for name in past_names(LAYERS)}, str(path / "context.safetensors"))
        files.append("context.safetensors")
    engines = {}
    if engine:
        (path / "model.plan").write_bytes(b"not a real engine")
        files.append("model.plan")
        engines = {"tensorrt": {"file": "model.plan", "profile": {}, "tensorrt_version": "11.0"}}
    manifest = BundleManifest(
        kind=kind, precision="fp16", kv_dtype="float16", n=N, first_position=N, max_new_tokens=WINDOW,
        cached_tokens=cached, logits="last", layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=32,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(TensorSpec("logits", "float32", ("batch", 1, 32)),), question_template="{question}",
        stop_token_ids=(0,), pad_token_id=0, cache_layout=layout, engines=engines)
    manifest.with_files(path, files).save(path)
    return load_bundle(path)


def test_module_import_loads_neither_tensorrt_nor_cuda():
    code = ("import sys, nectar_runtime.backends.tensorrt as m; "
            "print(m.TensorRTBackend.name, 'tensorrt' in sys.modules, 'cuda' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["tensorrt", "False", "False"]         # lazy: imported only by activate()


def test_activate_without_engine_says_how_to_build_one(tmp_path):
    backend = TensorRTBackend(_write_bundle(tmp_path / "b"))
    with pytest.raises(BackendError, match=r"has no TensorRT engine; build one with "
                                           r"`nectar-export build BUNDLE --engine tensorrt`"), backend:
        pass
    assert not backend.active


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_activate_without_tensorrt_names_the_package(tmp_path):
    backend = TensorRTBackend(_write_bundle(tmp_path / "b", engine=True))
    with pytest.raises(BackendError, match=r"TensorRT is not installed: pip install tensorrt .*pypi\.nvidia\.com"):
        backend.activate()
    assert not backend.active
    backend.release()                                   # safe after a failed activate


def test_calls_before_activate_are_refused(tmp_path):
    backend = TensorRTBackend(_write_bundle(tmp_path / "b", engine=True))
    with pytest.raises(BackendError, match="not active"):
        backend.reset(1)
    with pytest.raises(BackendError, match="not active"):
        backend.infer({"input_ids": np.zeros((1, 1), np.int64)})


def test_kv_capacity_covers_the_cached_tokens(tmp_path):
    """The past starts with the bundle's cached tokens: all n of a full bundle, a Nectar bundle's exact tokens
    (none in bundles written before they were recorded)."""
    assert kv_capacity(_write_bundle(tmp_path / "nectar")) == WINDOW
    assert kv_capacity(_write_bundle(tmp_path / "full", kind="full")) == N + WINDOW
    exact = _write_bundle(tmp_path / "exact", cached_tokens=3)
    assert kv_capacity(exact) == 3 + WINDOW and first_slot(exact) == 3
    static = _write_bundle(tmp_path / "static", cached_tokens=3, layout="static")   # whole multiples of SLOT_ALIGN
    assert kv_capacity(static) == -(-(3 + WINDOW) // SLOT_ALIGN) * SLOT_ALIGN > 3 + WINDOW and first_slot(static) == 3


def test_static_cache_bundles_are_refused_with_what_to_do(tmp_path):
    bundle = _write_bundle(tmp_path / "static", engine=True, layout="static")
    with pytest.raises(BackendError, match=r"static cache layout.*--cache dynamic.*--backend ort-cuda"):
        make_backend(bundle, "tensorrt")


def test_a_bundle_with_cached_tokens_needs_its_context_file(tmp_path):
    bundle = _write_bundle(tmp_path / "exact", cached_tokens=3)
    manifest = json.loads((bundle.path / "bundle.json").read_text())
    del manifest["files"]["context.safetensors"]
    (bundle.path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not list context.safetensors"):
        load_bundle(bundle.path)


def test_positions_continue_in_every_row():
    positions = positions_of(np.array([[5, 6, 7], [8, 9, 10]], np.int64), N + 4)
    assert positions.dtype == np.int64 and positions.flags.c_contiguous
    np.testing.assert_array_equal(positions, [[16, 17, 18], [16, 17, 18]])
    assert positions_of(np.array([[1]]), N).tolist() == [[N]]


def test_build_refuses_a_static_cache_bundle_before_any_work(tmp_path):
    bundle = _write_bundle(tmp_path / "static", layout="static")
    before = (bundle.path / "bundle.json").read_text()
    done = subprocess.run([sys.executable, "-m", "nectar_export.cli", "build", str(bundle.path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "static cache layout" in done.stderr
    assert (bundle.path / "bundle.json").read_text() == before and not (bundle.path / "model.plan").exists()


def test_a_format_1_bundle_still_loads_and_reads_context_tokens_as_cached_tokens(tmp_path):
    bundle = _write_bundle(tmp_path / "old", cached_tokens=3)
    data = json.loads((bundle.path / "bundle.json").read_text())
    data["format"] = "nectar-bundle/1"
    data["context_tokens"] = data.pop("cached_tokens")
    (bundle.path / "bundle.json").write_text(json.dumps(data))
    assert load_bundle(bundle.path).cached_tokens == 3
    del data["context_tokens"]                          # the first bundles had no such key: 0 for a Nectar bundle
    (bundle.path / "bundle.json").write_text(json.dumps(data))
    assert load_bundle(bundle.path).cached_tokens == 0
    data["format"] = "nectar-bundle/7"
    (bundle.path / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"format 'nectar-bundle/7'; this runtime reads nectar-bundle/1, nectar-bundle/2"):
        load_bundle(bundle.path)


@pytest.mark.parametrize("key, value, words", [
    ("layers", 10 ** 9, "layers is 1000000000, expected an integer in [1, 1024]"),
    ("layers", "2", "layers is '2', expected an integer"),
    ("kind", "partial", "kind is 'partial', expected one of nectar, full"),
    ("max_new_tokens", 0, "max_new_tokens is 0, expected an integer in"),
    ("cached_tokens", N + 1, f"cached_tokens is {N + 1}, expected an integer in [0, {N}]"),
    ("stop_token_ids", [1, -2], "expected a list of token ids"),
    ("past", {"key": "k{layer}"}, "past is"),
    ("template", {"question": "{question:>30000000}"}, "exactly one plain {question}"),
    ("template", {"question": "{question}{0}"}, "exactly one plain {question}"),
])
def test_a_hand_edited_bundle_json_gets_one_line_naming_the_key(tmp_path, key, value, words):
    bundle = _write_bundle(tmp_path / "b", kind="full")
    data = json.loads((bundle.path / "bundle.json").read_text())
    data[key] = value
    (bundle.path / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle.path)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("absolute", [False, True])
def test_a_listed_file_outside_the_folder_is_never_read(tmp_path, absolute):
    """Issue 18: verify hashed any file bundle.json named, an absolute path or one above the folder."""
    bundle = _write_bundle(tmp_path / "b")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    name = str(outside) if absolute else "../outside.txt"
    data = json.loads((bundle.path / "bundle.json").read_text())
    data["files"][name] = {"bytes": outside.stat().st_size, "sha256": "0" * 64}
    (bundle.path / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="not a path inside the bundle folder"):
        load_bundle(bundle.path, check_hashes=True)


def test_a_symbolic_link_inside_a_bundle_is_refused(tmp_path):
    bundle = _write_bundle(tmp_path / "b")
    tokenizer = bundle.path / "tokenizer.json"
    outside = tmp_path / "tokenizer-elsewhere.json"
    tokenizer.rename(outside)
    tokenizer.symlink_to(outside)                      # same bytes, so only the link itself can give it away
    with pytest.raises(BundleError, match="is a symbolic link"):
        load_bundle(bundle.path, check_hashes=True)
