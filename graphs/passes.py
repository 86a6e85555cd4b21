"""Graph passes over onnx_ir models: each is a small function that reports what it rewrote.

A pass returns a PassReport (name, changed, counts); a pipeline is an explicit list of passes.
- fold_constants: constant folding, dead-code removal (onnxscript's optimizer), node counts before/after
- fuse_sibling_matmuls: MatMuls that share their input and have constant weights become one MatMul
  over the concatenated weights and a Split: q/k/v and gate/up (an MLP pair is one network already)
- convert_precision: fp16 or bf16 weights and arithmetic, keeping the RMS norms' normalization and the
  rotary matrices in fp32 with explicit Casts (TensorRT 11 is strongly typed). The attention softmax
  runs in the graph's type: its scores come out of a low-precision MatMul already rounded, and the
  softmax kernels of ONNX Runtime CUDA and TensorRT accumulate in fp32.
- cleanup: unused nodes and initializers, duplicate initializers, topological order
- lift_heads: a base bundle's graph: every layer's JointPair weights become graph inputs with a named width axis
"""

from __future__ import annotations

import gc
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

LOW = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
# modules whose arithmetic stays fp32 in a low-precision graph (matched on the exporter's class hierarchy)
FP32_MODULES = ("nectar_graphs.step.Rotary", "nectar_graphs.step.Normalize", "nectar_graphs.step.GemmaRMSNorm",
                "QuadraturePair")


@dataclass
class PassReport:
    name: str
    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)    # why candidates were not rewritten

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "changed": self.changed, "counts": self.counts, "notes": self.notes}


Pass = Callable[[ir.Model], PassReport]


def run_pipeline(model: ir.Model, passes: list[Pass]) -> list[PassReport]:
    return [p(model) for p in passes]


def op_counts(model: ir.Model) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph).items()))


def fold_constants(model: ir.Model) -> PassReport:
    """Fold constant subgraphs and drop dead nodes (onnxscript's optimizer, no fusions)."""
    import onnxscript.optimizer

    before = len(model.graph)
    onnxscript.optimizer.optimize_ir(model)
    _drop_unused(model)
    after = len(model.graph)
    return PassReport("fold_constants", after != before, {"nodes_before": before, "nodes_after": after})


def _drop_unused(model: ir.Model) -> None:
    """Remove nodes and initializers nothing reads any more, so a weight a pass replaced (folded into a transposed
    copy, fused with its siblings) is freed now rather than at `cleanup`: the replaced float32 weights of an 8B
    model would otherwise stay in memory beside their replacements through `convert_precision`."""
    from onnx_ir.passes import common

    common.RemoveUnusedNodesPass()(model)
    gc.collect()              # a removed node and the values it read reference each other: only gc frees them


def cleanup(model: ir.Model) -> PassReport:
    """Remove unused nodes, opsets and duplicate initializers; sort topologically."""
    from onnx_ir.passes import common

    before = (len(model.graph), len(model.graph.initializers))
    changed = False
    for p in (common.RemoveUnusedNodesPass(), common.DeduplicateInitializersPass(),
              common.RemoveUnusedOpsetsPass(), common.TopologicalSortPass()):
        changed |= p(model).modified
    after = (len(model.graph), len(model.graph.initializers))
    return PassReport("cleanup", changed and after != before,
                      {"nodes_removed": before[0] - after[0], "initializers_removed": before[1] - after[1]})


def _scopes(node: ir.Node) -> str:
    return node.metadata_props.get("pkg.torch.onnx.name_scopes", "")


def _category(node: ir.Node) -> str:
    scope = _scopes(node)
    if ".context.pair" in scope:
        return "nectar_head"
    if ".self_attn" in scope:
        return "qkv"
    if ".mlp" in scope:
        return "gate_up"
    return "other"


def _weight(node: ir.Node) -> np.ndarray | None:
    w = node.inputs[1]
    return None if w is None or w.const_value is None else w.const_value.numpy()


def fuse_sibling_matmuls(model: ir.Model) -> PassReport:
    """One MatMul + Split for every group of MatMuls reading the same input with constant weights."""
    groups: dict[int, list[ir.Node]] = defaultdict(list)
    notes: Counter[str] = Counter()
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain != "":
            continue
        weight = _weight(node)
        if weight is None:
            continue
        if len(node.inputs[1].uses()) != 1:
            notes["weight shared with another node"] += 1
            continue
        groups[id(node.inputs[0])].append(node)
    counts: Counter[str] = Counter()
    for nodes in groups.values():
        if len(nodes) < 2:
            continue
        weights = [_weight(n) for n in nodes]
        if len({w.shape[:-1] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            notes["sibling weights differ in leading dims or dtype"] += 1
            continue
        if any(n.outputs[0].is_graph_output() for n in nodes):
            notes["a product is a graph output"] += 1
            continue
        _fuse(model.graph, nodes, weights)
        counts[_category(nodes[0])] += 1
    _drop_unused(model)
    return PassReport("fuse_sibling_matmuls", bool(counts), dict(sorted(counts.items())), dict(notes))


def _fuse(graph: ir.Graph, nodes: list[ir.Node], weights: list[np.ndarray]) -> None:
    first = nodes[0]
    name = first.name or "matmul"
    fused = ir.Value(name=f"{name}.fused_weight", const_value=ir.tensor(np.concatenate(weights, axis=-1)))
    fused.shape, fused.type = fused.const_value.shape, ir.TensorType(fused.const_value.dtype)
    graph.register_initializer(fused)
    sizes = ir.Value(name=f"{name}.fused_split", const_value=ir.tensor(np.array([w.shape[-1] for w in weights],
                                                                                dtype=np.int64)))
    sizes.shape, sizes.type = sizes.const_value.shape, ir.TensorType(ir.DataType.INT64)
    graph.register_initializer(sizes)
    matmul = ir.node("MatMul", [first.inputs[0], fused], name=f"{name}.fused", metadata_props=dict(first.metadata_props))
    split = ir.node("Split", [matmul.outputs[0], sizes], attributes={"axis": -1}, num_outputs=len(nodes),
                    name=f"{name}.fused_split", metadata_props=dict(first.metadata_props))
    graph.insert_before(first, [matmul, split])
    for node, out in zip(nodes, split.outputs):
        old = node.outputs[0]
        out.shape, out.type = old.shape, old.type
        ir.convenience.replace_all_uses_with(old, out)
        graph.remove(node, safe=True)


def _keeps_fp32(node: ir.Node) -> bool:
    hierarchy = node.metadata_props.get("pkg.torch.onnx.class_hierarchy", "")
    return any(name in hierarchy for name in FP32_MODULES)


def convert_precision(precision: str) -> Pass:
    """A pass converting float32 weights and arithmetic to `precision`, fp32 islands kept (see FP32_MODULES)."""
    def convert_precision(model: ir.Model) -> PassReport:
        if precision == "fp32":
            return PassReport("convert_precision", False, {})
        return _convert(model, LOW[precision], precision)
    return convert_precision


def _is_float(value: ir.Value | None, dtype: ir.DataType = ir.DataType.FLOAT) -> bool:
    return value is not None and value.type is not None and value.dtype == dtype


def _convert(model: ir.Model, low: ir.DataType, precision: str) -> PassReport:
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass()(model)        # every value needs its type for the decisions below
    graph = model.graph
    counts: Counter[str] = Counter()
    casts: dict[tuple[int, int], ir.Value] = {}

    def cast(value: ir.Value, to: ir.DataType) -> ir.Value:
        """value cast to `to`, one Cast node per (value, type), placed right after the value's producer."""
        key = (id(value), int(to))
        if key not in casts:
            node = ir.node("Cast", [value], attributes={"to": int(to)}, name=f"{value.name}.to_{to.name.lower()}")
            node.outputs[0].shape, node.outputs[0].type = value.shape, ir.TensorType(to)
            node.outputs[0].name = node.name
            producer = value.producer()
            if producer is not None:
                graph.insert_after(producer, [node])
            else:
                graph.insert_before(graph.node(0), [node])
            casts[key] = node.outputs[0]
            counts["casts_inserted"] += 1
        return casts[key]

    # graph inputs (past KV) and weights read only by low-precision nodes become low precision
    for value in graph.inputs:
        if _is_float(value):
            value.type = ir.TensorType(low)
            counts["inputs"] += 1
    for value in list(graph.initializers.values()):
        if _is_float(value) and value.uses() and not any(_keeps_fp32(u.node) for u in value.uses()):
            value.const_value = ir.tensor(lower_array(value.const_value.numpy(), low.numpy()), name=value.name)
            value.type = ir.TensorType(low)
            counts["initializers"] += 1
    inserted = {id(v.producer()) for v in casts.values()}
    for node in list(graph):
        if id(node) in inserted or node.name.endswith(tuple(f".to_{t.name.lower()}" for t in (low, ir.DataType.FLOAT))):
            continue
        keep = _keeps_fp32(node)
        want, other = (ir.DataType.FLOAT, low) if keep else (low, ir.DataType.FLOAT)
        if node.op_type != "Cast":
            for i, value in enumerate(node.inputs):
                if _is_float(value, other):
                    node.replace_input_with(i, cast(value, want))
        elif not keep and node.attributes["to"].as_int() == ir.DataType.FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", int(low))
        if not keep and node.op_type in ("Constant", "ConstantOfShape"):
            _lower_constant(node, low, counts)
        for out in node.outputs:
            if _is_float(out, other) and node.op_type != "Cast" or (not keep and _is_float(out)):
                out.type = ir.TensorType(want)
        counts["fp32_nodes" if keep else "low_nodes"] += 1
    # logits leave as fp32 for the host's sampling; presents keep the KV inputs' type
    for i, value in enumerate(graph.outputs):
        if value.name == "logits" and _is_float(value, low):
            value.name = "logits.low"
            up = cast(value, ir.DataType.FLOAT)
            up.name = "logits"
            graph.outputs[i] = up
    return PassReport("convert_precision", True, dict(sorted(counts.items())))


def lower_array(array: np.ndarray, dtype: Any) -> np.ndarray:
    """A float32 array in `dtype`; fp16 and bf16 are rounded to nearest, ties to even, bit for bit what numpy's
    astype gives, but on every core with vector instructions (torch): numpy's astype runs on one, 2.2 s per GB
    of float32 against 0.5 s here (2 cores), which made precision conversion a minute of an 8B export."""
    import torch

    array, dtype = np.asarray(array), np.dtype(dtype)
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype.name)
    if torch_dtype is None or array.dtype != np.float32:
        return array.astype(dtype)
    with warnings.catch_warnings():                  # weights are often read-only views; this only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(array if array.flags.c_contiguous else array.copy(order="C"))   # keeps 0-d
    low = source.to(torch_dtype)
    return (low if torch_dtype == torch.float16 else low.view(torch.int16)).numpy().view(dtype)


def _lower_constant(node: ir.Node, low: ir.DataType, counts: Counter[str]) -> None:
    attr = node.attributes.get("value")
    if attr is None or attr.value.dtype != ir.DataType.FLOAT:
        return
    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(lower_array(attr.value.numpy(), low.numpy())))
    counts["constants"] += 1


# where torch.onnx.export puts a layer's JointPair buffers (graphs.step: layers.{i}.self_attn.context.pair)
TRACED_HEADS = "layers.{layer}.self_attn.context.pair.{weight}"


def lift_heads(model: ir.Model) -> PassReport:
    """Turn each layer's head weights (w1, b1, w2, w3 of a JointPair) into graph inputs named as
    nectar_runtime.bundle.HEAD_TEMPLATES, their hidden width an axis `nectar_width.{layer}`: the graph of a base
    bundle, whose heads a pack supplies. Intermediate shapes are dropped (they hold the traced width); ONNX
    Runtime infers them again for each pack's widths."""
    from nectar_runtime.bundle import HEAD_TEMPLATES, WIDTH_AXIS

    graph, layer = model.graph, 0
    while TRACED_HEADS.format(layer=layer, weight="w1") in graph.initializers:
        width = ir.SymbolicDim(WIDTH_AXIS.format(layer=layer))
        for template in HEAD_TEMPLATES:
            weight = template.rsplit(".", 1)[1]
            old = TRACED_HEADS.format(layer=layer, weight=weight)
            if old not in graph.initializers:
                raise ValueError(f"the traced graph lacks {old}: the pass that merged it broke the head layout")
            value = graph.initializers.pop(old)
            dims = list(value.shape)
            axes = {"w1": (2,), "b1": (2,), "w2": (1, 2), "w3": (1,)}[weight]
            value.const_value, value.name = None, template.format(layer=layer)
            value.shape = ir.Shape([width if i in axes else d for i, d in enumerate(dims)])
            graph.inputs.append(value)
        layer += 1
    if not layer:
        raise ValueError("the graph has no JointPair heads to lift (a full-attention or quadrature graph)")
    for node in graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
    return PassReport("lift_heads", True, {"layers": layer, "inputs": 4 * layer})

