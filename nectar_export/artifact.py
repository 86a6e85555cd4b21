"""The fitted artifact: nectar.safetensors + nectar.json (+ ablation heads), written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nectar_export import __version__
from nectar_export.errors import NectarError
from nectar_export.heads import MLPPair, Pair, QuadraturePair
from nectar_graphs.files import staged_folder, write_json

FORMAT = "nectar-artifact/1"
MANIFEST = "nectar.json"
WEIGHTS = "nectar.safetensors"


@dataclass
class Artifact:
    """A loaded artifact: its manifest and the heads of each variant ('nectar' and any ablations)."""

    path: Path
    manifest: dict[str, Any]
    heads: dict[str, list[Pair]]

    @property
    def n(self) -> int:
        return int(self.manifest["context"]["n"])

    @property
    def exact_tokens(self) -> tuple[int, int]:
        """(sinks, window): context tokens kept as exact KV at the start and at the end."""
        ctx = self.manifest["context"]
        return int(ctx["sinks"]), int(ctx["window"])


def pair_shape(pair: Pair) -> dict[str, Any]:
    if isinstance(pair, QuadraturePair):
        return {"family": "quadrature", "slots": pair.slots}
    return {"family": "mlp", "target_hidden": pair.target_hidden, "score_hidden": pair.score_hidden}


def _make_pair(shape: dict[str, Any], heads: int, dim: int) -> Pair:
    if shape["family"] == "quadrature":
        return QuadraturePair(heads, dim, shape["slots"])
    return MLPPair(heads, dim, shape["target_hidden"], shape["score_hidden"])


def _tensors(pairs: list[Pair]) -> dict[str, torch.Tensor]:
    return {f"layers.{i}.{k}": v.detach().contiguous() for i, p in enumerate(pairs) for k, v in p.state_dict().items()}


def _weights_file(variant: str) -> str:
    return WEIGHTS if variant == "nectar" else f"ablations/{variant}.safetensors"


def check_output(out: Path) -> None:
    """Refuse to replace anything but an empty folder or an earlier artifact (checked before any work)."""
    out = out.expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise NectarError(f"{out} exists and is not a Nectar artifact; choose an empty or new -o folder")


def save_artifact(out: Path, manifest: dict[str, Any], heads: dict[str, list[Pair]],
                  extra: dict[str, str] | None = None) -> None:
    """Write every variant's weights and the manifest into a temp folder, then move it into place."""
    from safetensors.torch import save_file

    out = out.expanduser()
    check_output(out)
    manifest = dict(manifest, format=FORMAT, code_version=__version__,
                    variants={v: {"file": _weights_file(v), "layers": [pair_shape(p) for p in pairs]}
                              for v, pairs in heads.items()})
    with staged_folder(out) as tmp:
        for variant, pairs in heads.items():
            target = tmp / _weights_file(variant)
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file(_tensors(pairs), str(target), metadata={"format": FORMAT, "variant": variant})
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def update_manifest(path: Path, key: str, value: Any) -> None:
    """Set one top-level manifest entry (e.g. measured metrics), atomically."""
    file = path / MANIFEST
    write_json(file, dict(json.loads(file.read_text()), **{key: value}))


def read_manifest(path: Path) -> dict[str, Any]:
    file = Path(path).expanduser() / MANIFEST
    if not file.is_file():
        raise NectarError(f"{path} is not a Nectar artifact (no {MANIFEST}); create one with `nectar-export fit`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise NectarError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if manifest.get("format") != FORMAT:
        raise NectarError(f"{file} has format {manifest.get('format')!r}; this version reads {FORMAT!r}")
    return manifest


def check_compatible(manifest: dict[str, Any], model_fingerprint: str, context_sha: str | None = None) -> None:
    """Refuse an artifact fitted for another model or another context, naming both fingerprints."""
    want = manifest["model"]["fingerprint"]
    if want != model_fingerprint:
        raise NectarError(f"artifact was fitted for model {want[:16]}, but the loaded model is "
                          f"{model_fingerprint[:16]}; pass the model it was fitted with")
    if context_sha is not None and context_sha != manifest["context"]["sha256"]:
        raise NectarError(f"artifact was fitted for context {manifest['context']['sha256'][:16]}, but this "
                          f"context is {context_sha[:16]}; refit for the new document")


def load_artifact(path: Path, model_fingerprint: str, context_sha: str | None = None) -> Artifact:
    """Read an artifact's manifest and heads after checking it belongs to this model (and context)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    check_compatible(manifest, model_fingerprint, context_sha)
    heads_per_layer, dim = manifest["model"]["kv_heads"], manifest["model"]["head_dim"]
    heads: dict[str, list[Pair]] = {}
    for variant, spec in manifest["variants"].items():
        try:
            tensors = load_file(str(path / spec["file"]))
        except (FileNotFoundError, SafetensorError, OSError) as exc:
            raise NectarError(f"cannot read {path / spec['file']}: {exc}") from None
        pairs = []
        for i, shape in enumerate(spec["layers"]):
            pair = _make_pair(shape, heads_per_layer, dim)
            prefix = f"layers.{i}."
            pair.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            pairs.append(pair.eval())
        heads[variant] = pairs
    return Artifact(path=path, manifest=manifest, heads=heads)
