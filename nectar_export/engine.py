"""`nectar-export build`: a TensorRT engine from a bundle's ONNX graph, added to the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nectar_export.errors import NectarError


def build_tensorrt(path: Path, profile_text: str | None = None) -> dict[str, Any]:
    """Build model.plan with one optimization profile (batch, new tokens, past) and record it in bundle.json."""
    from nectar_graphs.bundle_writer import update_bundle_manifest
    from nectar_graphs.tensorrt import build_engine, default_profile, parse_profile
    from nectar_runtime.bundle import ENGINE_FILE, load_bundle

    bundle = load_bundle(path, check_hashes=True)
    limits = {"batch": 1, "sequence": 128, "past": bundle["max_new_tokens"]}
    if profile_text:
        try:
            limits.update(parse_profile(profile_text))
        except ValueError as exc:
            raise NectarError(f"--profile: {exc}") from None
    context = bundle.context_tokens        # the past starts with the context's (or the exact tokens') KV
    try:
        profile = default_profile(bundle["inputs"], batch=limits["batch"], max_new_tokens=limits["past"],
                                  prompt_tokens=min(limits["sequence"], limits["past"]), context_tokens=context)
    except ValueError as exc:
        raise NectarError(f"--profile: {exc}") from None
    info = build_engine(bundle.onnx_path, bundle.path / ENGINE_FILE, profile)
    engines = dict(bundle.manifest.get("engines", {}), tensorrt=info)
    update_bundle_manifest(bundle.path, "engines", engines, files=[ENGINE_FILE])
    return info
