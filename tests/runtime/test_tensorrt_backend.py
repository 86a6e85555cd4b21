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

from nectar_runtime.backends.base import SLOT_ALIGN, BackendError, first_slot
from nectar_runtime.backends.tensorrt import TensorRTBackend, kv_capacity, step_inputs
from nectar_runtime.bundle import FORMAT, BundleError, file_entry, load_bundle

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
LAYERS, KV_HEADS, HEAD_DIM, N, WINDOW = 2, 2, 4, 12, 16


def _write_bundle(path, kind="nectar", engine=False, context_tokens=None):
    """A small but complete bundle directory: real ONNX file, tokenizer file, manifest (and context KV, plan).
    context_tokens: the manifest's key (absent when None: N for a full bundle, 0 for a Nectar one)."""
    path.mkdir()
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "sequence"])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])],
                                                  "step", [x], [y])), path / "model.onnx")
    (path / "tokenizer.json").write_text("{}")
    files = ["model.onnx", "tokenizer.json"]
    past = {"key": "past_key_values.{layer}.key", "value": "past_key_values.{layer}.value",
            "present_key": "present.{layer}.key", "present_value": "present.{layer}.value"}
    context = (N if kind == "full" else 0) if context_tokens is None else context_tokens
    if context:
        kv = np.zeros((1, KV_HEADS, context, HEAD_DIM), np.float16)
        save_file({past[k].format(layer=i): kv for i in range(LAYERS) for k in ("key", "value")},
                  str(path / "context.safetensors"))
        files.append("context.safetensors")
    manifest = {"format": FORMAT, "kind": kind, "precision": "fp16", "kv_dtype": "float16", "n": N,
                "first_position": N, "max_new_tokens": WINDOW, "logits": "last", "layers": LAYERS,
                "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": 32,
                "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
                "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 1, 32]}],
                "past": past, "template": {"question": "{question}"}, "stop_token_ids": [0], "pad_token_id": 0}
    if context_tokens is not None:
        manifest["context_tokens"] = context_tokens
    if engine:
        (path / "model.plan").write_bytes(b"not a real engine")
        files.append("model.plan")
        manifest["engines"] = {"tensorrt": {"file": "model.plan", "profile": {}, "tensorrt_version": "11.0"}}
    manifest["files"] = {name: file_entry(path / name) for name in files}
    (path / "bundle.json").write_text(json.dumps(manifest))
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


def test_kv_capacity_covers_the_context_tokens(tmp_path):
    """The past starts with the bundle's context tokens: all n of a full bundle, a Nectar bundle's exact tokens
    (none in bundles written before context_tokens existed)."""
    assert kv_capacity(_write_bundle(tmp_path / "nectar")) == WINDOW
    assert kv_capacity(_write_bundle(tmp_path / "full", kind="full")) == N + WINDOW
    exact = _write_bundle(tmp_path / "exact", context_tokens=3)
    assert kv_capacity(exact) == 3 + WINDOW and first_slot(exact) == 3
    exact.manifest["cache_layout"] = "static"              # static buffers: whole multiples of SLOT_ALIGN slots
    assert kv_capacity(exact) == -(-(3 + WINDOW) // SLOT_ALIGN) * SLOT_ALIGN > 3 + WINDOW and first_slot(exact) == 3


def test_a_bundle_with_context_tokens_needs_its_context_file(tmp_path):
    bundle = _write_bundle(tmp_path / "exact", context_tokens=3)
    manifest = json.loads((bundle.path / "bundle.json").read_text())
    del manifest["files"]["context.safetensors"]
    (bundle.path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not list context.safetensors"):
        load_bundle(bundle.path)


def test_step_inputs_positions_and_mask():
    ids, positions, mask = step_inputs(np.array([[5, 6, 7], [8, 9, 10]], np.int32), position=N + 4, past=N + 4)
    assert ids.dtype == positions.dtype == mask.dtype == np.int64
    assert ids.flags.c_contiguous and positions.flags.c_contiguous
    np.testing.assert_array_equal(positions, [[16, 17, 18], [16, 17, 18]])
    assert mask.shape == (2, N + 4 + 3) and mask.min() == 1
    _, positions, mask = step_inputs(np.array([[1]]), position=N, past=0)   # first Nectar step: empty past
    assert positions.tolist() == [[N]] and mask.shape == (1, 1)
