"""TensorRT lint on tiny graphs built in code: op support, restrictions, custom domains, dynamic axes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nectar_graphs.lint import TENSORRT_OPS, TENSORRT_RESTRICTIONS, format_lint, lint


def _model(nodes, inputs, outputs, initializers=(), opsets=(("", 18),), functions=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                             functions=list(functions))


def _run(model, feeds):
    """Run with ONNX Runtime, its graph optimizations off (the graph under test is what runs)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _matmul_softmax():
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "w")
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Softmax", ["h"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])


def test_matmul_softmax_is_supported_with_restrictions():
    model = _matmul_softmax()
    onnx.checker.check_model(model, full_check=True)
    (y,) = _run(model, {"x": np.ones((2, 4), np.float32)})
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
    report = lint(model)
    assert report["unsupported_ops"] == {} and report["custom_domain_ops"] == []
    assert report["op_counts"] == {"MatMul": 1, "Softmax": 1}
    assert set(report["restricted_ops"]) == {"MatMul", "Softmax"}
    assert "INT64" in report["restricted_ops"]["MatMul"]
    assert report["dynamic_dims"] == {} and report["profile_axes"] == [] and report["int64_tensors"] == 0
    assert "parser supports all of them" in format_lint(report)


def test_op_tensorrt_lacks_is_reported_with_count():
    # Det is "N" in onnx-tensorrt's operators.md; ONNX Runtime runs it, TensorRT's parser does not.
    model = _model([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Det", ["r"], ["d"]),
                    helper.make_node("Det", ["x"], ["e"]), helper.make_node("Add", ["d", "e"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    onnx.checker.check_model(model, full_check=True)
    (y,) = _run(model, {"x": np.diag([1.0, 2.0, 3.0]).astype(np.float32)})
    assert y == 12.0
    report = lint(model)
    assert report["unsupported_ops"] == {"Det": 2}
    assert report["op_counts"] == {"Add": 1, "Det": 2, "Relu": 1}
    text = format_lint(report)
    assert "NOT parseable" in text and "unsupported: Det x2" in text


def test_custom_domain_ops_are_listed_not_counted():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 2])
    model = _model([helper.make_node("FusedMatMul", ["a", "b"], ["m"], domain="com.microsoft", alpha=2.0),
                    helper.make_node("Relu", ["m"], ["y"])],
                   [a, b], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                   opsets=(("", 18), ("com.microsoft", 1)))
    (y,) = _run(model, {"a": np.ones((2, 3), np.float32), "b": np.ones((3, 2), np.float32)})
    np.testing.assert_allclose(y, 6.0)
    report = lint(model)
    assert report["custom_domain_ops"] == ["com.microsoft::FusedMatMul"]
    assert report["op_counts"] == {"Relu": 1} and report["unsupported_ops"] == {}
    assert "need a plugin" in format_lint(report)


def test_dynamic_dims_give_profile_axes_and_int64_count():
    emb = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "emb")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),                       # [B, T, 4]
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),     # [B, P + T]
             helper.make_node("ReduceSum", ["m"], ["s"], keepdims=0),                       # scalar
             helper.make_node("Mul", ["h", "s"], ["y"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
              helper.make_tensor_value_info("scale", TensorProto.FLOAT, [None, 4])]        # unnamed dynamic dim
    nodes.append(helper.make_node("Mul", ["scale", "scale"], ["z"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4]),
               helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 4])]
    model = _model(nodes, inputs, outputs, [emb])
    onnx.checker.check_model(model, full_check=True)
    for batch, tokens, total in ((1, 3, 3), (2, 1, 5)):          # really dynamic: two shapes, one graph
        y, _ = _run(model, {"input_ids": np.zeros((batch, tokens), np.int64),
                            "attention_mask": np.ones((batch, total), np.int64),
                            "scale": np.ones((1, 4), np.float32)})
        assert y.shape == (batch, tokens, 4)
    report = lint(model)
    assert report["dynamic_dims"] == {"input_ids": {0: "batch", 1: "sequence"},
                                      "attention_mask": {0: "batch", 1: "total_sequence"}, "scale": {0: "?"}}
    assert report["profile_axes"] == ["?", "batch", "sequence", "total_sequence"]
    assert report["int64_tensors"] == 2
    assert set(report["restricted_ops"]) == {"Cast", "ReduceSum"}
    text = format_lint(report)
    assert "dynamic input_ids: axis 0 = batch, axis 1 = sequence" in text and "int64 inputs: 2" in text


def test_subgraphs_and_local_functions_are_walked():
    then_graph = helper.make_graph([helper.make_node("Det", ["x"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, [])])
    else_graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["e"], keepdims=0)], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, [])])
    square = helper.make_function("local", "Square", ["a"], ["b"], [helper.make_node("Mul", ["a", "a"], ["b"])],
                                  [helper.make_opsetid("", 18)])
    model = _model([helper.make_node("If", ["c"], ["v"], then_branch=then_graph, else_branch=else_graph),
                    helper.make_node("Square", ["v"], ["y"], domain="local")],
                   [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                    helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                   opsets=(("", 18), ("local", 1)), functions=[square])
    x = np.array([[2.0, 0.0], [0.0, 3.0]], np.float32)
    assert _run(model, {"c": np.array(True), "x": x})[0] == 36.0
    assert _run(model, {"c": np.array(False), "x": x})[0] == 25.0
    report = lint(model)
    assert report["op_counts"] == {"Det": 1, "If": 1, "Mul": 1, "ReduceSum": 1}
    assert report["unsupported_ops"] == {"Det": 1} and report["custom_domain_ops"] == []


def test_tables_are_consistent():
    assert set(TENSORRT_RESTRICTIONS) <= TENSORRT_OPS
    for op in ("MatMul", "Softmax", "Gather", "Concat", "Attention", "RMSNormalization", "Trilu", "Where"):
        assert op in TENSORRT_OPS
    for op in ("Det", "Unique", "BitShift", "MatMulInteger", "SequenceAt", "StringSplit", "TfIdfVectorizer"):
        assert op not in TENSORRT_OPS


def test_lint_flags_axes_computed_at_run_time():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum_runtime_axes"),
             helper.make_node("ReduceSum", ["y", "fixed"], ["z"], name="sum_fixed_axes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]),
                                           helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                              [helper.make_tensor("fixed", TensorProto.INT64, [1], [0])])
    report = lint(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    assert report["non_constant_axes"] == ["ReduceSum sum_runtime_axes"]
    assert "axes computed at run time" in format_lint(report)
