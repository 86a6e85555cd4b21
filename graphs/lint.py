"""Graph lint for TensorRT: which ops its ONNX parser lacks or restricts, and which axes need a profile.

The tables follow onnx/onnx-tensorrt docs/operators.md, revision "TensorRT 10.15 supports operators in
the inclusive range of opset 9 to opset 24" (the newest revision found; TensorRT 11 ships the same
parser lineage, so treat the tables as a floor, not a promise). Ops marked "N" there are absent from
TENSORRT_OPS; TENSORRT_RESTRICTIONS keeps the restrictions column (and type gaps) that can bite a
decoder step graph.

INT64: onnx-tensorrt up to TensorRT 8.6 documented "limited support for INT32, INT64 ... TensorRT will
attempt to cast down INT64 to INT32" (the parser warned "Your ONNX model has been generated with INT64
weights ... Attempting to cast down to INT32"). From TensorRT 9.2/10.0 INT64 is a listed ONNX data type
and most index/shape ops accept it natively, but math ops such as MatMul and Softmax take floats only.
`int64_tensors` counts int64 graph inputs (input_ids, position_ids, attention_mask in the step graph)
so a report shows what an older TensorRT would have narrowed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import onnx

TENSORRT_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN
RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

_FLOAT_ONLY = "floating point only (FP32, FP16, BF16): no INT32/INT64 inputs"
_AXES_CONST = "`axes` must be an initializer"
TENSORRT_RESTRICTIONS = {
    "MatMul": _FLOAT_ONLY, "Gemm": _FLOAT_ONLY, "Softmax": _FLOAT_ONLY, "LogSoftmax": _FLOAT_ONLY,
    "Exp": _FLOAT_ONLY, "Log": _FLOAT_ONLY, "Sqrt": _FLOAT_ONLY, "Reciprocal": _FLOAT_ONLY,
    "Sigmoid": _FLOAT_ONLY, "Tanh": _FLOAT_ONLY, "Erf": _FLOAT_ONLY, "Sin": _FLOAT_ONLY, "Cos": _FLOAT_ONLY,
    "Cast": "to/from FP32, FP16, BF16, INT32, INT64, UINT8, BOOL; DOUBLE is cast down to FLOAT (clamped), "
            "INT8/FP8/INT4/FP4 only through Q/DQ",
    "Attention": "Q, K, V and attn_mask must be 4D; past_key/past_value/nonpad_kv_seqlen inputs and "
                 "present_key/present_value/qk_matmul_output outputs unsupported; no softcap",
    "TensorScatter": "past_cache and update must be 4D, axis must be -2; FP32/FP16/BF16/INT32 (no INT64)",
    "RotaryEmbedding": "`position_ids` must be INT64",
    "LayerNormalization": "only the first output Y is supported",
    "CumSum": "`axis` must be a build-time constant",
    "ReduceSum": _AXES_CONST, "ReduceMean": _AXES_CONST, "ReduceMax": _AXES_CONST, "ReduceMin": _AXES_CONST,
    "ReduceProd": _AXES_CONST, "ReduceLogSumExp": _AXES_CONST, "ReduceSumSquare": _AXES_CONST,
    "ReduceL1": _AXES_CONST, "ReduceL2": _AXES_CONST, "ReduceLogSum": _AXES_CONST,
    "Squeeze": "`axes` must be resolvable to a constant", "Unsqueeze": "`axes` must be resolvable to a constant",
    "ScatterND": "`reduction` other than none is not supported",
    "TopK": "`sorted` must be 1 and K below 3840",
    "Dropout": "`is_training` must be an initializer that evaluates to False",
    "Constant": "sparse_value, value_string and value_strings attributes unsupported",
    "If": "both branches' outputs must have the same rank and different names",
    "Loop": "scan output length cannot be dynamic; loop-carried shapes must not change across iterations",
    "OneHot": "`depth` must be a build-time constant", "Hardmax": "the `axis` dimension must be a build-time constant",
    "EyeLike": "input must have static dimensions", "GridSample": "4D input only; FP32/FP16 (no BF16)",
    "NonZero": "FP32/FP16 only (no BF16); data-dependent output shape",
    "NonMaxSuppression": "FP32/FP16 only (no BF16)",
    "Mish": "FP32/FP16 only (no BF16)", "RoiAlign": "FP32/FP16 only (no BF16)", "DeformConv": "FP32/FP16 only (no BF16)",
    "STFT": "FP32 only; frame_step and window must be initializers",
    "AveragePool": "2D or 3D only; dilations empty or all ones",
    "MaxPool": "2D or 3D only; no Indices output; dilations empty or all ones",
    "Resize": "half_pixel/pytorch_half_pixel/tf_half_pixel_for_nn/asymmetric/align_corners; nearest or linear; "
              "no antialiasing",
    "LSTM": "bidirectional needs the same activations both ways; input_forget = 0, layout = 0",
    "DequantizeLinear": "INT8, FP8, FP4, INT4 with zero x_zero_point", "QuantizeLinear": "`y_zero_point` must be 0",
}

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _nodes(graph: onnx.GraphProto, functions: dict[tuple[str, str], onnx.FunctionProto]) -> Iterator[onnx.NodeProto]:
    """Every node of a graph, its subgraphs (If/Loop/Scan) and the model-local functions it calls, expanded."""
    for node in graph.node:
        function = functions.get((node.domain, node.op_type))
        if function is not None:
            yield from _nodes(onnx.helper.make_graph(function.node, function.name, [], []), functions)
            continue
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _nodes(sub, functions)


def _dynamic_dims(graph: onnx.GraphProto) -> dict[str, dict[int, str]]:
    """{input name: {axis index: axis name}} for graph inputs whose shape has symbolic or unknown dims."""
    initializers = {init.name for init in graph.initializer}
    result: dict[str, dict[int, str]] = {}
    for value in graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        axes = {i: (d.dim_param or "?") for i, d in enumerate(dims) if not d.HasField("dim_value")}
        if axes:
            result[value.name] = axes
    return result


CONSTANT_AXES = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceLogSumExp",
                 "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "Squeeze", "Unsqueeze")


def _non_constant_axes(graph: onnx.GraphProto) -> list[str]:
    """Nodes whose `axes` input TensorRT needs at build time but the graph computes at run time."""
    constant = {init.name for init in graph.initializer}
    constant |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    return sorted(f"{node.op_type} {node.name}" for node in graph.node
                  if node.op_type in CONSTANT_AXES and len(node.input) > 1 and node.input[1]
                  and node.input[1] not in constant)


def lint(model: onnx.ModelProto) -> dict[str, Any]:
    """Report ops TensorRT's ONNX parser lacks or restricts, custom-domain ops and the axes a profile needs."""
    functions = {(f.domain, f.name): f for f in model.functions}
    ops: Counter[str] = Counter()
    custom: set[str] = set()
    for node in _nodes(model.graph, functions):
        if node.domain in _DEFAULT_DOMAINS:
            ops[node.op_type] += 1
        else:
            custom.add(f"{node.domain}::{node.op_type}")
    dynamic = _dynamic_dims(model.graph)
    initializers = {init.name for init in model.graph.initializer}
    int64 = sum(1 for v in model.graph.input
                if v.name not in initializers and v.type.tensor_type.elem_type == onnx.TensorProto.INT64)
    return {"unsupported_ops": {op: n for op, n in sorted(ops.items()) if op not in TENSORRT_OPS},
            "restricted_ops": {op: TENSORRT_RESTRICTIONS[op] for op in sorted(ops) if op in TENSORRT_RESTRICTIONS},
            "custom_domain_ops": sorted(custom),
            "non_constant_axes": _non_constant_axes(model.graph),
            "dynamic_dims": dynamic,
            "profile_axes": sorted({name for axes in dynamic.values() for name in axes.values()}),
            "op_counts": dict(sorted(ops.items())),
            "int64_tensors": int64}


def format_lint(report: dict[str, Any]) -> str:
    """A short human-readable version of a lint report."""
    counts = report["op_counts"]
    ok = not report["unsupported_ops"] and not report["custom_domain_ops"] and not report["non_constant_axes"]
    lines = [f"TensorRT lint: {sum(counts.values())} nodes, {len(counts)} op types: "
             + ("parser supports all of them" if ok else "NOT parseable as is")]
    if report["unsupported_ops"]:
        lines.append("  unsupported: " + ", ".join(f"{op} x{n}" for op, n in report["unsupported_ops"].items()))
    if report["custom_domain_ops"]:
        lines.append("  custom domain (need a plugin): " + ", ".join(report["custom_domain_ops"]))
    if report["non_constant_axes"]:
        lines.append("  axes computed at run time: " + ", ".join(report["non_constant_axes"][:10]))
    for op, note in report["restricted_ops"].items():
        lines.append(f"  restricted {op}: {note}")
    for name, axes in report["dynamic_dims"].items():
        lines.append(f"  dynamic {name}: " + ", ".join(f"axis {i} = {axis}" for i, axis in axes.items()))
    if report["profile_axes"]:
        lines.append("  profile axes: " + ", ".join(report["profile_axes"]))
    if report["int64_tensors"]:
        lines.append(f"  int64 inputs: {report['int64_tensors']} (native since TensorRT 10; cast to INT32 up to 8.6)")
    return "\n".join(lines)
