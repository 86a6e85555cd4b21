"""The server's configuration: one frozen ServeConfig, built from the command line (argparse, torch-free) and
shared by `python -m nectar_runtime.serve` and `nectar-export serve`."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nectar_runtime.backends import BACKEND_NAMES
from nectar_runtime.errors import NectarError

MAX_QUEUE = 1 << 16
MAX_REPLICAS = 256


class ServeError(NectarError):
    """A server that cannot start as configured (bad flag, bundle, port); one `error:` line, exit 2."""


@dataclass(frozen=True)
class ServeConfig:
    """What to serve and how: model ids and their folders, the listening address, per-backend limits."""

    bundles: tuple[tuple[str, Path], ...] = ()     # --bundle NAME=BUNDLE: one worker each
    base: Path | None = None                       # --base BASE: one worker for every --pack
    packs: tuple[tuple[str, Path], ...] = ()       # --pack NAME=PACK
    host: str = "127.0.0.1"
    port: int = 8000                               # 0: any free port (the ready line names it)
    backend: str = "ort-cpu"
    threads: int | None = None                     # ONNX Runtime intra-op threads per worker (ort-cpu)
    check_hashes: bool = True
    queue: int = 16                                # requests waiting per backend, beside the one generating
    timeout_s: float = 300.0                       # per request, from arrival to its last token
    replicas: int = 0                              # 0: this process; N: N Ray Serve replicas
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        self._check_names()
        if self.packs and self.base is None:
            raise ServeError("--pack needs --base BASE: a pack runs on the base bundle it was made for")
        if self.base is not None and not self.packs:
            raise ServeError("--base needs at least one --pack NAME=PACK: a base bundle holds no document")
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port must be in 0..65535, got {self.port}")
        if self.backend not in BACKEND_NAMES:
            raise ServeError(f"unknown --backend {self.backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
        if self.threads is not None and (self.threads < 1 or self.backend != "ort-cpu"):
            raise ServeError(f"--threads must be >= 1 and is for --backend ort-cpu, got {self.threads} "
                             f"with {self.backend}")
        if not 0 <= self.queue <= MAX_QUEUE:
            raise ServeError(f"--queue must be in 0..{MAX_QUEUE} (waiting requests per backend), got {self.queue}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ServeError(f"--timeout must be a number of seconds > 0, got {self.timeout_s}")
        if not 0 <= self.replicas <= MAX_REPLICAS:
            raise ServeError(f"--replicas must be in 0..{MAX_REPLICAS}, got {self.replicas}")

    def _check_names(self) -> None:
        names = [name for name, _ in (*self.bundles, *self.packs)]
        if not names:
            raise ServeError("nothing to serve: pass --bundle NAME=BUNDLE, or --base BASE with --pack NAME=PACK")
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ServeError(f"model ids must be unique; given more than once: {', '.join(twice)}")

    @property
    def model_ids(self) -> list[str]:
        return [name for name, _ in (*self.bundles, *self.packs)]

    @property
    def backend_options(self) -> dict[str, int]:
        return {"threads": self.threads} if self.threads else {}


def named_path(text: str) -> tuple[str, Path]:
    """NAME=PATH from the command line: the model id and its folder."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    if not all(c.isalnum() or c in "-_.:/" for c in name) or len(name) > 128:
        raise argparse.ArgumentTypeError(f"a model id is 1-128 letters, digits and -_.:/ only, got {name!r}")
    return name, Path(path).expanduser()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The server's flags, on `parser`."""
    parser.add_argument("--bundle", action="append", type=named_path, default=[], metavar="NAME=BUNDLE",
                        help="serve a single-file bundle as model id NAME (repeatable; one worker each)")
    parser.add_argument("--base", type=Path, default=None, help="a base bundle for the --pack documents")
    parser.add_argument("--pack", action="append", type=named_path, default=[], metavar="NAME=PACK",
                        help="serve a pack on --base as model id NAME (repeatable; one worker for all)")
    parser.add_argument("--host", default=ServeConfig.host)
    parser.add_argument("--port", type=int, default=ServeConfig.port, help="0 picks a free port")
    parser.add_argument("--backend", choices=BACKEND_NAMES, default=ServeConfig.backend)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per worker (ort-cpu)")
    parser.add_argument("--queue", type=int, default=ServeConfig.queue,
                        help="requests waiting per backend beside the one generating; more get 429")
    parser.add_argument("--timeout", type=float, default=ServeConfig.timeout_s,
                        help="seconds a request may take, queue included; then 504 (or an error event)")
    parser.add_argument("--replicas", type=int, default=0,
                        help="run N replicas on a local Ray Serve (needs ray[serve]); 0 serves in this process")
    parser.add_argument("--no-hash-check", action="store_true",
                        help="skip the sha256 of the bundles' files at load (sizes and paths are still checked)")
    return parser


def parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog="python -m nectar_runtime.serve",
        description="Serve bundles and packs over an OpenAI-compatible HTTP API (torch-free)."))


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The frozen config of parsed flags (ServeError when they do not fit together)."""
    return ServeConfig(bundles=tuple(args.bundle), base=args.base, packs=tuple(args.pack), host=args.host,
                       port=args.port, backend=args.backend, threads=args.threads,
                       check_hashes=not args.no_hash_check, queue=args.queue, timeout_s=args.timeout,
                       replicas=args.replicas)


def parse_config(argv: Sequence[str] | None = None) -> ServeConfig:
    return config_from_args(parser().parse_args(argv))
