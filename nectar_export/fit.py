"""`fit`: from a model and a document to a saved artifact, stage by stage, with timings."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nectar_export.artifact import ArtifactManifest, ContextRecord, HeldOut, ModelRecord, check_output, save_artifact
from nectar_export.capacity import allocate, linear_probe_error
from nectar_export.queries import LayerData, Queries, collect, targets
from nectar_export.config import FitConfig
from nectar_export.context import Context, build_context, load_document
from nectar_export.errors import NectarError
from nectar_export.train import TrainSettings, fit_pairs
from nectar_export.heads import MLPPair, Pair, QuadraturePair, build_pair, pair_params
from nectar_export.models import check_device, LoadedModel, load_model
from nectar_export.prefill import ContextCache, complement, prefill, take
from nectar_graphs.files import writing
from nectar_export.samples import SampleSet, build_samples
from nectar_export.selection import attention_mass, exact_sets


class Stopwatch:
    """Seconds spent per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()                     # count queued GPU work in the stage that queued it
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)
        return result


def model_shape(model: Any) -> dict[str, int]:
    cfg = model.config
    return {"layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
            "query_heads": cfg.num_attention_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads}


def layer_budget(config: FitConfig, n: int, dim: int) -> int:
    """Network parameters per (layer, KV-head) on average: the budget minus what the exact tokens hold."""
    window = config.window_tokens(n, dim)
    salient = config.salient_tokens(n, dim)
    net = config.head_budget(n, dim) - 2 * (config.sinks + window + salient) * dim
    if net < 4 * dim:
        given = f"--head-params {config.head_params}" if config.head_params is not None else f"--budget {config.budget}"
        named = f", {salient} salient tokens" if salient else ""
        raise NectarError(f"{given} leaves {net} parameters per head after {config.sinks} sinks{named} "
                          f"and a {window}-token window; raise the budget or lower --sinks/--window/--salient")
    return net


def make_pairs(family: str, budgets: Sequence[int], shape: dict[str, int], cache: ContextCache,
               exact: Sequence[torch.Tensor], train: Sequence[LayerData], seed: int) -> list[Pair]:
    """Build and initialize one pair per layer within its parameter budget."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for layer, budget in enumerate(budgets):
        index = exact[layer]
        pair = build_pair(family, shape["kv_heads"], shape["head_dim"], budget).to(index.device)
        if isinstance(pair, QuadraturePair):
            modeled = complement(index, cache.n, shape["kv_heads"])
            pair.init_from_cache(take(cache.keys[layer], modeled), take(cache.values[layer], modeled), generator)
        elif isinstance(pair, MLPPair):
            d = train[layer]
            pair.init_from(d.q, d.ctx_lse, d.ctx_out)
        pairs.append(pair)
    return pairs


@dataclass
class LayerSets:
    """What every variant is fitted on: per-layer train and validation data, the exact tokens' positions, the
    softmax scale, and each layer's measured difficulty (for the adaptive allocation)."""

    train: list[LayerData]
    val: list[LayerData]
    exact: list[torch.Tensor]     # per layer, the exact tokens: [E] shared by the heads, or [Hkv, E] per head
    scaling: float
    difficulty: list[float]
    mass: list[torch.Tensor]      # per layer [Hkv, n]: mean softmax weight of each context token, training queries


@dataclass
class Loaded:
    """The model on its device and the context built for it: what fit checks the budget against before any work."""

    loaded: LoadedModel
    context: Context
    doc_ids: list[int]
    max_positions: int
    device: str

    @property
    def shape(self) -> dict[str, int]:
        return model_shape(self.loaded.model)


@dataclass
class Recorded:
    """What does not depend on the budget: the model, the context and its cache, the samples, and the train and
    validation queries recorded under full attention with their attention mass. The budget only moves the exact
    tokens (window and salient ones scale with it), hence the targets, the difficulty and the fit."""

    base: Loaded
    cache: ContextCache
    samples: SampleSet
    queries: dict[str, list[Queries]]
    mass: list[torch.Tensor]
    scaling: float

    @property
    def model(self) -> Any:
        return self.base.loaded.model

    @property
    def context(self) -> Context:
        return self.base.context

    @property
    def shape(self) -> dict[str, int]:
        return self.base.shape


def run_fit(config: FitConfig, out: Path, device: str = "cpu", overwrite: bool = False) -> dict[str, Any]:
    """The whole fitting pipeline; writes the artifact to out and returns its manifest's metrics.

    `device` only decides where the work runs (float32 everywhere), not what is fitted; `overwrite` lets it
    replace an earlier artifact at `out`. Before any work, `out` is held (nectar_graphs.files.writing): refused
    in one line when it cannot be written or another process is writing it.
    """
    with writing(out):
        return _run_fit(config, out, device, overwrite)


def _run_fit(config: FitConfig, out: Path, device: str, overwrite: bool) -> dict[str, Any]:
    """run_fit's stages, with `out` held."""
    check_output(out, overwrite)
    clock = Stopwatch()
    base = load(config, device, clock)
    budget = layer_budget(config, base.context.n, base.shape["head_dim"])
    recorded = record(config, base, clock)
    sets = layer_sets(recorded, config, clock)
    heads, reports = fit_variants(config, sets, budget, recorded.shape, recorded.cache, clock)
    return write(out, overwrite, config, recorded, sets, heads, reports, clock)


def load(config: FitConfig, device: str, clock: Stopwatch) -> Loaded:
    """Seed, load the model onto the device and build the context."""
    dev = check_device(device)
    torch.manual_seed(config.seed)
    loaded: LoadedModel = clock.run("load_model", lambda: load_model(config.model))
    loaded.model.to(dev)
    max_positions = int(loaded.model.config.max_position_embeddings)
    context, doc_ids = build_context(loaded.tokenizer, load_document(config.context), config.context_tokens,
                                     max_positions, config.reserve)
    return Loaded(loaded, context, doc_ids, max_positions, str(dev))


def record(config: FitConfig, base: Loaded, clock: Stopwatch) -> Recorded:
    """Prefill the context, build the samples, and record the train and validation queries and their mass."""
    model, context = base.loaded.model, base.context
    cache = clock.run("prefill", lambda: prefill(model, context.ids))
    samples: SampleSet = clock.run("samples", lambda: build_samples(model, base.loaded.tokenizer, context,
                                                                    base.doc_ids, cache.exact(), config))
    scaling = float(model.model.layers[0].self_attn.scaling)
    queries = {split: clock.run("collect", lambda: collect(model, cache, samples.splits[split], desc=f"{split} queries"))
               for split in ("train", "val")}
    mass = clock.run("attention_mass", lambda: attention_mass(queries["train"], cache.heads(), scaling))
    return Recorded(base, cache, samples, queries, mass, scaling)


def layer_sets(recorded: Recorded, config: FitConfig, clock: Stopwatch) -> LayerSets:
    """The budget's exact tokens, the exact targets of the recorded queries, and each layer's difficulty."""
    n, dim, cache = recorded.context.n, recorded.shape["head_dim"], recorded.cache.heads()
    mass, scaling = recorded.mass, recorded.scaling
    exact = exact_sets(n, config.sinks, config.window_tokens(n, dim), config.salient_tokens(n, dim), mass, len(mass),
                       cache.keys[0].device)
    train = clock.run("targets", lambda: targets(recorded.queries["train"], cache, exact, scaling, desc="train targets"))
    val = clock.run("targets", lambda: targets(recorded.queries["val"], cache, exact, scaling, desc="val targets"))
    difficulty = clock.run("allocate", lambda: [linear_probe_error(t, v) for t, v in zip(train, val)])
    return LayerSets(train, val, exact, scaling, difficulty, mass)


def variant_plans(config: FitConfig) -> dict[str, tuple[str, str]]:
    """Per head variant, its (family, allocation): 'nectar' and, with ablations on, the two baselines."""
    plans = {"nectar": (config.family, config.allocation)}
    if config.ablations:
        plans["quadrature"] = ("quadrature", config.allocation)
        plans["uniform_allocation"] = (config.family, "uniform")
    return plans


def fit_variants(config: FitConfig, sets: LayerSets, budget: int, shape: dict[str, int], cache: ContextCache,
                 clock: Stopwatch, only: Sequence[str] | None = None) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
    """Fit the 'nectar' heads and, with ablations on, the quadrature and uniform-allocation baselines, in that
    order (`only`: just these of them)."""
    settings = TrainSettings(config.epochs, config.batch_size, config.lr, config.patience, config.seed)
    cache = cache.heads()                           # a hybrid model's global layers: the only ones with heads
    heads: dict[str, list[Pair]] = {}
    reports: dict[str, Any] = {}
    exact = sets.exact
    for variant, (family, allocation) in variant_plans(config).items():
        if only is not None and variant not in only:
            continue
        budgets = allocate(sets.difficulty, budget) if allocation == "adaptive" else [budget] * len(sets.train)
        pairs = make_pairs(family, budgets, shape, cache, exact, sets.train, config.seed)
        stage = "fit" if variant == "nectar" else f"fit_{variant}"
        fit_report = clock.run(stage, lambda: fit_pairs(pairs, sets.train, sets.val, sets.scaling, settings,
                                                        desc=f"fit {variant}"))
        heads[variant] = pairs
        reports[variant] = {
            "family": family, "allocation": allocation,
            "params": sum(pair_params(p) * p.heads + 2 * e.shape[-1] * p.heads * p.dim for p, e in zip(pairs, exact)),
            "val_approx_error_by_layer": [round(r["val_approx_error"], 5) for r in fit_report],
            "epochs_by_layer": [r["epochs"] for r in fit_report],
        }
    return heads, reports


def write(out: Path, overwrite: bool, config: FitConfig, recorded: Recorded, sets: LayerSets,
          heads: dict[str, list[Pair]], reports: dict[str, Any], clock: Stopwatch,
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the manifest (`extra`: more entries for its fit metrics) and save the artifact atomically; returns
    the fit metrics."""
    context, shape, model = recorded.context, recorded.shape, recorded.model
    cache = recorded.cache
    # the KV entries the heads stand in for: every layer's, or a hybrid model's global layers' (its sliding layers
    # keep their window whatever the method)
    kv_entries = 2 * context.n * shape["head_dim"] * shape["kv_heads"] * len(cache.head_layers)
    metrics = {"nectar_params": reports["nectar"]["params"], "kv_entries": kv_entries,
               "params_over_kv": round(reports["nectar"]["params"] / kv_entries, 5),
               "layer_difficulty": [round(d, 5) for d in sets.difficulty], "variants": reports,
               "seconds": clock.seconds, "device": recorded.base.device,
               "fit_seconds": round(sum(v for k, v in clock.seconds.items() if not k.startswith("fit_")), 1),
               "samples": recorded.samples.counts(), **(extra or {})}
    hybrid = cache.windows is not None
    model_record = ModelRecord(source=config.model, fingerprint=recorded.base.loaded.fingerprint,
                               model_type=model.config.model_type, **shape, scaling=sets.scaling,
                               max_positions=recorded.base.max_positions,
                               head_layers=tuple(cache.head_layers) if hybrid else None,
                               sliding_window=int(model.config.sliding_window) if hybrid else None)
    context_record = ContextRecord(source=context.source, sha256=context.sha256, n=context.n, sinks=config.sinks,
                                   window=config.window_tokens(context.n, shape["head_dim"]),
                                   salient=config.salient_tokens(context.n, shape["head_dim"]),
                                   document_tokens=context.document_tokens,
                                   document_total_tokens=context.document_total_tokens, prefix_text=context.prefix_text,
                                   question_template=context.question_template)
    manifest = ArtifactManifest(model=model_record, context=context_record, max_new_tokens=config.reserve,
                                config=config, fit=metrics)
    samples = recorded.samples
    heldout = HeldOut(context_ids=tuple(context.ids), test=tuple(samples.splits["test"]),
                      val=tuple(samples.splits["val"]))
    heads = {variant: [pair.cpu() for pair in pairs] for variant, pairs in heads.items()}
    save_artifact(out, manifest, heads, heldout, overwrite, mass=sets.mass)
    return metrics
