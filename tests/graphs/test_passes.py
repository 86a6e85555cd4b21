"""Each pass on a tiny graph built in code, checked in ONNX Runtime with its own optimizations off."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from nectar_graphs.passes import cleanup, convert_precision, fold_constants, fuse_sibling_matmuls, op_counts

RNG = np.random.default_rng(0)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _model(nodes, inputs, outputs, initializers) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    proto.ir_version = 10
    return ir.from_proto(proto)


def _siblings() -> ir.Model:
    """x [2, 4] read by three MatMuls (two mergeable, one of another leading shape) and a shared weight."""
    weights = {"w1": RNG.standard_normal((4, 3), np.float32), "w2": RNG.standard_normal((4, 5), np.float32),
               "w3": RNG.standard_normal((4, 2), np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="m1"),
             helper.make_node("MatMul", ["x", "w2"], ["b"], name="m2"),
             helper.make_node("MatMul", ["x", "w3"], ["c"], name="m3"),
             helper.make_node("MatMul", ["y", "w3"], ["d"], name="m4"),      # w3 also read elsewhere: not fused
             helper.make_node("Concat", ["a", "b", "c", "d"], ["out"], axis=-1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    return _model(nodes, [x, y], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 12])], weights)


def test_fuse_sibling_matmuls_merges_and_preserves_values():
    feeds = {"x": RNG.standard_normal((2, 4), np.float32), "y": RNG.standard_normal((2, 4), np.float32)}
    model = _siblings()
    before = _run(model, feeds)[0]
    report = fuse_sibling_matmuls(model)
    assert report.changed and report.counts == {"other": 1}
    assert report.notes == {"weight shared with another node": 2}
    assert op_counts(model)["MatMul"] == 3 and op_counts(model)["Split"] == 1
    np.testing.assert_allclose(_run(model, feeds)[0], before, rtol=1e-6, atol=1e-6)
    again = fuse_sibling_matmuls(model)
    assert not again.changed


def test_fusion_drops_the_weights_it_replaced():
    """w1 and w2 live on in the fused weight and leave the graph with the fusion (freed then, not at cleanup)."""
    model = _siblings()
    before = set(model.graph.initializers)
    fuse_sibling_matmuls(model)
    assert {"w1", "w2"} <= before and not {"w1", "w2"} & set(model.graph.initializers)
    assert cleanup(model).counts["initializers_removed"] == 0


def test_fold_constants_counts_removed_nodes():
    nodes = [helper.make_node("Add", ["c1", "c2"], ["c3"]), helper.make_node("Mul", ["x", "c3"], ["out"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    model = _model(nodes, [x], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3])],
                   {"c1": np.ones(3, np.float32), "c2": np.full(3, 2.0, np.float32)})
    report = fold_constants(model)
    assert report.changed and report.counts == {"nodes_before": 2, "nodes_after": 1}
    np.testing.assert_allclose(_run(model, {"x": np.arange(3, dtype=np.float32)})[0], [0.0, 3.0, 6.0])


def _softmax_graph() -> ir.Model:
    rng = np.random.default_rng(1)
    """MatMul (low precision) -> Exp, ReduceSum and Div tagged as an fp32 island (the norms' Normalize module
    class) -> MatMul."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["s"], name="mm"),
             helper.make_node("Exp", ["s"], ["e"], name="exp"),
             helper.make_node("ReduceSum", ["e", "axes"], ["z"], keepdims=1, name="sum"),
             helper.make_node("Div", ["e", "z"], ["p"], name="div"),
             helper.make_node("MatMul", ["p", "v"], ["out"], name="pv")]
    for node in nodes[1:4]:
        node.metadata_props.add(key="pkg.torch.onnx.class_hierarchy", value="['nectar_graphs.step.Normalize']")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    return _model(nodes, [x], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4])],
                  {"w": rng.standard_normal((8, 6), np.float32) * 0.5, "v": rng.standard_normal((6, 4), np.float32),
                   "axes": np.array([-1], np.int64)})


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_precision_keeps_an_fp32_island(precision):
    model = _softmax_graph()
    report = convert_precision(precision)(model)
    low = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}[precision]
    types = {node.name: node.outputs[0].dtype for node in model.graph}
    assert types["mm"] == low and types["pv"] == low
    assert types["exp"] == types["sum"] == types["div"] == ir.DataType.FLOAT
    assert model.graph.initializers["w"].dtype == low
    assert report.counts["casts_inserted"] == 2           # s up to fp32, p down again
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_fp16_graph_runs_close_to_fp32():
    feeds = {"x": RNG.standard_normal((2, 8), np.float32)}
    reference = _run(_softmax_graph(), feeds)[0]
    model = _softmax_graph()
    convert_precision("fp16")(model)
    got = _run(model, {"x": feeds["x"].astype(np.float16)})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), reference, atol=2e-2)


def test_fp32_precision_is_a_no_op():
    model = _softmax_graph()
    assert not convert_precision("fp32")(model).changed


def test_tensors_with_dim_finds_initializers_and_values():
    from nectar_graphs.bundle_writer import tensors_with_dim

    model = _softmax_graph()            # w [8, 6], v [6, 4], x [2, 8]
    assert tensors_with_dim(model, 6) == ["v", "w"]
    assert tensors_with_dim(model, 5) == []
    convert_precision("fp16")(model)    # typed intermediates: s [2, 6] and its casts
    assert {"s", "v", "w"} <= set(tensors_with_dim(model, 6))


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_lower_array_rounds_as_numpy_does(name):
    """torch's conversion (the fast path) against numpy's astype, bit for bit, on random and edge values."""
    import ml_dtypes

    from nectar_graphs.passes import lower_array

    dtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    rng = np.random.default_rng(0)
    edges = [0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 1e5, -1e5, 6e-8, 3e-8, 1e-40, 3.4e38, 1 + 2**-11,
             1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8]
    array = np.concatenate([rng.standard_normal(100_000) * 10.0 ** rng.integers(-9, 6, 100_000),
                            np.array(edges)]).astype(np.float32).reshape(4, -1)
    got = lower_array(array, dtype)
    assert got.dtype == dtype and got.shape == array.shape
    with np.errstate(over="ignore"):                      # 1e5 and 3.4e38 overflow fp16 to inf, on purpose
        assert np.array_equal(got.view(np.uint16), array.astype(dtype).view(np.uint16))
        assert lower_array(array.astype(np.float64), dtype).dtype == dtype    # other inputs: numpy's astype
        for odd in (np.array(1.5, np.float32), np.float32(-2.5), array[:, ::3]):  # 0-d, numpy scalar, strided
            assert lower_array(odd, dtype).shape == np.shape(odd)
            assert np.array_equal(lower_array(odd, dtype).view(np.uint16),
                                  np.asarray(odd).astype(dtype).view(np.uint16))
