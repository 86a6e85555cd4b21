"""Fuzz pack.json as tests/runtime/test_fuzz_bundle.py fuzzes bundle.json: every node of a real pack's manifest
gets wrong types, bounds, huge numbers, paths out of the folder, nesting and removal, then the whole file is
damaged. Each mutated pack is loaded on the real base and asked one question: it must answer or raise one of the
runtime's NectarErrors with a one-line message, never another exception, without reading the file outside the
folder (its access time, set behind its modification time, would move) or changing the pack."""

from __future__ import annotations

import json
import os
import shutil
import time

from nectar_runtime.errors import NectarError
from nectar_runtime.generator import Generator
from nectar_runtime.pack import PACK_FILE, PACK_MANIFEST
from nectar_runtime.sampling import Sampling
from tests.helpers import dump, hostile_copy, mutations

CASE_SECONDS = 5.0


def _outcome(generator: Generator, pack) -> str:
    """'ok' after one answer, or the error's one line; another exception propagates (and fails the test)."""
    try:
        generator.use(generator.load_pack(pack))
        generator.generate("What is a list?", Sampling(max_new_tokens=2))
        return "ok"
    except NectarError as exc:
        message = str(exc)
        assert "\n" not in message and message, f"not one line: {message!r}"
        return f"error: {message}"


def _contents(folder) -> dict[str, bytes]:
    """The pack's own files but its manifest (the link to the file outside is not followed)."""
    return {p.name: p.read_bytes() for p in folder.iterdir()
            if p.is_file() and not p.is_symlink() and p.name != PACK_MANIFEST}


def test_every_mutation_of_pack_json_answers_or_is_refused_in_one_line(packs, tmp_path):
    copy, secret, paths = hostile_copy(packs["manual"], tmp_path, PACK_FILE)
    os.utime(secret, (1_000_000, 2_000_000))                 # atime behind mtime: any read moves it
    original = json.loads((copy / PACK_MANIFEST).read_text())
    before = _contents(copy)
    outcomes: dict[str, int] = {"ok": 0, "error": 0}
    with Generator(packs["base"], pack=packs["whole"]) as generator:
        cases = list(mutations(original, paths))
        for label, data in cases:
            (copy / PACK_MANIFEST).write_bytes(dump(data))
            start = time.perf_counter()
            outcome = _outcome(generator, copy)
            assert time.perf_counter() - start < CASE_SECONDS, label
            outcomes["ok" if outcome == "ok" else "error"] += 1
            generator.use(generator.load_pack(packs["whole"]))        # the next case starts from another pack
            if label.startswith(("files:", "layout/fingerprint", "n:", "widths")) and "removed" in label:
                assert outcome != "ok", label
    assert os.stat(secret).st_atime == 1_000_000, "a mutated pack.json made the runtime read outside its folder"
    assert _contents(copy) == before
    assert outcomes["ok"] and outcomes["error"] and sum(outcomes.values()) == len(cases) > 200
    shutil.rmtree(copy)
