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
- accuracy_level unset: the product's arithmetic stays in the activations' type (fp16 here), weight-only as asked;
- a weight that is already quantized (a GGUF source: Q4_1 projections, a Q8_0 output table) is re-packed,
  not re-quantized: where every block of 32 along K already lies on 16 evenly spaced levels (low + step * q), its
  own levels become the 4-bit codes with zero point 0, and the lows come back as a small product of the blocks'
  sums of x, so the graph multiplies by the GGUF's own weights. Rounding them to ONNX Runtime's grid instead
  (integer zero points) moves every weight by up to half a level: on SmolLM2-135M's Q4_1 GGUF, teacher-forced
  top-1 against the fp32 bundle falls to 0.76 (RESULTS 13). An output table on 255 levels (Q8_0) becomes two
  4-bit products (its codes' high and low nibbles), since 4 bits would lose it. MatMulNBits would take the lows
  as fp16 zero points, or 8-bit codes, but ONNX Runtime 1.32's CPU kernels run those about 50 times slower.
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
    repack: bool = True                 # re-pack weights already on a 4- or 8-bit grid (module docstring)


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
            counts[_replace(model.graph, node, kind, config)] += 1
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


def _replace(graph: ir.Graph, node: ir.Node, kind: str, config: Int4Config) -> str:
    """Put MatMulNBits for `node` in its place (re-packed where the weight is on a grid, else the quantizer's);
    the old weight goes once nothing reads it. Returns what was done, for the pass's counts."""
    weight = node.inputs[1].const_value.numpy()
    matrix = np.ascontiguousarray(weight.T) if kind == "lm_head" else weight        # [K, N]: in x out features
    name = node.name or node.outputs[0].name
    k, n = matrix.shape
    made = _Nodes(graph, node, name, config)
    grid = _on_grid(matrix, kind, config) if config.repack else None
    if grid is None:
        proto, tensors = _quantized(matrix, config)
        attributes = {a.name: a.i for a in proto.attribute}  # K, N, bits, block_size (and accuracy_level)
        out = made.op("MatMulNBits", [node.inputs[0], *(made.constant(f".int4{t.removeprefix('w')}", tensors[t])
                                                       for t in list(proto.input)[1:])], **attributes)
        done = kind
    elif grid.bits == 4:
        # W = step * q + low per block: the codes with zero point 0, plus the blocks' sums of x times the lows
        out = made.add(made.nbits(node.inputs[0], grid.codes, grid.step, k, n, zero=True),
                       made.op("MatMul", [made.op("MatMul", [node.inputs[0], made.blocks(k)]),
                                          made.constant(".int4_low", ir.tensor(grid.low.T.copy()))]))
        done = f"{kind} (re-packed 4-bit grid)"
    else:
        # W = step * q, q in -127..127 = 16 * high + low4 (high in -8..7, low4 in 0..15): two 4-bit products
        high = np.floor_divide(grid.codes, 16)
        out = made.add(made.nbits(node.inputs[0], (high + 8).astype(np.uint8), 16 * grid.step, k, n, zero=False),
                       made.nbits(node.inputs[0], (grid.codes - 16 * high).astype(np.uint8), grid.step, k, n,
                                  zero=True))
        done = f"{kind} (re-packed 8-bit grid)"
    old = node.outputs[0]
    out.name, out.shape, out.type = f"{old.name}.int4", old.shape, old.type
    graph.insert_before(node, made.nodes)
    ir.convenience.replace_all_uses_with(old, out)
    if old.is_graph_output():
        graph.outputs[graph.outputs.index(old)] = out
    graph.remove(node, safe=True)
    return done


class _Nodes:
    """The nodes and initializers that replace one product, named after it and carrying its metadata."""

    def __init__(self, graph: ir.Graph, node: ir.Node, name: str, config: Int4Config):
        self.graph, self.name, self.config = graph, name, config
        self.metadata = dict(node.metadata_props)
        self.nodes: list[ir.Node] = []

    def constant(self, suffix: str, tensor: ir.TensorProtocol) -> ir.Value:
        return self._initializer(f"{self.name}{suffix}", tensor)

    def _initializer(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(name=name, const_value=tensor)
        value.shape, value.type = value.const_value.shape, ir.TensorType(value.const_value.dtype)
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list[ir.Value], **attributes: int) -> ir.Value:
        domain = CONTRIB if op_type == "MatMulNBits" else ""
        name = f"{self.name}.int4" + (f".{len(self.nodes)}" if self.nodes else "")   # the first: the product's
        node = ir.node(op_type, inputs, attributes=attributes, domain=domain, name=name,
                       metadata_props=self.metadata)
        self.nodes.append(node)
        return node.outputs[0]

    def add(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.op("Add", [a, b])

    def nbits(self, x: ir.Value, codes: np.ndarray, step: np.ndarray, k: int, n: int, zero: bool) -> ir.Value:
        """MatMulNBits of 4-bit `codes` [N, blocks, block] (0..15) with scales `step` [N, blocks]: (code - 8) * step
        without zero points, code * step with zero points 0 (ONNX Runtime's fast kernels take only uint8 zero
        points: fp16 ones ran 50 times slower on the CPU, as did 8 bits)."""
        i = len(self.nodes)
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)     # element 2i in the low nibble
        inputs = [x, self.constant(f".int4.{i}_Q4", ir.tensor(packed)),
                  self.constant(f".int4.{i}_scales", ir.tensor(step.astype(np.float16)))]
        if zero:
            blocks = codes.shape[1]
            inputs.append(self.constant(f".int4.{i}_zero_points",
                                        ir.tensor(np.zeros((n, (blocks + 1) // 2), np.uint8))))
        attributes = {"K": k, "N": n, "bits": 4, "block_size": self.config.block_size}
        if self.config.accuracy_level is not None:
            attributes["accuracy_level"] = self.config.accuracy_level
        return self.op("MatMulNBits", inputs, **attributes)

    def blocks(self, k: int) -> ir.Value:
        """[K, K / block] of ones where row k's block is the column: x times it sums x over each block."""
        block = self.config.block_size
        if f"int4.blocks.{k}" in self.graph.initializers:       # one per K, shared by its products
            return self.graph.initializers[f"int4.blocks.{k}"]
        ones = (np.arange(k)[:, None] // block == np.arange(k // block)[None]).astype(np.float16)
        return self._initializer(f"int4.blocks.{k}", ir.tensor(ones))


@dataclass(frozen=True)
class _Grid:
    """A weight already on a grid (_on_grid): codes [N, blocks, block] with per-block fp16 steps [N, blocks], and
    for 4 bits the blocks' lows [N, blocks] (weight = low + step * code); for 8 bits codes -127..127 (step * code)."""

    bits: int
    codes: np.ndarray
    step: np.ndarray
    low: np.ndarray | None


def _on_grid(matrix: np.ndarray, kind: str, config: Int4Config) -> _Grid | None:
    """A [K, N] weight whose every block along K already lies on 16 evenly spaced levels from its min to its max
    (4 bits, asymmetric: the GGUF's Q4_1), or, for lm_head only, on 255 levels symmetric about 0 (8 bits: Q8_0,
    whose 4-bit rounding would be a new loss), as codes and steps; else None.

    A weight counts as on a grid when each element is within 2% of a level plus its own fp16 rounding (2^-9 of it,
    with room for the graph's fp16 copy and the level spacing derived from it): a trained weight, whose elements
    fall anywhere between levels, misses by up to half a level in most blocks."""
    block = config.block_size
    k, n = matrix.shape
    if k % block or config.symmetric:                        # symmetric: no zero points, ONNX Runtime's grid
        return None
    w = matrix.T.astype(np.float32).reshape(n, k // block, block)                  # [N, blocks, block]
    lo, hi = w.min(axis=-1, keepdims=True), w.max(axis=-1, keepdims=True)
    top = np.abs(w).max(axis=-1, keepdims=True)
    grids = [(4, lo, hi, 0, 15)] + ([(8, -top, top, -127, 127)] if kind == "lm_head" else [])
    for bits, low, high, first, last in grids:
        step = np.where(high > low, (high - low) / (last - first), 1.0).astype(np.float16).astype(np.float32)
        base = low.astype(np.float16).astype(np.float32) if bits == 4 else np.zeros_like(low)
        q = np.clip(np.rint((w - base) / step), first, last)
        if (np.abs(base + q * step - w) <= 0.02 * step + 2.0 ** -9 * np.abs(w)).all():
            return _Grid(bits, q.astype(np.uint8 if bits == 4 else np.int16), step[..., 0].astype(np.float16),
                         base[..., 0].astype(np.float16) if bits == 4 else None)
    return None


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
