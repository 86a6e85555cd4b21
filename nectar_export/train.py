"""Fitting head pairs to recorded queries: every KV-head of a layer at once, Adam, early stopping."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from nectar_export.queries import LayerData
from nectar_export.heads import Pair


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 40
    batch_size: int = 2048
    lr: float = 3e-3
    patience: int = 4
    seed: int = 0
    lse_weight: float = 0.05       # small auxiliary pull of S towards the true log-normalizer


def merged_prediction(pair: Pair | Callable, d: LayerData, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, merged output) a pair (or any q -> (lse, out) function) gives, merged with sinks + new tokens."""
    score, target = pair(d.q, scaling)
    share = torch.sigmoid(score - d.rest_lse).unsqueeze(-1)                     # context's softmax mass
    return score, d.rest_out + share * (target - d.rest_out)


def loss_terms(pair: Pair, d: LayerData, scaling: float, norm: torch.Tensor,
               lse_weight: float) -> torch.Tensor:
    """Per-head loss: merged-output squared error relative to the output's size, plus a weighted lse term."""
    score, merged = merged_prediction(pair, d, scaling)
    _, truth = d.merged()
    err = ((merged - truth) ** 2).sum(-1).mean(1) / norm
    mass = torch.sigmoid(d.ctx_lse - d.rest_lse)
    lse_err = (mass * (score - d.ctx_lse) ** 2).mean(1)
    return err + lse_weight * lse_err


@torch.no_grad()
def layer_errors(pair: Pair | Callable, d: LayerData, scaling: float, chunk: int = 16384) -> dict[str, float]:
    """Relative L2 of the merged output and mean |S - lse| over the modeled context, all heads of a layer."""
    sq_err = sq_true = abs_lse = 0.0
    for start in range(0, d.size, chunk):
        part = d.subset(torch.arange(start, min(start + chunk, d.size)))
        score, merged = merged_prediction(pair, part, scaling)
        _, truth = part.merged()
        sq_err += float(((merged - truth) ** 2).sum())
        sq_true += float((truth ** 2).sum())
        abs_lse += float((score - part.ctx_lse).abs().sum())
    return {"approx_error": math.sqrt(sq_err / max(sq_true, 1e-30)),
            "lse_error": abs_lse / (d.size * d.q.shape[0])}


def fit_layer(pair: Pair, train: LayerData, val: LayerData, scaling: float, settings: TrainSettings,
              bar: tqdm) -> dict[str, float]:
    """Train one layer's pair; keep the state with the lowest validation error."""
    generator = torch.Generator().manual_seed(settings.seed)
    _, truth = train.merged()
    norm = (truth ** 2).sum(-1).mean(1).clamp(min=1e-12)                        # [H]
    steps = max(1, math.ceil(train.size / settings.batch_size))
    opt = torch.optim.Adam(pair.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=settings.epochs * steps,
                                                pct_start=0.1)
    best, best_state, stale, epochs = math.inf, copy.deepcopy(pair.state_dict()), 0, 0
    for epoch in range(settings.epochs):
        order = torch.randperm(train.size, generator=generator)
        for i in range(steps):
            batch = train.subset(order[i * settings.batch_size:(i + 1) * settings.batch_size])
            loss = loss_terms(pair, batch, scaling, norm, settings.lse_weight).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.update(steps)
        epochs = epoch + 1
        err = layer_errors(pair, val, scaling)["approx_error"]
        if err < best * (1 - 1e-3):
            best, best_state, stale = err, copy.deepcopy(pair.state_dict()), 0
        else:
            stale += 1
            if stale >= settings.patience:
                bar.update(steps * (settings.epochs - epochs))
                break
    pair.load_state_dict(best_state)
    return {"val_approx_error": best, "epochs": epochs}


def fit_pairs(pairs: Sequence[Pair], train: Sequence[LayerData], val: Sequence[LayerData], scaling: float,
              settings: TrainSettings, desc: str = "fit") -> list[dict[str, float]]:
    """Fit every layer's pair in turn with one progress bar over all optimizer steps."""
    torch.manual_seed(settings.seed)
    total = sum(settings.epochs * max(1, math.ceil(t.size / settings.batch_size)) for t in train)
    reports = []
    with tqdm(total=total, desc=desc, unit="step") as bar:
        for layer, (pair, t, v) in enumerate(zip(pairs, train, val)):
            pair.train()
            reports.append(fit_layer(pair, t, v, scaling, settings, bar))
            pair.eval()
            bar.set_postfix(layer=layer, val_err=f"{reports[-1]['val_approx_error']:.3f}")
    return reports
