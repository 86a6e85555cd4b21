"""`nectar-export build`: a TensorRT engine from a bundle's ONNX graph, added to the bundle."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nectar_export.errors import NectarError

def build_tensorrt(path: Path, profile_text: str | None = None, check_hashes: bool = True) -> dict[str, Any]:
    """Build model.plan with one optimization profile (batch, new tokens, past) and record it in bundle.json."""
    from nectar_graphs.files import check_writable
    from nectar_graphs.tensorrt import build_engine, default_profile, parse_profile
    from nectar_runtime.backends.tensorrt import INT4_REFUSED, STATIC_REFUSED
    from nectar_runtime.bundle import ENGINE_FILE, load_bundle

    bundle = load_bundle(path, check_hashes=check_hashes)
    manifest = bundle.manifest
    if bundle.kind == "base":
        raise NectarError(f"{bundle.path} is a base bundle: TensorRT engines are built for single-file bundles only "
                          "(their heads are weights of the engine); export the document as one with "
                          "`nectar-export export ARTIFACT`")
    if manifest.static:
        raise NectarError(STATIC_REFUSED.format(path=bundle.path))
    if manifest.precision == "int4":
        raise NectarError(INT4_REFUSED.format(path=bundle.path))
    check_writable(bundle.path)          # the engine goes into the bundle: refuse now, not after the build
    limits = {"batch": 1, "sequence": 128, "past": manifest.max_new_tokens}
    try:
        if profile_text:
            limits.update(parse_profile(profile_text))
        # the past starts with the cached tokens' KV (the whole context, or the exact tokens)
        profile = default_profile([s.to_json() for s in manifest.inputs], batch=limits["batch"],
                                  max_new_tokens=limits["past"], prompt_tokens=min(limits["sequence"], limits["past"]),
                                  cached_tokens=manifest.cached_tokens)
    except ValueError as exc:
        raise NectarError(f"--profile: {exc}") from None
    info = build_engine(bundle.onnx_path, bundle.path / ENGINE_FILE, profile)
    updated = dataclasses.replace(manifest, engines={**manifest.engines, "tensorrt": info})
    updated.with_files(bundle.path, [ENGINE_FILE]).save(bundle.path)
    return info
