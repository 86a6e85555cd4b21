"""Writing a bundle (schema in nectar_runtime.bundle): ONNX file, tokenizer.json, bundle.json, atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from nectar_graphs.files import check_output_folder, staged_folder
from nectar_runtime.bundle import (CONTEXT_FILE, ENGINE_FILE, MANIFEST, ONNX_FILE, TOKENIZER_FILE, BundleManifest,
                                   TensorSpec)

EXTERNAL_DATA = "model.onnx.data"
EXTERNAL_THRESHOLD = 1 << 30      # protobuf stops at 2 GB; move weights out well before that


OWNED = (MANIFEST, ONNX_FILE, EXTERNAL_DATA, TOKENIZER_FILE, CONTEXT_FILE, ENGINE_FILE)   # what export and build write


def check_bundle_output(out: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an -o that is not empty or new, unless it is an earlier bundle and `overwrite` is
    given; even then, one that holds files export does not write (replacing the folder would delete them)."""
    check_output_folder(out, MANIFEST, OWNED, overwrite, "bundle")


def weight_bytes(model: ir.Model) -> int:
    """Bytes of every initializer of the graph (what the ONNX file carries besides structure)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def structure_proto(model: ir.Model) -> Any:
    """The model as an onnx.ModelProto whose initializers point at external data instead of holding it: names,
    types and shapes without a second copy of the weights (16 GB for an 8B model in fp16). The model itself is
    left as it was."""
    kept = {name: value.const_value for name, value in model.graph.initializers.items()
            if value.const_value is not None}
    try:
        for name, tensor in kept.items():
            model.graph.initializers[name].const_value = ir.ExternalTensor(
                "not-serialized", offset=0, length=tensor.nbytes, dtype=tensor.dtype, shape=tensor.shape, name=name)
        return ir.to_proto(model)
    finally:
        for name, tensor in kept.items():
            model.graph.initializers[name].const_value = tensor


def _check(path: Path) -> None:
    """onnx.checker with full check (type and shape inference) on the written file."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def write_bundle(out: Path, model: ir.Model, tokenizer_json: str, manifest: BundleManifest,
                 context_kv: dict[str, np.ndarray] | None = None, overwrite: bool = False) -> BundleManifest:
    """Save graph, tokenizer and the context KV (the whole context or the exact tokens) into a temp folder, check,
    then rename."""
    out = Path(out).expanduser()
    check_bundle_output(out, overwrite)
    with staged_folder(out) as tmp:
        external = weight_bytes(model) > EXTERNAL_THRESHOLD
        ir.save(model, tmp / ONNX_FILE, external_data=EXTERNAL_DATA if external else None)
        _check(tmp / ONNX_FILE)
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        if context_kv is not None:
            from safetensors.numpy import save_file

            save_file(context_kv, str(tmp / CONTEXT_FILE))
            os.chmod(tmp / CONTEXT_FILE, 0o644)          # safetensors creates it owner-only
        names = [ONNX_FILE, TOKENIZER_FILE] + ([EXTERNAL_DATA] if external else []) + \
                ([CONTEXT_FILE] if context_kv is not None else [])
        manifest = manifest.with_files(tmp, names)
        manifest.save(tmp)
    return manifest


def io_spec(model: ir.Model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs and outputs as bundle.json describes them (axis names for dynamic dims)."""
    def entry(value: ir.Value) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else str(d) for d in value.shape) if value.shape is not None else None
        return TensorSpec(value.name, np.dtype(value.dtype.numpy()).name, shape)
    return [entry(v) for v in model.graph.inputs], [entry(v) for v in model.graph.outputs]


def tensors_with_dim(model: ir.Model, size: int) -> list[str]:
    """Names of initializers and typed values with a static dimension equal to `size` (e.g. the context length)."""
    values = list(model.graph.initializers.values()) + list(model.graph.inputs) + list(model.graph.outputs) + \
        [out for node in model.graph for out in node.outputs]
    return sorted({v.name for v in values if v.shape is not None and any(d == size for d in v.shape
                                                                       if isinstance(d, int))})
