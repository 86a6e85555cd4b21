"""torch.onnx.export (dynamo) of the step module with dynamic batch, new-token and past lengths.

Dynamic-cache graphs name their axes batch, sequence, past_sequence and total_sequence; static-cache
graphs (`StepModule(static=True)`) have batch, sequence and cache_slots (the KV buffer's length R).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from nectar_graphs.step import StepModule
from nectar_runtime.bundle import past_names, present_names

OPSET = 20
IR_VERSION = 10          # ONNX Runtime 1.31 reads IR <= 13 and TensorRT 10/11's parser IR <= 10 (onnx 1.16)


def io_names(layers: int, static: bool = False) -> tuple[list[str], list[str]]:
    """Input and output names of the step graph (the Hugging Face / Optimum convention, spelled in
    nectar_runtime.bundle)."""
    past, present = past_names(layers), present_names(layers)
    third = "cache_position" if static else "attention_mask"
    return ["input_ids", "position_ids", third, *past], ["logits", *present]


def example_inputs(step: StepModule, batch: int = 2, new: int = 3, past: int = 5) -> tuple[torch.Tensor, ...]:
    """Example feeds with every dynamic size distinct and >= 2, so none is specialized away.

    Static: a buffer of past + new + 1 slots (not equal to any other size) with the new tokens in
    slots past .. past + new - 1."""
    attn = step.layers[0].self_attn
    dtype = step.embed_tokens.weight.dtype
    ids = torch.zeros(batch, new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, new).contiguous()
    if step.static:
        third, length = torch.arange(past, past + new), past + new + 1
    else:
        third, length = torch.ones(batch, past + new, dtype=torch.long), past
    kv = [torch.zeros(batch, attn.kv_heads, length, attn.head_dim, dtype=dtype) for _ in range(2 * len(step.layers))]
    return (ids, positions, third, *kv)


def export_step(step: StepModule) -> Any:
    """Export the step module to an onnx_ir model (not yet optimized), opset OPSET, IR IR_VERSION."""
    batch, new, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past", min=0)
    layers = len(step.layers)
    inputs, outputs = io_names(layers, step.static)
    if step.static:
        slots = torch.export.Dim("cache_slots")
        dynamic = {"input_ids": {0: batch, 1: new}, "position_ids": {0: batch, 1: new},
                   "mask_or_slots": {0: new}, "past": tuple({0: batch, 2: slots} for _ in range(2 * layers))}
    else:
        dynamic = {"input_ids": {0: batch, 1: new}, "position_ids": {0: batch, 1: new},
                   # total = past + new: torch.export infers the relation, it cannot be declared
                   "mask_or_slots": {0: batch, 1: torch.export.Dim.AUTO},
                   "past": tuple({0: batch, 2: past} for _ in range(2 * layers))}
    # the exporter warns once per torchvision op it cannot register; none of them is ours
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(step.eval(), example_inputs(step), dynamo=True, dynamic_shapes=dynamic,
                                    input_names=inputs, output_names=outputs, opset_version=OPSET,
                                    optimize=False, verbose=False)
    model = program.model
    model.ir_version = IR_VERSION
    if not step.static:
        _name_axes(model)
    return model


def _name_axes(model: Any) -> None:
    """Give the graph's symbolic dims stable names: batch, sequence, past_sequence, total_sequence."""
    import onnx_ir as ir

    rename = {"past": "past_sequence"}
    mask = model.graph.inputs[2].shape
    total = str(mask[1])
    rename[total] = "total_sequence"
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.shape is None:
            continue
        dims = [ir.SymbolicDim(rename.get(str(d), str(d))) if isinstance(d, ir.SymbolicDim) else d
                for d in value.shape]
        # presents are past + new: name the sum total_sequence as the mask's axis
        dims = [ir.SymbolicDim("total_sequence") if isinstance(d, ir.SymbolicDim) and "+" in str(d) else d
                for d in dims]
        value.shape = ir.Shape(dims)
