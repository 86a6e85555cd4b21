"""The token loop: tokenize the question inside the bundle's template, prefill it in one step, then one token per step.

Window policy: every new token (prompt and answer) takes a position of the bundle's new-token window
(`max_new_tokens` in bundle.json, positions n .. n + window - 1). A prompt must leave room for at least one
answer token, otherwise GenerationError. The answer ends at a stop token (kept in `token_ids`, not in
`text`), at `Sampling.max_new_tokens`, or where the window is full, whichever comes first; `finish` says
which ("stop", "length", "window"). The last answer token is never fed back, so a P-token prompt can get
up to window - P + 1 answer tokens.

Also the edge entry point: `python -m nectar_runtime BUNDLE --prompt TEXT` (no torch, no click).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from nectar_runtime.backends import BACKEND_NAMES, make_backend
from nectar_runtime.backends.base import Backend
from nectar_runtime.bundle import TOKENIZER_FILE, Bundle, load_bundle
from nectar_runtime.errors import GenerationError, NectarError, NectarInternalError
from nectar_runtime.pack import Pack, check_pack, load_pack, resolve
from nectar_runtime.sampling import Sampling, pick_next

@dataclass
class Result:
    """One answer: its tokens, text, why it ended, and how long each step took."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)   # answer tokens, a final stop token included
    text: str = ""
    finish: str = "length"                                # "stop" | "length" | "window" | "cancelled"
    prefill_ms: float = 0.0
    token_ms: list[float] = field(default_factory=list)  # one entry per fed answer token

    @property
    def median_ms(self) -> float:
        return statistics.median(self.token_ms) if self.token_ms else float("nan")

    def timing_line(self, backend: str) -> str:
        return (f"[{backend}] prefill {self.prefill_ms:.1f} ms ({len(self.prompt_ids)} prompt tokens), "
                f"{self.median_ms:.2f} ms/token median over {len(self.token_ms)} steps, "
                f"{len(self.token_ids)} tokens, finish: {self.finish}")


def load_tokenizer(bundle: Bundle) -> Any:
    """The bundle's tokenizer through the `tokenizers` library."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise GenerationError("the runtime needs the tokenizers package: pip install tokenizers") from None
    path = bundle.path / TOKENIZER_FILE
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:          # tokenizers raises a bare Exception on malformed JSON
        raise GenerationError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}; re-export the bundle") from None


def finite(logits: np.ndarray, step: int) -> np.ndarray:
    """The logits, or GenerationError when any is NaN or infinite (damaged weights give those, not an error)."""
    if not np.isfinite(logits).all():
        raise GenerationError(f"the graph returned non-finite logits at step {step}: the bundle's weights look damaged; "
                              "check it with `nectar-export verify` or re-export it")
    return logits


class TextStream:
    """Incremental detokenizer: yields text only once it is complete (no split multi-byte characters).

    It decodes a short window of earlier tokens with the new ones and emits the difference, so decoders
    that depend on neighbours (byte-level BPE, metaspace) give the same text as decoding everything at once.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left (a trailing partial character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class Generator:
    """A bundle, its tokenizer and one active backend; answers questions about the bundle's document.

    A base bundle takes a pack (`pack=`): the pack's document is the one answered, and `use` switches to another
    pack loaded with `load_pack`, on the same session."""

    def __init__(self, bundle_path: str | Path, backend: str = "ort-cpu", check_hashes: bool = True,
                 pack: str | Path | Pack | None = None, **backend_options: Any):
        """Load and check the bundle (every file's sha256 unless `check_hashes` is False), its tokenizer, the pack
        for a base bundle, and activate the backend."""
        self.base = load_bundle(bundle_path, check_hashes=check_hashes)
        self.check_hashes = check_hashes
        self.pack: Pack | None = None
        self.bundle = self.base
        if self.base.kind == "base":
            if pack is None:
                raise GenerationError(f"{self.base.path} is a base bundle: pass the pack of the document to answer "
                                      "(--pack PACK, made with `nectar-export pack`)")
            self.pack = self.load_pack(pack)
            self.bundle = resolve(self.base, self.pack)
        elif pack is not None:
            raise GenerationError(f"{self.base.path} is a single-file {self.base.kind} bundle with its document "
                                  "inside; packs run on a base bundle")
        self.tokenizer = load_tokenizer(self.bundle)
        self.backend_name = backend
        self.backend: Backend = make_backend(self.bundle, backend, **backend_options)
        self.backend.activate()
        self.stop_ids = set(self.bundle.manifest.stop_token_ids)
        self.last: Result | None = None
        self.switch_ms = 0.0                      # how long the last `use` took

    @property
    def window(self) -> int:
        """The new-token window of the document answered now (prompt plus answer)."""
        return self.bundle.manifest.max_new_tokens

    def load_pack(self, pack: str | Path | Pack) -> Pack:
        """A pack checked against this base (BundleError naming both when it was made for another)."""
        loaded = pack if isinstance(pack, Pack) else load_pack(pack, check_hashes=self.check_hashes)
        check_pack(self.base, loaded)
        return loaded

    def use(self, pack: Pack) -> float:
        """Answer about `pack`'s document from now on: the session stays, the pack's heads and KV are bound.
        Returns (and keeps in `switch_ms`) the milliseconds it took."""
        if self.pack is None:
            raise GenerationError(f"{self.base.path} is a single-file bundle; only a base bundle switches packs")
        start = time.perf_counter()
        bundle = resolve(self.base, pack)
        self.backend.switch(bundle)
        self.bundle, self.pack = bundle, pack
        self.switch_ms = (time.perf_counter() - start) * 1e3
        return self.switch_ms

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.backend.release()

    def prompt_ids(self, question: str) -> list[int]:
        """Tokens of the question inside the bundle's template; GenerationError if empty or past the window."""
        if not question or not question.strip():
            raise GenerationError("the prompt is empty; pass the question to ask about the document")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as exc:             # undecodable bytes arrive as lone surrogates
            raise GenerationError(f"the prompt is not valid UTF-8 (at character {exc.start}); pass UTF-8 text") from None
        ids = self.tokenizer.encode(self.bundle.prompt_text(question), add_special_tokens=False).ids
        return self.check_prompt(ids)

    def check_prompt(self, ids: Sequence[int]) -> list[int]:
        """The prompt's ids if they leave room for an answer in the bundle's new-token window."""
        if not ids:
            raise GenerationError("the prompt has no tokens; pass the question to ask about the document")
        if len(ids) >= self.window:
            raise GenerationError(f"the prompt takes {len(ids)} tokens with the bundle's template, but the bundle's "
                                  f"new-token window is {self.window} (prompt plus answer); shorten the prompt or "
                                  "re-export with a larger window")
        return [int(t) for t in ids]

    def stream(self, question: str, sampling: Sampling = Sampling()) -> Iterator[str]:
        """Yield the answer's text as it is produced; the full Result is `self.last` afterwards."""
        return self.stream_ids(self.prompt_ids(question), sampling)

    def stream_ids(self, prompt: Sequence[int], sampling: Sampling = Sampling(),
                   cancelled: Callable[[], bool] | None = None) -> Iterator[str]:
        """Like stream, from prompt token ids (already templated). `cancelled()`, when given, is asked before every
        one-token step; True ends the answer there with finish "cancelled" (a server's disconnect or timeout)."""
        prompt = self.check_prompt(prompt)
        return self._loop(prompt, sampling, cancelled)

    def _loop(self, prompt: list[int], sampling: Sampling,
              cancelled: Callable[[], bool] | None = None) -> Iterator[str]:
        """Prefill, then sample and feed one token per step until a stop token, the limit or the window."""
        result = self.last = Result(prompt_ids=prompt)
        limit = min(sampling.max_new_tokens, self.window - len(prompt) + 1)
        rng, text = sampling.rng(), TextStream(self.tokenizer)
        self.backend.reset(1)
        logits = finite(self.backend.step(np.array([prompt], dtype=np.int64)), 0)      # [1, V]
        result.prefill_ms = self.backend.last_step.ms
        while True:
            token = int(pick_next(logits, sampling, rng)[0])
            result.token_ids.append(token)
            if token in self.stop_ids:
                result.finish = "stop"
                break
            if delta := text.push(token):
                yield delta
            if len(result.token_ids) >= limit:
                result.finish = "length" if limit == sampling.max_new_tokens else "window"
                break
            if cancelled is not None and cancelled():
                result.finish = "cancelled"
                break
            logits = finite(self.backend.step(np.array([[token]], dtype=np.int64)), len(result.token_ids))
            result.token_ms.append(self.backend.last_step.ms)
        if tail := text.flush():
            yield tail
        result.text = text.tokenizer.decode(text.ids, skip_special_tokens=True)

    def generate(self, question: str, sampling: Sampling = Sampling(),
                 on_text: Callable[[str], None] | None = None) -> Result:
        """Answer one question; `on_text` receives text deltas as they are produced."""
        for delta in self.stream(question, sampling):
            if on_text is not None:
                on_text(delta)
        if self.last is None:
            raise NectarInternalError("the token loop ended without recording its result")
        return self.last


def forced_decode(backend: Backend, prompt: Sequence[int], tokens: Sequence[int]) -> Result:
    """Prefill `prompt`, then feed `tokens` one per step regardless of the logits (benchmarks: a fixed length)."""
    result = Result(prompt_ids=list(prompt), token_ids=list(tokens))
    backend.reset(1)
    backend.step(np.array([prompt], dtype=np.int64))
    result.prefill_ms = backend.last_step.ms
    for token in tokens:
        backend.step(np.array([[token]], dtype=np.int64))
        result.token_ms.append(backend.last_step.ms)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nectar_runtime",
                                     description="Answer a question about a bundle's document (torch-free runtime).")
    parser.add_argument("bundle")
    parser.add_argument("--pack", default=None, help="the document's pack, for a base bundle")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens)
    parser.add_argument("--backend", choices=BACKEND_NAMES, default="ort-cpu")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--no-hash-check", action="store_true",
                        help="skip the sha256 of the bundle's files at load (sizes are still checked)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Edge entry point: print the answer (streamed with --stream) and a timing line; errors as one line."""
    args = _parser().parse_args(argv)
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
        with Generator(args.bundle, args.backend, check_hashes=not args.no_hash_check, pack=args.pack) as generator:
            write = (lambda s: print(s, end="", flush=True)) if args.stream else None
            result = generator.generate(args.prompt, sampling, on_text=write)
            print("" if args.stream else result.text)
            print(result.timing_line(args.backend))
    except NectarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
