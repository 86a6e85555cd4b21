"""`nectar-export verify`: the exported graph in ONNX Runtime against the torch model on held-out prompts.

The reference for a Nectar bundle is the Hugging Face model with Nectar attention (the fitted heads
and exact tokens, as `eval` measures them); for a full-attention bundle it is the stock model with
the context's KV as its cache. Both run greedy decoding; the graph is fed the same tokens, and every
step's logits and the final keys/values are compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nectar_export.artifact import load_artifact, read_manifest
from nectar_export.attention import forward, nectar_mode
from nectar_export.errors import NectarError
from nectar_export.models import load_model
from nectar_export.prefill import ContextCache, prefill
from nectar_export.samples import question_ids

TOP_MISMATCHES = 20


def _reference_cache(model: Any, cache: ContextCache | None) -> Any:
    """A fresh transformers cache: empty (Nectar) or holding the context's KV (full attention)."""
    from transformers import DynamicCache

    fresh = DynamicCache(config=model.config)
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


def run_verify(path: Path, prompts: int = 24, steps: int = 10, backend_name: str = "ort-cpu",
               model_spec: str | None = None) -> dict[str, Any]:
    """Run both on up to `prompts` held-out questions with `steps` greedy decode steps each; report the gaps."""
    from nectar_runtime.backends.ort import make_backend
    from nectar_runtime.bundle import load_bundle

    from nectar_export.evaluate import heads_contexts

    bundle = load_bundle(path, check_hashes=True)
    source = bundle["source"]
    artifact_path = Path(source["artifact"])
    manifest = read_manifest(artifact_path)
    loaded = load_model(model_spec or source["model_source"])
    if loaded.fingerprint != source["model_fingerprint"]:
        raise NectarError(f"bundle was exported from model {source['model_fingerprint'][:16]}, the loaded model is "
                          f"{loaded.fingerprint[:16]}; pass --model with the model it was exported from")
    artifact = load_artifact(artifact_path, loaded.fingerprint, source["context_sha256"])
    model, tokenizer = loaded.model, loaded.tokenizer
    heldout = json.loads((artifact_path / "heldout.json").read_text())
    cache = prefill(model, heldout["context_ids"], progress=False)
    questions = [s["question"] for s in heldout["test"] if s.get("question")][:prompts]
    if not questions:
        raise NectarError(f"{artifact_path} has no held-out questions to verify with")
    template = manifest["context"]["question_template"]
    n = artifact.n
    full = bundle.kind == "full"
    contexts = None if full else heads_contexts(artifact.heads[source["variant"]], cache,
                                                cache.exact_index(*artifact.exact_tokens))
    diffs: dict[str, float] = {}
    mismatches, matches, total, all_diffs = [], 0, 0, []
    backend = make_backend(bundle, backend_name)
    backend.activate()
    try:
        for p, question in enumerate(questions):
            prompt = question_ids(tokenizer, template, question)
            if full:
                fed, ref_logits, ref_cache = _reference_run(model, prompt, n, steps, cache)
            else:
                with nectar_mode(model, contexts):
                    fed, ref_logits, ref_cache = _reference_run(model, prompt, n, steps, None)
            backend.reset(1)
            for s, (tokens, ref) in enumerate(zip(fed, ref_logits)):
                got = backend.step(np.array([tokens], dtype=np.int64))
                gap = float(np.abs(got - ref).max())
                all_diffs.append(gap)
                diffs["logits"] = max(diffs.get("logits", 0.0), gap)
                total += 1
                if int(got.argmax()) == int(ref.argmax()):
                    matches += 1
                else:
                    mismatches.append({"prompt": p, "step": s, "torch_top1": int(ref.argmax()),
                                       "onnx_top1": int(got.argmax()), "max_abs_diff": gap})
            _compare_kv(backend, ref_cache, bundle, diffs)
    finally:
        backend.release()
    graph = bundle["graph"]
    return {"bundle": str(bundle.path), "kind": bundle.kind, "precision": bundle["precision"],
            "backend": backend_name, "prompts": len(questions), "steps_per_prompt": steps + 1,
            "max_abs_logit_diff": diffs.get("logits", 0.0), "median_abs_logit_diff": float(np.median(all_diffs)),
            "top1_match": matches / total, "compared_steps": total, "max_abs_diff_by_output": diffs,
            "mismatches": mismatches[:TOP_MISMATCHES], "mismatch_count": len(mismatches),
            "op_counts": graph["op_counts"],
            "fusion_counts": next((p["counts"] for p in graph["passes"] if p["name"] == "fuse_sibling_matmuls"), {})}


def _compare_kv(backend: Any, ref_cache: Any, bundle: Any, diffs: dict[str, float]) -> None:
    """Largest gap between the graph's presents and the reference cache (host backends only). A Nectar
    bundle's past starts with the exact tokens' KV, which the reference keeps inside its heads."""
    past = getattr(backend, "past", None)
    if not isinstance(past, list) or not past or not isinstance(past[0], np.ndarray):
        return
    skip = bundle.context_tokens if bundle.kind == "nectar" else 0
    for name, got, layer, kind in zip(bundle.present_names(), past,
                                      [i for i in range(bundle["layers"]) for _ in (0, 1)],
                                      ["keys", "values"] * bundle["layers"]):
        ref = getattr(ref_cache.layers[layer], kind).float().numpy()
        got = got[:, :, skip:]
        if ref.shape != got.shape:
            raise NectarError(f"{name}: graph gives {got.shape}, the reference cache {ref.shape}")
        diffs[name] = max(diffs.get(name, 0.0), float(np.abs(got.astype(np.float32) - ref).max()))
