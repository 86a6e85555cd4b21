"""TensorRT engine build from the step graph's ONNX file (TensorRT 11 Python API, strongly typed).

TensorRT 11 removed weak typing: every network is strongly typed, so each tensor's precision is the
one the ONNX graph gives it (the precision pass decides fp16/bf16/fp32, not builder flags). On
TensorRT 10.12-10.x the STRONGLY_TYPED creation flag asks for the same; TensorRT 11 accepts and
ignores it, so it is set whenever the enum has it.

Unverified here: TensorRT is served only from NVIDIA's package index, which the build machines do
not reach. `tensorrt` is imported inside `build_engine`, so this module imports anywhere.

Profile axes (bundle input shapes name them): B batch, T new tokens this call ("sequence"),
P past tokens ("past_sequence"), P + T ("total_sequence", the attention mask's length).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nectar_runtime.errors import NectarError

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]

AXES = ("batch", "sequence", "past_sequence", "total_sequence")
PROFILE_KEYS = {"batch": "largest batch", "sequence": "typical tokens per call (the prompt; opt shape)",
                "past": "largest number of new tokens (the window, max_new_tokens)"}
INSTALL = ("pip install tensorrt (from NVIDIA's index, https://pypi.nvidia.com; "
           "`pip install --extra-index-url https://pypi.nvidia.com tensorrt`) on a machine with an NVIDIA GPU")


class TensorRTError(NectarError):
    """TensorRT absent, or an ONNX file or profile that TensorRT cannot turn into an engine."""


def _import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise TensorRTError(f"TensorRT is not installed: {INSTALL}") from None
    return tensorrt


def _network_flags(trt: Any) -> int:
    """Creation flags for a strongly typed network (required on 10.12-10.x, implied and ignored on 11)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> None:
    """Parse the ONNX file into the network; parse_from_file finds external data beside the file."""
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(errors)} error(s)):\n  "
                            + "\n  ".join(errors or ["(no parser error recorded)"])
                            + "\nrun nectar_graphs.lint on the graph to see unsupported or restricted ops")


def _add_profile(builder: Any, network: Any, config: Any, profile: Profile) -> None:
    """One optimization profile with (min, opt, max) for every input that has a dynamic dimension."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unknown = sorted(set(profile) - set(inputs))
    if unknown:
        raise TensorRTError(f"profile names {unknown}, which are not inputs of the network {sorted(inputs)}")
    opt_profile = builder.create_optimization_profile()
    for name, dims in inputs.items():
        if name not in profile:
            if any(d < 0 for d in dims):
                raise TensorRTError(f"input {name} has dynamic shape {list(dims)} but the profile gives it no "
                                    "(min, opt, max); see default_profile")
            continue
        low, opt, high = (tuple(int(d) for d in shape) for shape in profile[name])
        if not all(len(s) == len(dims) for s in (low, opt, high)):
            raise TensorRTError(f"profile for {name} has rank {len(low)}, the input has rank {len(dims)}")
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise TensorRTError(f"profile for {name} needs min <= opt <= max per axis, got {low}, {opt}, {high}")
        opt_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(opt_profile)


def _write_atomic(data: Any, path: Path) -> None:
    """Write bytes-like data to path through a temp file in the same folder, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)   # IHostMemory supports the buffer protocol
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_engine(onnx_path: Path, engine_path: Path, profile: Profile, workspace_bytes: int | None = None,
                 log: Callable[[str], Any] = print) -> dict:
    """Build a strongly typed TensorRT engine from an ONNX file and write it atomically; return its manifest entry."""
    trt = _import_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise TensorRTError(f"{onnx_path} does not exist; export the bundle first (`nectar-export export`)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    _parse(trt, network, logger, onnx_path)
    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    _add_profile(builder, network, config, profile)
    log(f"TensorRT {trt.__version__}: building {engine_path.name} from {onnx_path.name} (minutes for a large graph)")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise TensorRTError(f"TensorRT could not build an engine from {onnx_path}; the TensorRT log above says why "
                            "(often: not enough GPU memory or workspace, or a layer with no kernel for its types)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(serialized, engine_path)
    log(f"wrote {engine_path} ({engine_path.stat().st_size / 2**20:.1f} MiB) in {seconds:.1f} s")
    return {"file": engine_path.name,
            "profile": {name: [list(map(int, shape)) for shape in shapes] for name, shapes in profile.items()},
            "tensorrt_version": trt.__version__, "build_seconds": round(seconds, 3)}


def _axis_ranges(batch: int, max_new_tokens: int, prompt_tokens: int, cached_tokens: int) -> dict[str, Shape]:
    """(min, opt, max) per named axis, such that every (P, T) a run can reach lies inside the box."""
    seq_opt = min(max(prompt_tokens, 1), max_new_tokens)
    past_opt = min(max_new_tokens // 2, max_new_tokens - seq_opt)
    c = cached_tokens
    return {"batch": (1, 1, batch),
            "sequence": (1, seq_opt, max_new_tokens),
            "past_sequence": (c, c + past_opt, c + max_new_tokens - 1),
            "total_sequence": (c + 1, c + past_opt + seq_opt, c + max_new_tokens)}


def default_profile(inputs: list[dict], batch: int = 1, *, max_new_tokens: int, prompt_tokens: int,
                    cached_tokens: int = 0) -> Profile:
    """(min, opt, max) shapes for every bundle input with a named axis.

    A sequence makes calls with T >= 1 new tokens on top of P earlier ones, and P + T never exceeds the
    window: P + T <= max_new_tokens. So T in [1, max_new_tokens], P in [0, max_new_tokens - 1] and the
    mask length P + T in [1, max_new_tokens]. Opt shapes satisfy total = past + sequence: a prompt of
    `prompt_tokens` after min(max_new_tokens // 2, max_new_tokens - prompt_tokens) earlier tokens.
    A bundle's past starts with its cached tokens (the whole context of a full bundle, the exact tokens of
    a Nectar one): pass cached_tokens and past and total shift by it. Integer dimensions are kept as they
    are (min = opt = max).
    """
    if batch < 1 or max_new_tokens < 1 or cached_tokens < 0:
        raise ValueError(f"need batch >= 1, max_new_tokens >= 1, cached_tokens >= 0; got {batch}, "
                         f"{max_new_tokens}, {cached_tokens}")
    ranges = _axis_ranges(batch, max_new_tokens, prompt_tokens, cached_tokens)
    profile: Profile = {}
    for spec in inputs:
        shape = spec["shape"]
        if all(isinstance(d, int) for d in shape):
            continue
        unknown = [d for d in shape if not isinstance(d, int) and d not in ranges]
        if unknown:
            raise ValueError(f"input {spec['name']} has axis names {unknown}; known axes are {list(AXES)}")
        dims = [(d, d, d) if isinstance(d, int) else ranges[d] for d in shape]
        profile[spec["name"]] = tuple(tuple(dim[k] for dim in dims) for k in range(3))   # (min, opt, max)
    return profile


def parse_profile(text: str) -> dict[str, int]:
    """Parse a CLI profile flag such as "batch=1,sequence=128,past=512" into {key: positive int}."""
    allowed = ", ".join(f"{key} ({meaning})" for key, meaning in PROFILE_KEYS.items())
    result: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"([a-z_]+)\s*=\s*(\d+)", part)
        if not match:
            raise ValueError(f"bad profile item {part!r} in {text!r}: expected key=integer items separated by "
                             f"commas, e.g. batch=1,sequence=128,past=512")
        key, value = match.group(1), int(match.group(2))
        if key not in PROFILE_KEYS:
            raise ValueError(f"unknown profile key {key!r}; known keys: {allowed}")
        if key in result:
            raise ValueError(f"profile key {key!r} is given twice in {text!r}")
        if value < 1:
            raise ValueError(f"profile value {key}={value} must be at least 1")
        result[key] = value
    return result
