"""Model ids: what `GET /v1/models` lists and a request's `model` names. Each is an Entry: the worker that
answers it, the pack to bind (None for a single-file bundle), and the bundle whose question template and
new-token window its prompts take.

    --bundle NAME=BUNDLE            one Generator and one worker per bundle
    --base BASE --pack NAME=PACK    one Generator on the base and one worker for all its packs, the first bound
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nectar_runtime.bundle import Bundle
from nectar_runtime.errors import NectarError
from nectar_runtime.generator import Generator
from nectar_runtime.serve.config import ServeConfig, ServeError
from nectar_runtime.serve.metrics import Metrics
from nectar_runtime.serve.workers import Worker


class PromptTooLong(ValueError):
    """A prompt that leaves no room for an answer in its document's new-token window."""


@dataclass(frozen=True)
class Entry:
    """One model id: its worker, its pack (None: a single-file bundle), and the bundle its prompts are built for."""

    name: str
    worker: Worker
    pack: Any | None
    bundle: Bundle

    @property
    def window(self) -> int:
        return self.bundle.manifest.max_new_tokens

    @property
    def kind(self) -> str:
        return "pack" if self.pack is not None else self.bundle.manifest.kind

    def prompt_ids(self, question: str) -> list[int]:
        """The question inside this document's template, as token ids; PromptTooLong when it fills the window."""
        text = self.bundle.prompt_text(question)
        ids = self.worker.generator.tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) >= self.window:
            raise PromptTooLong(f"the prompt takes {len(ids)} tokens with {self.name}'s template, but its new-token "
                                f"window is {self.window} (prompt plus answer); shorten the question")
        return [int(t) for t in ids]


def load_entries(config: ServeConfig, metrics: Metrics) -> dict[str, Entry]:
    """Every model id of the config, its generator loaded (not started); ServeError naming the one that failed."""
    entries: dict[str, Entry] = {}
    try:
        for name, path in config.bundles:
            generator = _generator(config, name, path)
            entries[name] = Entry(name, Worker(name, generator, config.queue, metrics), None, generator.bundle)
        if config.base is not None:
            entries.update(load_packs(config, metrics))
    except BaseException:
        close(entries)
        raise
    return entries


def _generator(config: ServeConfig, name: str, path: Any, **pack: Any) -> Generator:
    try:
        return Generator(path, config.backend, check_hashes=config.check_hashes, **pack, **config.backend_options)
    except NectarError as exc:
        raise ServeError(f"cannot load {name} ({path}): {exc}") from None


def load_packs(config: ServeConfig, metrics: Metrics) -> dict[str, Entry]:
    """One Generator on the base with the first pack bound, every other pack loaded and checked against the base
    (BundleError), one worker for them all."""
    from nectar_runtime.pack import resolve                  # the base's Bundle with a pack's numbers

    first_name, first_path = config.packs[0]
    generator = _generator(config, first_name, config.base, pack=first_path)
    worker = Worker(f"base:{config.base.name}", generator, config.queue, metrics)
    entries: dict[str, Entry] = {}
    try:
        for name, path in config.packs:
            pack = generator.pack if name == first_name else _pack(generator, name, path)
            entries[name] = Entry(name, worker, pack, resolve(generator.base, pack))
    except BaseException:
        generator.close()
        raise
    return entries


def _pack(generator: Generator, name: str, path: Any) -> Any:
    try:
        return generator.load_pack(path)                    # checked against the base (BundleError)
    except NectarError as exc:
        raise ServeError(f"cannot load pack {name} ({path}): {exc}") from None


def workers(entries: dict[str, Entry]) -> list[Worker]:
    """The distinct workers behind the entries, in the order they first appear."""
    return list({id(e.worker): e.worker for e in entries.values()}.values())


def close(entries: dict[str, Entry]) -> None:
    """Stop every worker (the running request ends, waiting ones fail) and release its session."""
    for worker in workers(entries):
        worker.stop()
