"""TensorRT engine builder: the clear error without TensorRT, profile flags and default profile shapes."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from nectar_graphs.tensorrt import TensorRTError, _write_atomic, build_engine, default_profile, parse_profile

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
W = 64          # max_new_tokens in these tests


def _step_inputs(layers=2, kv_heads=3, head_dim=8):
    """Bundle-style input list of a step graph (names and axes as bundle.json writes them)."""
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
              {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
              {"name": "static", "dtype": "float32", "shape": [4, 2]}]
    for layer in range(layers):
        for kv in ("key", "value"):
            inputs.append({"name": f"past_key_values.{layer}.{kv}", "dtype": "float16",
                           "shape": ["batch", kv_heads, "past_sequence", head_dim]})
    return inputs


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_names_the_package(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(TensorRTError, match=r"TensorRT is not installed: pip install tensorrt .*pypi\.nvidia\.com"):
        build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", {"x": ((1, 4), (2, 4), (8, 4))})
    assert not (tmp_path / "model.plan").exists()


def test_parse_profile_reads_known_keys():
    assert parse_profile("batch=1,sequence=128,past=512") == {"batch": 1, "sequence": 128, "past": 512}
    assert parse_profile(" past = 64 , batch=4") == {"past": 64, "batch": 4}


@pytest.mark.parametrize("text, message", [
    ("", "bad profile item ''"),
    ("batch", "expected key=integer"),
    ("batch=two", "expected key=integer"),
    ("batch=-1", "expected key=integer"),
    ("batch=1,,past=4", "bad profile item ''"),
    ("batch=0", "must be at least 1"),
    ("batch=1,batch=2", "given twice"),
    ("beam=4", "unknown profile key 'beam'; known keys: batch"),
])
def test_parse_profile_rejects_bad_text(text, message):
    with pytest.raises(ValueError, match=message):
        parse_profile(text)


def test_default_profile_shapes_are_consistent():
    profile = default_profile(_step_inputs(), 4, max_new_tokens=W, prompt_tokens=20)
    assert "static" not in profile                        # fully static inputs need no profile
    assert profile["input_ids"] == ((1, 1), (1, 20), (4, W)) == profile["position_ids"]
    low, opt, high = profile["attention_mask"]
    past_low, past_opt, past_high = profile["past_key_values.1.value"]
    assert past_low == (1, 3, 0, 8) and past_high == (4, 3, W - 1, 8)
    assert opt[1] == past_opt[2] + 20                     # total = past + sequence at the opt point
    assert (low[1], high[1]) == (1, W)
    for shapes in profile.values():
        assert all(a <= b <= c for lo, op, hi in [shapes] for a, b, c in zip(lo, op, hi))
    # every (P, T) a sequence reaches (P + T <= W, T >= 1) lies inside the box, and the box is tight
    reach = [(p, t) for p in range(W) for t in range(1, W - p + 1)]
    assert {p for p, _ in reach} == set(range(past_low[2], past_high[2] + 1))
    assert {p + t for p, t in reach} == set(range(low[1], high[1] + 1))
    assert {t for _, t in reach} == set(range(profile["input_ids"][0][1], profile["input_ids"][2][1] + 1))


def test_default_profile_opt_stays_inside_when_prompt_fills_the_window():
    profile = default_profile(_step_inputs(), max_new_tokens=W, prompt_tokens=W + 10)
    assert profile["input_ids"][1] == (1, W)
    assert profile["past_key_values.0.key"][1][2] == 0 and profile["attention_mask"][1] == (1, W)


def test_default_profile_full_bundle_shifts_past_by_the_context():
    n = 1000
    profile = default_profile(_step_inputs(), 2, max_new_tokens=W, prompt_tokens=16, cached_tokens=n)
    assert [shape[2] for shape in profile["past_key_values.0.key"]] == [n, n + W // 2, n + W - 1]
    assert [shape[1] for shape in profile["attention_mask"]] == [n + 1, n + W // 2 + 16, n + W]
    assert profile["input_ids"] == ((1, 1), (1, 16), (2, W))


def test_default_profile_rejects_unknown_axes_and_bad_sizes():
    with pytest.raises(ValueError, match="axis names \\['beam'\\]"):
        default_profile([{"name": "x", "dtype": "int64", "shape": ["batch", "beam"]}], max_new_tokens=W,
                        prompt_tokens=4)
    with pytest.raises(ValueError, match="batch >= 1"):
        default_profile(_step_inputs(), 0, max_new_tokens=W, prompt_tokens=4)


def test_atomic_write_leaves_only_the_target(tmp_path):
    target = tmp_path / "model.plan"
    target.write_bytes(b"old engine")
    _write_atomic(np.arange(256, dtype=np.uint8).tobytes(), target)
    assert target.read_bytes() == bytes(range(256))
    assert [p.name for p in tmp_path.iterdir()] == ["model.plan"]
