"""`nectar-export verify`: the exported graph in ONNX Runtime against the torch model on held-out prompts.

The reference for a Nectar bundle is the Hugging Face model with Nectar attention (the fitted heads
and exact tokens, as `eval` measures them); for a full-attention bundle it is the stock model with
the context's KV as its cache. Both run greedy decoding; the graph is fed the same tokens, and every
step's logits and the final keys/values are compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nectar_export.artifact import load_artifact
from nectar_export.attention import context_cache_for, forward, nectar_mode
from nectar_export.errors import NectarError, NectarInternalError
from nectar_export.models import load_model
from nectar_export.prefill import ContextCache, prefill
from nectar_export.evaluate import heads_contexts
from nectar_export.samples import question_ids

TOP_MISMATCHES = 20


def _reference_cache(model: Any, cache: ContextCache | None) -> Any:
    """A fresh transformers cache: empty (Nectar) or holding the context's KV (full attention)."""
    fresh = context_cache_for(model)           # every token kept, also a sliding layer's (KV compared below)
    if cache is not None:
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            fresh.update(k.unsqueeze(0).clone(), v.unsqueeze(0).clone(), i)
    return fresh


@torch.inference_mode()
def _reference_run(model: Any, prompt: list[int], n: int, steps: int, past: ContextCache | None) -> tuple[list[int], list[np.ndarray], Any]:
    """Greedy decode: the fed tokens, the logits after each feed, and the final cache."""
    cache = _reference_cache(model, past)
    ids = torch.tensor([prompt])
    fed, logits = [prompt], []
    position = n
    for _ in range(steps + 1):
        positions = torch.arange(position, position + ids.shape[1]).unsqueeze(0)
        out = forward(model, ids, positions, cache, logits_to_keep=1)[:, -1].float()
        logits.append(out.numpy())
        position += ids.shape[1]
        ids = out.argmax(-1, keepdim=True)
        fed.append([int(ids)])
    return fed[:-1], logits, cache


@dataclass
class Gaps:
    """Running comparison of the graph against the reference: per-output largest gaps, and per-step top-1 matches."""

    by_output: dict[str, float] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)          # the largest logit gap of each compared step
    matches: int = 0
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    def logits(self, prompt: int, step: int, got: np.ndarray, ref: np.ndarray) -> None:
        gap = float(np.abs(got - ref).max())
        self.steps.append(gap)
        self.by_output["logits"] = max(self.by_output.get("logits", 0.0), gap)
        if int(got.argmax()) == int(ref.argmax()):
            self.matches += 1
        else:
            self.mismatches.append({"prompt": prompt, "step": step, "torch_top1": int(ref.argmax()),
                                    "onnx_top1": int(got.argmax()), "max_abs_diff": gap})


def run_verify(path: Path, prompts: int = 24, steps: int = 10, backend_name: str = "ort-cpu",
               model_spec: str | None = None, check_hashes: bool = True, pack: Path | None = None,
               **backend_options: Any) -> dict[str, Any]:
    """Run both on up to `prompts` held-out questions with `steps` greedy decode steps each; report the gaps (a
    base bundle with `pack`: the pack's document)."""
    from nectar_runtime.backends import make_backend
    from nectar_runtime.bundle import load_bundle

    bundle = load_bundle(path, check_hashes=check_hashes)
    if bundle.kind == "base":                      # the pack's document, on the base's graph
        from nectar_runtime.pack import load_pack, resolve

        if pack is None:
            raise NectarError(f"{bundle.path} is a base bundle: pass the pack to verify (--pack PACK)")
        bundle = resolve(bundle, load_pack(pack, check_hashes=check_hashes))
    elif pack is not None:
        raise NectarError(f"{bundle.path} is a single-file {bundle.kind} bundle; --pack goes with a base bundle")
    manifest = bundle.manifest
    if manifest.source is None:
        raise NectarError(f"{bundle.path} records no source artifact, so there is nothing to verify it against; "
                          "re-export it with `nectar-export export`")
    source = manifest.source
    loaded = load_model(model_spec or source.model_source)
    if loaded.fingerprint != source.model_fingerprint:
        raise NectarError(f"bundle was exported from model {source.model_fingerprint[:16]}, the loaded model is "
                          f"{loaded.fingerprint[:16]}; pass --model with the model it was exported from")
    artifact = load_artifact(Path(source.artifact), loaded.fingerprint, source.context_sha256)
    heldout = artifact.heldout()
    questions = [s.question for s in heldout.questions(prompts)]
    if not questions:
        raise NectarError(f"{artifact.path} has no held-out questions to verify with")
    model, tokenizer = loaded.model, loaded.tokenizer
    cache = prefill(model, heldout.context_ids, progress=False)
    contexts = None if bundle.kind == "full" else heads_contexts(artifact.heads[source.variant], cache,
                                                                 artifact.exact_sets())
    template = artifact.manifest.context.question_template
    gaps = Gaps()
    with make_backend(bundle, backend_name, **backend_options) as backend:
        for p, question in enumerate(questions):
            prompt = question_ids(tokenizer, template, question)
            if contexts is None:
                fed, ref_logits, ref_cache = _reference_run(model, prompt, artifact.n, steps, cache)
            else:
                with nectar_mode(model, contexts):
                    fed, ref_logits, ref_cache = _reference_run(model, prompt, artifact.n, steps, None)
            backend.reset(1)
            for s, (tokens, ref) in enumerate(zip(fed, ref_logits)):
                gaps.logits(p, s, backend.step(np.array([tokens], dtype=np.int64)), ref)
            _compare_kv(backend, ref_cache, gaps.by_output)
    total = len(gaps.steps)
    return {"bundle": str(bundle.path), "kind": bundle.kind, "precision": manifest.precision,
            "backend": backend_name, "prompts": len(questions), "steps_per_prompt": steps + 1,
            "max_abs_logit_diff": gaps.by_output.get("logits", 0.0), "median_abs_logit_diff": float(np.median(gaps.steps)),
            "top1_match": gaps.matches / total, "compared_steps": total, "max_abs_diff_by_output": gaps.by_output,
            "mismatches": gaps.mismatches[:TOP_MISMATCHES], "mismatch_count": len(gaps.mismatches),
            "op_counts": manifest.graph.get("op_counts", {}), "fusion_counts": manifest.fusion_counts()}


def _compare_kv(backend: Any, ref_cache: Any, diffs: dict[str, float]) -> None:
    """Largest gap between the backend's present KV and the reference cache, on every backend. A Nectar bundle's
    past starts with the exact tokens' KV, which the reference keeps inside its heads."""
    bundle = backend.bundle
    skip = bundle.cached_tokens if bundle.kind != "full" else 0
    layers = bundle.manifest.layers
    for name, got, layer, kind in zip(bundle.present_names(), backend.present_kv(),
                                      [i for i in range(layers) for _ in (0, 1)], ["keys", "values"] * layers):
        ref = getattr(ref_cache.layers[layer], kind).float().numpy()
        got = got[:, :, skip:, :ref.shape[-1]]        # a fused Nectar graph's KV has padded channels (graphs/fused.py)
        if ref.shape != got.shape:
            raise NectarInternalError(f"{name}: {backend.name} holds {got.shape}, the reference cache {ref.shape}")
        diffs[name] = max(diffs.get(name, 0.0), float(np.abs(got.astype(np.float32) - ref).max()))
