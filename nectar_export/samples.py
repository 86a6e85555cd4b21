"""Text placed after the context, from which training and held-out queries come.

Four sources, each split into disjoint train / validation / test parts:
- continuation: the document's own text beyond the n-token prefix (unseen by the heads' context),
- repeat: passages of the context read again inside the user turn,
- self_study: questions the model writes about sampled passages, with its own full-context answers,
- prompts: the user's prompt file, answered by the model with full context.
Validation drives early stopping; test is only ever used by eval.

When the context holds the whole document there is no continuation text, and a user's questions may be about
any passage, so (with FitConfig.coverage) every passage gets training queries: repeat trains on every aligned
block and self-study asks about every block; validation and test repeat spans start half a block off the
aligned grid (token sequences no training sample holds), and their questions are sampled apart from training's.
Without coverage, passages are dealt to the splits and test passages get no training query at all.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from nectar_export.attention import ContextAttention
from nectar_export.config import FitConfig
from nectar_export.context import Context, encode
from nectar_export.errors import NectarError
from nectar_export.batch_generate import Sampling, generate

SPLITS = ("train", "val", "test")
_ASK = ("Here is part of a document:\n\n{passage}\n\n"
        "Write one short question that this passage answers. Reply with the question only.")


@dataclass(frozen=True)
class Sample:
    """New tokens placed right after the context (first token at position n)."""

    source: str
    ids: tuple[int, ...]
    question: str | None = None      # for question-style samples: the user's text


@dataclass
class SampleSet:
    """Samples by split; test questions drive the generation metrics."""

    splits: dict[str, list[Sample]] = field(default_factory=lambda: {s: [] for s in SPLITS})

    def questions(self, split: str) -> list[str]:
        return [s.question for s in self.splits[split] if s.question is not None]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for split, samples in self.splits.items():
            for s in samples:
                out.setdefault(split, {}).setdefault(s.source, 0)
                out[split][s.source] += 1
        return out


def read_prompts(path: str) -> list[str]:
    """One prompt per line, or JSONL with a 'prompt' (or 'text') field per line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise NectarError(f"prompt file not found: {path}")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise NectarError(f"prompt file {path} is not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if line.startswith("{"):
            try:
                record = json.loads(line)
                prompts.append(str(record.get("prompt") or record["text"]))
            except (json.JSONDecodeError, KeyError):
                raise NectarError(f"{path}:{number}: JSONL lines need a 'prompt' or 'text' field") from None
        else:
            prompts.append(line)
    if not prompts:
        raise NectarError(f"prompt file {path} holds no prompts")
    return prompts


def _blocks(ids: Sequence[int], size: int) -> list[list[int]]:
    return [list(ids[i:i + size]) for i in range(0, len(ids) - size + 1, size)]


def _deal(items: list[Any], counts: tuple[int, int, int], rng: random.Random) -> dict[str, list[Any]]:
    """Shuffle and hand out disjoint (train, val, test) parts in proportion to counts, at most counts each;
    with three items or more every split gets at least one."""
    items = items[:]
    rng.shuffle(items)
    total = sum(counts)
    sizes = [min(c, max(1, len(items) * c // total)) for c in counts]
    while sum(sizes) > len(items) and max(sizes) > 0:
        sizes[sizes.index(max(sizes))] -= 1
    out, start = {}, 0
    for split, size in zip(SPLITS, sizes):
        out[split] = items[start:start + size]
        start += size
    return out


def _cycle(items: list[Any], count: int) -> list[Any]:
    return [items[i % len(items)] for i in range(count)] if items else []


def right_padded(batch: Sequence[Sample], start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, valid, positions) [B, T] for teacher forcing after the context; padding sits after each sample,
    where causal attention keeps it out of the real tokens' view."""
    width = max(len(s.ids) for s in batch)
    ids = torch.tensor([list(s.ids) + [0] * (width - len(s.ids)) for s in batch])
    valid = torch.tensor([[j < len(s.ids) for j in range(width)] for s in batch])
    positions = start + torch.arange(width).unsqueeze(0).expand(len(batch), -1)
    return ids, valid, positions


def question_ids(tokenizer: Any, template: str, question: str) -> list[int]:
    """Tokens that follow the document for a user's question, up to where the answer starts."""
    return encode(tokenizer, template.format(question=question))


def build_samples(model: Any, tokenizer: Any, context: Context, doc_ids: Sequence[int],
                  full: Sequence[ContextAttention], config: FitConfig) -> SampleSet:
    """Make every source's samples; self-study questions and all answers are written by the model itself."""
    rng = random.Random(config.seed)
    samples = SampleSet()
    whole = context.document_tokens >= context.document_total_tokens
    # passages are dealt before the continuation blocks: the order of draws from rng fixes the samples
    passages = (_covering(doc_ids[:context.document_tokens], config, rng) if whole and config.coverage else
                _deal(_blocks(doc_ids[:context.document_tokens], config.passage_tokens), (70, 10, 20), rng))
    beyond = _blocks(doc_ids[context.document_tokens:], config.passage_tokens)
    for split, blocks in _deal(beyond, config.continuation, rng).items():
        samples.splits[split] += [Sample("continuation", tuple(b)) for b in blocks]
    questions: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for split, repeat, study in zip(SPLITS, config.repeat, config.self_study):
        blocks = passages[split]
        shown = blocks if whole and config.coverage and split == "train" else blocks[:repeat]
        samples.splits[split] += [Sample("repeat", tuple(question_ids(tokenizer, context.question_template, tokenizer.decode(b))))
                                  for b in shown]
        count = max(study, len(shown)) if whole and config.coverage and split == "train" else study
        asked = write_questions(model, tokenizer, _cycle(blocks, count), config.seed, split)
        questions[split] += [("self_study", q) for q in asked]
    if config.prompts:
        for split, prompts in _deal(read_prompts(config.prompts), (8, 1, 1), rng).items():
            questions[split] += [("prompts", p) for p in prompts]
    stop = stop_ids(tokenizer)
    for split, pairs in questions.items():
        prompts = [question_ids(tokenizer, context.question_template, q) for _, q in pairs]
        answers = generate(model, prompts, full, context.n, Sampling(max_new_tokens=config.answer_tokens),
                           stop, pad_id(tokenizer), desc=f"answers ({split})") if prompts else []
        samples.splits[split] += [Sample(src, tuple(p + a), q) for (src, q), p, a in zip(pairs, prompts, answers)]
    return samples


def _covering(doc: Sequence[int], config: FitConfig, rng: random.Random) -> dict[str, list[list[int]]]:
    """Passages when the document is whole: train gets every aligned block; validation and test get disjoint
    samples of the blocks half a block off that grid (each overlaps two training blocks, equals none)."""
    size = config.passage_tokens
    want = (0, max(config.repeat[1], config.self_study[1]), max(config.repeat[2], config.self_study[2]))
    return {**_deal(_blocks(doc[size // 2:], size), want, rng), "train": _blocks(doc, size)}


def write_questions(model: Any, tokenizer: Any, passages: list[list[int]], seed: int, split: str) -> list[str]:
    """The model's own question about each passage (sampled, passage alone in the prompt, no context)."""
    if not passages:
        return []
    prompts = []
    for block in passages:
        text = _ASK.format(passage=tokenizer.decode(block))
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) if tokenizer.chat_template else text
        prompts.append(encode(tokenizer, chat))
    layers = len(model.model.layers)
    outs = generate(model, prompts, [None] * layers, 0, Sampling(48, temperature=0.7, top_p=0.9, seed=seed),
                    stop_ids(tokenizer), pad_id(tokenizer), desc=f"questions ({split})")
    questions = []
    for out in outs:
        text = tokenizer.decode(out, skip_special_tokens=True).strip().split("\n")[0].strip()
        questions.append(text or "What is this passage about?")
    return questions


def stop_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an answer: EOS and the chat turn end where the template has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return ids


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
