"""`nectar-export export`: artifact -> step module -> ONNX -> passes -> lint -> bundle."""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from nectar_export import __version__
from nectar_export.artifact import ArtifactManifest, load_artifact, read_manifest
from nectar_export.errors import NectarError
from nectar_export.models import check_device, load_model
from nectar_export.attention import layer_windows
from nectar_export.prefill import ContextCache, aligned, prefill, take
from nectar_export.samples import pad_id, stop_ids
from nectar_runtime.bundle import BundleManifest, Source

PRECISIONS = ("fp32", "fp16", "bf16", "int4")
CACHE_LAYOUTS = ("dynamic", "static")
# portable: the traced graph of standard ONNX ops (graphs/step.py, the TensorRT input); ort: ONNX Runtime's contrib
# operators, built node by node (graphs/fused.py), static cache, fp32 or fp16
OPS = ("portable", "ort")
ORT_PRECISIONS = ("fp32", "fp16")
# int4: the base's projections as 4-bit weights (graphs/int4.py), everything else (the heads, the KV) in fp16
FLOAT_PRECISION = {"int4": "fp16"}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int4": torch.float16}


@dataclass(frozen=True)
class ExportConfig:
    artifact: Path
    output: Path
    precision: str = "fp32"
    baseline: bool = False          # the full-attention graph: context KV as past input
    all_logits: bool = False
    variant: str = "nectar"         # which of the artifact's head sets ('nectar' or an ablation)
    model: str | None = None        # override the artifact's recorded model source
    device: str = "cpu"             # where the context is prefilled; the graph is always traced on the CPU
    cache: str = "dynamic"          # KV layout: "dynamic" (past grows) or "static" (fixed buffers, see step.py)
    overwrite: bool = False         # replace an earlier bundle at `output`
    base: bool = False              # a base bundle: the Nectar graph with the heads as inputs, no document inside
    ops: str = "portable"           # which operators the graph is made of (OPS)


class Stages:
    """A progress bar over the named stages of a long command, with each stage's seconds."""

    def __init__(self, names: list[str]):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), desc="export", unit="stage")
        self.seconds: dict[str, float] = {}
        self.current: tuple[str, float] | None = None

    def __call__(self, name: str | None) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current[0]] = round(now - self.current[1], 2)
            self.bar.update(1)
        self.current = (name, now) if name else None
        if name:
            self.bar.set_postfix_str(name)

    def close(self) -> None:
        self(None)
        self.bar.close()


@dataclass
class Traced:
    """What export keeps of the torch side once the graph is traced: the graph, the past a sequence starts from,
    and the numbers the bundle records about the model (the model itself is released)."""

    graph: Any
    cache: ContextCache
    params: dict[str, int]
    base_params: int
    vocab_size: int
    fingerprint: str
    tokenizer: Any


def run_export(config: ExportConfig) -> BundleManifest:
    """Build the bundle for an artifact; returns its manifest."""
    from nectar_graphs.bundle_writer import check_bundle_output
    from nectar_graphs.files import writing

    if config.precision not in PRECISIONS:
        raise NectarError(f"unknown precision {config.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if config.cache not in CACHE_LAYOUTS:
        raise NectarError(f"unknown cache layout {config.cache!r}; choose one of {', '.join(CACHE_LAYOUTS)}")
    if config.base and (config.baseline or config.all_logits):
        raise NectarError("--base writes the Nectar graph without its document; it takes neither --baseline "
                          "nor --all-logits")
    check_ops(config)
    with writing(config.output):            # before any work: -o writable, and no other export writing it
        check_bundle_output(config.output, config.overwrite)
        return _export(config, read_manifest(config.artifact))


def _export(config: ExportConfig, manifest: ArtifactManifest) -> BundleManifest:
    """run_export's stages, with the output held."""
    from nectar_graphs.bundle_writer import io_spec, structure_proto, write_bundle
    from nectar_graphs.lint import lint
    passes = export_passes(config)
    stage = Stages(["torch.onnx.export", *[p.__name__ for p in passes], "lint", "write"])
    try:
        traced = trace_step(config, manifest, stage)
        reports = []
        for graph_pass in passes:
            stage(graph_pass.__name__)
            reports.append(graph_pass(traced.graph))
        inputs, outputs = io_spec(traced.graph)
        kv_dtype = inputs[3].dtype
        # the past a sequence starts from: the whole context's KV (baseline) or the exact tokens' (Nectar)
        head_size = _kv_head_size(inputs, manifest.model.head_dim)
        context_kv = _context_kv(traced.cache, kv_dtype, head_size) if traced.cache.n and not config.base else None
        stage("lint")
        report = lint(structure_proto(traced.graph))
        stage("write")
        bundle = bundle_manifest(config, manifest, traced, reports, report, inputs, outputs)
        bundle.graph["export_seconds"] = stage.seconds       # the write stage's own time is not in the file
        return write_bundle(config.output, traced.graph, traced.tokenizer.backend_tokenizer.to_str(), bundle,
                            context_kv, config.overwrite)
    finally:
        stage.close()


def check_ops(config: ExportConfig) -> None:
    """Refuse, before any work, what the fused ONNX Runtime graph (--ops ort) does not offer."""
    if config.ops not in OPS:
        raise NectarError(f"unknown --ops {config.ops!r}; choose one of {', '.join(OPS)}")
    if config.ops != "ort":
        return
    if config.precision not in ORT_PRECISIONS:
        raise NectarError(f"--ops ort builds {' or '.join(ORT_PRECISIONS)} graphs, not {config.precision}; "
                          "use --ops portable for other precisions")
    if config.cache != "static":
        raise NectarError("--ops ort writes the static KV layout (GroupQueryAttention updates the buffers in place); "
                          "pass --cache static")
    if config.base or config.all_logits:
        raise NectarError("--ops ort writes single-file bundles with the last token's logits; it takes neither "
                          "--base nor --all-logits")


def export_passes(config: ExportConfig) -> list[Any]:
    """The passes from the traced graph to the bundle's, in order."""
    from nectar_graphs.int4 import quantize_int4
    from nectar_graphs.passes import cleanup, convert_precision, fold_constants, fuse_sibling_matmuls, lift_heads

    if config.ops == "ort":              # built in its precision with its products fused: only the cleanup
        return [cleanup]
    floats = FLOAT_PRECISION.get(config.precision, config.precision)
    # converting before fusing: the fused q|k|v and gate|up copies are made in the low precision; quantizing
    # after it: a fused product is one MatMulNBits, whose blocks run along K and so never mix q, k and v
    passes = [fold_constants, convert_precision(floats), fuse_sibling_matmuls]
    if config.precision == "int4":
        passes.append(quantize_int4())
    passes.append(cleanup)
    if config.base:
        passes.append(lift_heads)
    return passes


def trace_step(config: ExportConfig, manifest: ArtifactManifest, stage: Stages) -> Traced:
    """Load the model and heads, prefill the context, trace the step module; the torch model is let go after."""
    from nectar_graphs.step import StepModule, nectar_contexts
    from nectar_graphs.trace import export_step

    loaded = load_model(config.model or manifest.model.source)
    artifact = load_artifact(config.artifact, loaded.fingerprint)
    if config.variant not in artifact.heads:
        raise NectarError(f"artifact has no variant {config.variant!r}; it has {', '.join(artifact.heads)}")
    model = loaded.model
    _check_sliding_window(model.config, artifact.n + manifest.max_new_tokens)
    context_ids = artifact.heldout().context_ids
    device, static = check_device(config.device), config.cache == "static"
    pairs = None
    if config.baseline:                      # the context's KV leaves the device in the bundle's precision
        cache = context_cache(model, context_ids, device, dtype=TORCH_DTYPES[config.precision])
        step = StepModule(model, None, config.all_logits, static)
    else:                                    # only the exact tokens' KV leaves the device
        pairs = artifact.heads[config.variant]
        windows = layer_windows(model.config)
        if config.base:                      # the heads only give the graph its shapes; a pack brings the KV
            if any(windows):
                raise NectarError("--base for a model with sliding-window layers (Gemma 3) is not supported yet: "
                                  "packs hold one exact-token count for every layer; export a single-file bundle")
            check_joint(pairs, config.variant)
            empty = [torch.zeros(0, 0, 0) for _ in pairs]                  # n = 0 tokens
            cache = ContextCache(empty, list(empty))
            step = StepModule(model, nectar_contexts(pairs), config.all_logits, static)
        else:
            exact, heads = model_exact_sets(windows, artifact.exact_sets(), artifact.n), iter(nectar_contexts(pairs))
            cache = context_cache(model, context_ids, device, exact=exact)
            kept = sum(k.numel() + v.numel() for k, v in zip(cache.keys, cache.values))   # before any padding
            cache, dead = aligned(cache.keys, cache.values) if any(windows) else (cache, None)
            step = StepModule(model, [None if w else next(heads) for w in windows], config.all_logits, static, dead)
    stage("torch.onnx.export")
    if config.ops == "ort":
        from nectar_graphs.fused import build_fused_step
        if pairs is not None:
            check_joint(pairs, config.variant)
        graph = build_fused_step(model, pairs, config.precision, artifact.n + manifest.max_new_tokens)
    else:
        graph = export_step(step.eval())
    # what the bundle records about the torch model, then let it go: the graph's weights are then the only
    # references to the float32 parameters, so each is freed as the passes replace it (docs/RESULTS.md, section 3)
    params = nectar_params(step, pairs, None if config.baseline else cache)
    if not config.baseline and not config.base:
        params["fitted"] += kept - sum(k.numel() + v.numel() for k, v in zip(cache.keys, cache.values))  # no padding
    traced = Traced(graph=graph, cache=cache, params=params,
                    base_params=sum(p.numel() for p in model.parameters()), vocab_size=int(model.config.vocab_size),
                    fingerprint=loaded.fingerprint, tokenizer=loaded.tokenizer)
    del step, model, loaded, artifact
    gc.collect()
    return traced


def bundle_manifest(config: ExportConfig, manifest: ArtifactManifest, traced: Traced, reports: list[Any],
                    lint_report: dict[str, Any], inputs: Any, outputs: Any) -> BundleManifest:
    """bundle.json's content (its `files` are added as the bundle is written)."""
    from nectar_graphs.bundle_writer import tensors_with_dim, weight_bytes
    from nectar_graphs.passes import op_counts
    from nectar_graphs.trace import IR_VERSION, OPSET

    model, n, tokenizer = manifest.model, manifest.n, traced.tokenizer
    source = Source(artifact=str(Path(config.artifact).expanduser().resolve()), model_source=model.source,
                    model_fingerprint=traced.fingerprint, context_sha256=manifest.context.sha256,
                    variant=None if config.baseline else config.variant, code_version=__version__)
    graph = {"opset": OPSET, "ir_version": IR_VERSION, "passes": [r.to_json() for r in reports],
             "op_counts": op_counts(traced.graph), "weight_bytes": weight_bytes(traced.graph),
             "base_params": traced.base_params, "nectar_params": traced.params["fitted"],
             "nectar_graph_numbers": traced.params["in_graph"],
             "dims_equal_to_n": len(tensors_with_dim(traced.graph, n)), "lint": lint_report}
    kind = "base" if config.base else "full" if config.baseline else "nectar"
    if config.base:                          # no document: a pack gives n, the cached tokens and the template
        n, source = 0, dataclasses.replace(source, context_sha256="")
    return BundleManifest(
        kind=kind, precision=config.precision, kv_dtype=inputs[3].dtype,
        cache_layout=config.cache, n=n, first_position=n, max_new_tokens=manifest.max_new_tokens,
        cached_tokens=traced.cache.n, logits="all" if config.all_logits else "last", layers=model.layers,
        kv_heads=model.kv_heads, head_dim=_kv_head_size(inputs, model.head_dim), vocab_size=traced.vocab_size, inputs=tuple(inputs),
        outputs=tuple(outputs),
        question_template="{question}" if config.base else manifest.context.question_template,
        stop_token_ids=tuple(sorted(stop_ids(tokenizer))), pad_token_id=pad_id(tokenizer), source=source,
        graph=graph, ops=config.ops, **_limits(config))


def _kv_head_size(inputs: Any, head_dim: int) -> int:
    """The KV I/O's head size: the model's, or the fused Nectar graph's padded one (graphs/fused.py)."""
    shape = inputs[3].shape
    return shape[-1] if shape and isinstance(shape[-1], int) else head_dim


def _limits(config: ExportConfig) -> dict[str, int]:
    """What one call of the graph may hold: the fused Nectar graph's head_sink is per head, so one sequence and one
    new token (graphs/fused.py); 0 is no limit."""
    fused_nectar = config.ops == "ort" and not config.baseline
    return {"step_tokens": 1 if fused_nectar else 0, "max_batch": 1 if fused_nectar else 0}


def check_joint(pairs: Sequence[Any], variant: str) -> None:
    """Refuse heads that a base bundle's inputs cannot hold: only MLP pairs run as the three products it takes."""
    if not all(hasattr(p, "joint_weights") for p in pairs):
        raise NectarError(f"the artifact's {variant!r} heads are not MLP pairs (a quadrature family?); base bundles "
                          "and packs hold MLP heads only: pick the 'nectar' variant")


def context_cache(model: Any, ids: list[int], device: torch.device, exact: Sequence[torch.Tensor] | None = None,
                  dtype: torch.dtype | None = None) -> ContextCache:
    """The context's KV on the CPU, prefilled on `device` (the model is back on the CPU afterwards); with
    exact (per layer, the exact tokens: [E] or per KV-head [Hkv, E]), only those tokens' KV (gathered where it
    was computed); with dtype, cast there too (at 128K, Qwen3-1.7B's KV is 30 GB in fp32 and 15 GB in fp16)."""
    def moved(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype=dtype or t.dtype).cpu()

    def kept(cache: ContextCache) -> ContextCache:
        if exact is None:
            return ContextCache([moved(k) for k in cache.keys], [moved(v) for v in cache.values])
        index = [i.to(cache.keys[0].device) for i in exact]
        return ContextCache([moved(take(k, i)) for k, i in zip(cache.keys, index)],
                            [moved(take(v, i)) for v, i in zip(cache.values, index)])

    if device.type == "cpu":
        return kept(prefill(model, ids))
    try:
        return kept(prefill(model.to(device), ids))
    finally:
        model.cpu()
        torch.cuda.empty_cache()


def nectar_params(step: Any, pairs: Any = None, exact: Any = None) -> dict[str, int]:
    """Numbers the document leaves in a Nectar bundle: every fitted pair's weights and buffers plus the exact
    tokens' KV (`exact`, a ContextCache; it ships beside the graph as the start of the past) ("fitted"), and
    the constants that hold the pairs in the graph ("in_graph": a joint MLP pair's block-diagonal layers and
    carried columns add zeros and identities)."""
    contexts = [layer.self_attn.context for layer in step.layers if layer.self_attn.context is not None]
    in_graph = sum(t.numel() for c in contexts for t in [*c.parameters(), *c.buffers()])
    kv = sum(k.numel() + v.numel() for k, v in zip(exact.keys, exact.values)) if exact is not None else 0
    fitted = sum(t.numel() for p in (pairs or []) for t in [*p.parameters(), *p.buffers()])
    return {"fitted": fitted + kv, "in_graph": in_graph}


def _context_kv(cache: Any, dtype: str, head_size: int | None = None) -> dict[str, Any]:
    """The context's (or the exact tokens') keys and values as [1, Hkv, tokens, head_size] arrays named after the past
    inputs; a head size above the model's is the fused Nectar layout (graphs/fused.py: pad_context_kv), None the
    model's own (packs: their bases are portable graphs)."""
    from nectar_graphs.fused import pad_context_kv
    from nectar_graphs.passes import lower_array
    from nectar_runtime.backends.ort import kv_numpy_dtype
    from nectar_runtime.bundle import past_names

    np_dtype = kv_numpy_dtype(dtype)
    arrays = []
    for k, v in zip(cache.keys, cache.values):
        k, v = k.unsqueeze(0).float().numpy(), v.unsqueeze(0).float().numpy()
        if head_size is not None and head_size != k.shape[-1]:
            k, v = pad_context_kv(k, v, head_size)
        arrays += [k, v]                                                           # past input order
    return {name: lower_array(a, np_dtype) for name, a in zip(past_names(len(cache.keys)), arrays)}


def model_exact_sets(windows: Sequence[int | None], head_sets: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Per model layer, the context tokens whose KV the bundle ships: a head layer's exact tokens (the artifact's
    sets, in head-layer order), a sliding layer's last `window` tokens."""
    given = iter(head_sets)
    return [torch.arange(max(0, n - w), n) if w else next(given) for w in windows]


def _check_sliding_window(config: Any, positions: int) -> None:
    """The step graph attends to every token in a layer without a window of its own (Gemma 3's layer_types give
    each layer one, which the graph handles); refuse a model whose one sliding window would cut the context."""
    if any(layer_windows(config)):
        return
    window = getattr(config, "sliding_window", None)
    if window and (getattr(config, "use_sliding_window", True) is not False) and window < positions:
        raise NectarError(f"the model attends within a sliding window of {window} tokens, shorter than the "
                          f"{positions} positions of context plus new tokens; export supports full attention only")
