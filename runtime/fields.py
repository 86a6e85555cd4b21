"""Manifest JSON: typed reads of an object, each failure raising the caller's error type and naming the file, the
key, what was found and what was expected; paths a manifest names, kept inside its folder; atomic writes
(bundle.json, nectar.json and heldout.json all go through this)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from nectar_runtime.errors import NectarError

MAX_PATH = 4096             # characters of a path a manifest names (PATH_MAX)
MAX_MANIFEST = 64 << 20      # bytes of a manifest file: real ones hold kilobytes (heldout.json: megabytes)


class Fields:
    """One JSON object of a manifest file; `where` names it in errors and `fix` says what to do about them."""

    def __init__(self, data: Any, where: str, error: type[NectarError] = NectarError, fix: str = ""):
        self.where, self.error, self.fix = where, error, fix
        if not isinstance(data, dict):
            raise self._error(f"{where} holds {type(data).__name__}, not a JSON object")
        self.data = data

    def _error(self, text: str) -> NectarError:
        return self.error(f"{text}; {self.fix}" if self.fix else text)

    def child(self, key: str, default: Any = ...) -> "Fields":
        """The object under `key`, read with the same error type."""
        return Fields(self.get(key, dict, default, "a JSON object"), f"{self.where} {key}", self.error, self.fix)

    def fail(self, key: str, expected: str) -> NectarError:
        return self._error(f"{self.where}: {key} is {repr(self.data.get(key))[:80]}, expected {expected}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., expected: str = "") -> Any:
        """data[key] if it is of `kind` (bools are not ints); `default` when absent, or an error without one."""
        if key not in self.data:
            if default is ...:
                raise self._error(f"{self.where} lacks {key}")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
            raise self.fail(key, expected or " or ".join(k.__name__ for k in _kinds(kind)))
        return value

    def count(self, key: str, low: int, high: int, default: Any = ...) -> int:
        """An integer within [low, high]."""
        expected = f"an integer in [{low}, {high}]"
        value = self.get(key, int, default, expected)
        if key in self.data and not low <= value <= high:
            raise self.fail(key, expected)
        return value

    def number(self, key: str, default: Any = ..., low: float = -math.inf, high: float = math.inf) -> float:
        """A finite number within [low, high] (an int too large for a float is refused too)."""
        expected = "a finite number" + (f" in [{low}, {high}]" if (low, high) != (-math.inf, math.inf) else "")
        value = self.get(key, (int, float), default, expected)
        try:
            number = float(value)
        except OverflowError:
            raise self.fail(key, expected) from None
        if not (math.isfinite(number) and low <= number <= high):
            raise self.fail(key, expected)
        return number

    def choice(self, key: str, allowed: tuple[str, ...], default: Any = ...) -> str:
        expected = f"one of {', '.join(allowed)}"
        value = self.get(key, str, default, expected)
        if value not in allowed:
            raise self.fail(key, expected)
        return value

    def ints(self, key: str, default: Any = ..., below: int | None = None) -> tuple[int, ...]:
        """A list of non-negative integers (token ids), each less than `below` when it is given."""
        expected = "a list of token ids" + (f" below {below}" if below is not None else "")
        values = self.get(key, list, default, expected)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < (below or v + 1) for v in values):
            raise self.fail(key, expected)
        return tuple(values)


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def path_inside(folder: Path, name: str, error: type[NectarError], kind: str) -> Path:
    """folder / name for a file a manifest names, refused (one `error` line) unless `name` is a plain relative path
    that stays inside the folder and no part of it is a symbolic link: a file we read never makes us read outside
    its folder."""
    relative = Path(name)
    if not name or len(name) > MAX_PATH or relative.is_absolute() or ".." in relative.parts or "\0" in name:
        raise error(f"{folder} names the file {name[:200]!r}, which is not a path inside the {kind} folder")
    target = folder
    for part in relative.parts:
        target = target / part
        try:
            link = target.is_symlink()
        except OSError as exc:               # a name part longer than the file system takes
            raise error(f"{folder} names the file {name[:200]!r}, which cannot be a file in it "
                        f"({(exc.strerror or str(exc)).lower()})") from None
        if link:
            raise error(f"{target} is a symbolic link; a {kind}'s files must be plain files inside its folder")
    return target


def read_json(file: Path, error: type[NectarError], fix: str, limit: int = MAX_MANIFEST) -> Any:
    """The JSON in `file`, or one `error` line: larger than `limit` bytes, not UTF-8, not JSON, nested deeper than
    the parser goes, or a number of more digits than Python converts."""
    size = file.stat().st_size
    if size > limit:
        raise error(f"{file} has {size:,} bytes, more than a manifest holds ({limit:,}); {fix}")
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{file} is not valid JSON ({str(exc)[:200]}); {fix}") from None


def write_json(file: Path, data: object) -> None:
    """Write JSON next to `file`, then rename it over `file` (readers never see half a manifest)."""
    tmp = file.with_name(f".{file.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, file)
    except OSError as exc:
        raise NectarError(f"cannot write {file}: {(exc.strerror or str(exc)).lower()}") from None
