"""int4 weight-only quantization of the base model's projections: ONNX Runtime's MatMulNBits, made by its own quantizer.

`quantize_int4` is a graph pass for an fp16 step graph (after convert_precision and fuse_sibling_matmuls). Each
product it takes is handed, alone in a one-node model, to `onnxruntime.quantization.matmul_nbits_quantizer.
MatMulNBitsQuantizer` (its default, round-to-nearest algorithm), and the com.microsoft `MatMulNBits` node and
packed tensors it returns replace the product in the graph. One node at a time keeps the memory at the graph plus
one weight (the quantizer wants an onnx ModelProto; a whole 8B graph as one would be a second copy of every weight).

What is quantized, and how (the choices; their effect on SmolLM2 is not measured yet, bench/int4_agreement.py):
- every nn.Linear of the decoder layers: the fused q|k|v and gate|up products, o_proj and down_proj;
- lm_head (`Gemm(transB=1)` over the tied or untied output table) as a MatMulNBits of its own: it is a fifth of
  SmolLM2's weights and a step reads all of it; a tied table stays in fp16 for the embedding's Gather, which reads
  one row per token (quantizing it would save file bytes, not step time);
- not the Nectar heads (JointPair's batched products, QuadraturePair's slots): they are the document, small, and
  fitted in fp32; they and everything else run in fp16;
- blocks of BLOCK_SIZE = 32 weights along K (the input features), each with an fp16 scale and a 4-bit zero point
  (asymmetric: the block's [min, max] spans all 16 levels), so 4 + 16/32 + 4/32 = 4.625 bits a weight;
- accuracy_level unset: the product's arithmetic stays in the activations' type (fp16 here), weight-only as asked.
  ONNX Runtime's contrib-op documentation: https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#commicrosoftmatmulnbits
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from nectar_graphs.passes import Pass, PassReport, _drop_unused

CONTRIB = "com.microsoft"
PROJECTION = "torch.nn.modules.linear.Linear"      # the exporter's class hierarchy of an nn.Linear's product
HEADS_SCOPE = ".context."                          # graphs.step: layers.{i}.self_attn.context.pair


@dataclass(frozen=True)
class Int4Config:
    """How the base's projections are quantized (module docstring)."""

    block_size: int = 32
    symmetric: bool = False
    lm_head: bool = True
    accuracy_level: int | None = None


def quantize_int4(config: Int4Config = Int4Config()) -> Pass:
    """A pass replacing the base's projections by MatMulNBits nodes (4-bit weights, fp16 scales)."""
    def quantize_int4(model: ir.Model) -> PassReport:
        counts: Counter[str] = Counter()
        notes: Counter[str] = Counter()
        for node in list(model.graph):
            kind, why = _candidate(node, config)
            if why:
                notes[why] += 1
            if kind is None:
                continue
            _replace(model.graph, node, kind, config)
            counts[kind] += 1
        if counts:
            model.opset_imports[CONTRIB] = 1
        _drop_unused(model)
        return PassReport("quantize_int4", bool(counts), dict(sorted(counts.items())), dict(notes))
    return quantize_int4


def _candidate(node: ir.Node, config: Int4Config) -> tuple[str | None, str | None]:
    """(what the node is: "projection" or "lm_head", or None; why a constant-weight product is left as it is)."""
    if node.domain != "" or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None, None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None:
        return None, None                              # attention's products: both operands computed
    if HEADS_SCOPE in node.metadata_props.get("pkg.torch.onnx.name_scopes", ""):
        return None, "nectar head (kept in fp16)"
    if weight.dtype != ir.DataType.FLOAT16 or len(weight.shape) != 2:
        return None, "weight not a 2-D fp16 matrix"
    if node.op_type == "Gemm":
        if not config.lm_head:
            return None, "lm_head (kept in fp16)"
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        plain = attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0
        return ("lm_head", None) if plain and len(node.inputs) == 2 else (None, "Gemm with bias, scale or transA")
    if PROJECTION not in node.metadata_props.get("pkg.torch.onnx.class_hierarchy", ""):
        return None, "constant product outside an nn.Linear"
    return "projection", None


def _replace(graph: ir.Graph, node: ir.Node, kind: str, config: Int4Config) -> None:
    """Put the quantizer's MatMulNBits for `node` in its place; the old weight goes once nothing reads it."""
    weight = node.inputs[1].const_value.numpy()
    matrix = np.ascontiguousarray(weight.T) if kind == "lm_head" else weight        # [K, N]: in x out features
    made, tensors = _quantized(matrix, config)
    name = node.name or node.outputs[0].name
    inputs = [node.inputs[0]]
    for tensor_name in list(made.input)[1:]:
        suffix = tensor_name.removeprefix("w")               # _Q4, _scales, _zero_points
        value = ir.Value(name=f"{name}.int4{suffix}", const_value=tensors[tensor_name])
        value.shape, value.type = value.const_value.shape, ir.TensorType(value.const_value.dtype)
        graph.register_initializer(value)
        inputs.append(value)
    attributes = {a.name: a.i for a in made.attribute}       # K, N, bits, block_size (and accuracy_level)
    replacement = ir.node("MatMulNBits", inputs, attributes=attributes, domain=CONTRIB, name=f"{name}.int4",
                          metadata_props=dict(node.metadata_props))
    old = node.outputs[0]
    new = replacement.outputs[0]
    new.name, new.shape, new.type = f"{old.name}.int4", old.shape, old.type
    graph.insert_before(node, [replacement])
    ir.convenience.replace_all_uses_with(old, new)
    if old.is_graph_output():
        graph.outputs[graph.outputs.index(old)] = new
    graph.remove(node, safe=True)


def _quantized(matrix: np.ndarray, config: Int4Config) -> tuple[Any, dict[str, ir.TensorProtocol]]:
    """ONNX Runtime's MatMulNBitsQuantizer on a one-MatMul model of `matrix` [K, N]: its MatMulNBits NodeProto and
    the tensors that node reads, by name."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    kind = TensorProto.FLOAT16
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"], name="one")], "one",
                              [helper.make_tensor_value_info("a", kind, None)],
                              [helper.make_tensor_value_info("y", kind, None)], [numpy_helper.from_array(matrix, "w")])
    one = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)                  # it logs two INFO lines per node
    try:
        quantizer = MatMulNBitsQuantizer(one, bits=4, block_size=config.block_size, is_symmetric=config.symmetric,
                                         accuracy_level=config.accuracy_level)
        quantizer.process()
    finally:
        quiet.setLevel(level)
    result: onnx.ModelProto = quantizer.model.model
    nodes = [n for n in result.graph.node if n.op_type == "MatMulNBits"]
    if len(nodes) != 1 or len(result.graph.node) != 1:
        raise ValueError(f"ONNX Runtime's quantizer returned {[n.op_type for n in result.graph.node]} for one "
                         "MatMul, not one MatMulNBits")
    return nodes[0], {t.name: ir.from_proto(t) for t in result.graph.initializer}
