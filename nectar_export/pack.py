"""`nectar-export pack`: an artifact's document as a pack for a base bundle (format in nectar_runtime.pack).

A pack holds what the document adds to the base model: every layer's fitted joint weights (the runtime builds the
three-product form the base's inputs take from them, nectar_runtime.heads; the weights rounded to the base's
precision as export rounds its initializers, the biases float32) and the exact tokens' KV, prefilled by the model. It is refused before any work when the base is of another model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nectar_export import __version__
from nectar_export.errors import NectarError, NectarInternalError
from nectar_runtime.bundle import Bundle, Source, load_bundle
from nectar_runtime.heads import JOINT_NAMES, carried_width
from nectar_runtime.pack import (PACK_FILE, PACK_MANIFEST, PAIR_TEMPLATE, Layout, Pack, PackManifest,
                                 pack_tensors_problem, pair_names, resolve)

OWNED = (PACK_MANIFEST, PACK_FILE)


@dataclass(frozen=True)
class PackConfig:
    artifact: Path
    base: Path
    output: Path
    variant: str = "nectar"
    model: str | None = None        # override the artifact's recorded model source
    device: str = "cpu"             # where the exact tokens are prefilled
    overwrite: bool = False
    check_hashes: bool = True       # the base's files


def run_pack(config: PackConfig) -> PackManifest:
    """Write the pack for an artifact and a base bundle; returns its manifest."""
    from nectar_graphs.files import check_output_folder, writing

    base = load_bundle(config.base, check_hashes=config.check_hashes)
    if base.kind != "base":
        raise NectarError(f"{base.path} is a single-file {base.kind} bundle; a pack needs a base bundle "
                          "(`nectar-export export ARTIFACT --base -o BASE`)")
    with writing(config.output):
        check_output_folder(config.output, PACK_MANIFEST, OWNED, config.overwrite, "pack")
        manifest, tensors = pack_contents(config, base)
        return write_pack(config.output, manifest, tensors, base)


def pack_contents(config: PackConfig, base: Bundle) -> tuple[PackManifest, dict[str, np.ndarray]]:
    """The pack's manifest (without files) and its tensors: heads in the base's type, exact tokens' KV."""
    from nectar_export.artifact import load_artifact, read_manifest
    from nectar_export.export import _context_kv, check_joint, context_cache
    from nectar_export.models import check_device, load_model

    recorded = read_manifest(config.artifact)
    loaded = load_model(config.model or recorded.model.source)
    want = base.manifest.source.model_fingerprint if base.manifest.source else ""
    if loaded.fingerprint != want:
        raise NectarError(f"the artifact's model {recorded.model.source} (fingerprint {loaded.fingerprint[:12]}) is "
                          f"not the model of base {base.path} (fingerprint {want[:12]}); export a base from an "
                          "artifact of this model")
    artifact = load_artifact(config.artifact, loaded.fingerprint)
    if config.variant not in artifact.heads:
        raise NectarError(f"artifact has no variant {config.variant!r}; it has {', '.join(artifact.heads)}")
    pairs = artifact.heads[config.variant]
    check_joint(pairs, config.variant)
    tensors = head_tensors(pairs, base)
    cache = context_cache(loaded.model, artifact.heldout().context_ids, check_device(config.device),
                          exact=artifact.exact_sets())
    if cache.n:
        tensors.update(_context_kv(cache, base.manifest.kv_dtype))
    source = Source(artifact=str(Path(config.artifact).expanduser().resolve()), model_source=recorded.model.source,
                    model_fingerprint=loaded.fingerprint, context_sha256=recorded.context.sha256,
                    variant=config.variant, code_version=__version__)
    widths = tuple(carried_width(tuple(tensors[PAIR_TEMPLATE.format(layer=i, name="w1")].shape))
                   for i in range(len(pairs)))
    manifest = PackManifest(layout=Layout.of(base.manifest), n=artifact.n, first_position=artifact.n,
                            max_new_tokens=recorded.max_new_tokens, cached_tokens=cache.n,
                            question_template=recorded.context.question_template, widths=widths, source=source)
    return manifest, tensors


def head_tensors(pairs: list[Any], base: Bundle) -> dict[str, np.ndarray]:
    """Every layer's joint weights (JOINT_NAMES): w1, w2, w3 rounded to the base's type, the biases float32.

    The carried form copies the weights (negated at most) and divides the biases by silu(CARRIER), so weights
    rounded first and biases rounded after that division give the single-file bundle's values exactly."""
    from nectar_graphs.passes import lower_array
    from nectar_runtime.backends.ort import kv_numpy_dtype

    if len(pairs) != base.manifest.layers:
        raise NectarError(f"the artifact has heads for {len(pairs)} layers, base {base.path} has "
                          f"{base.manifest.layers}")
    dtype = kv_numpy_dtype(base.manifest.kv_dtype)
    names = iter(pair_names(len(pairs)))
    tensors = {}
    for pair in pairs:
        for kind, weight in zip(JOINT_NAMES, pair.joint_weights()):
            array = np.ascontiguousarray(weight.detach().float().cpu().numpy())
            tensors[next(names)] = array if kind.startswith("b") else lower_array(array, dtype)
    return tensors


def write_pack(out: Path, manifest: PackManifest, tensors: dict[str, np.ndarray], base: Bundle) -> PackManifest:
    """Check the tensors against the base, then write pack.safetensors and pack.json into a staged folder."""
    import dataclasses

    from safetensors.numpy import save_file

    from nectar_graphs.files import staged_folder
    from nectar_runtime.bundle import FileEntry

    stand_in = resolve(base, Pack(path=Path(out), manifest=manifest))
    if (problem := pack_tensors_problem(stand_in, tensors)) is not None:
        raise NectarInternalError(f"the pack's tensors do not fit the base: {problem}")
    with staged_folder(Path(out).expanduser()) as tmp:
        save_file(tensors, str(tmp / PACK_FILE))
        os.chmod(tmp / PACK_FILE, 0o644)                 # safetensors creates it owner-only
        manifest = dataclasses.replace(manifest, files={PACK_FILE: FileEntry.of(tmp / PACK_FILE)})
        manifest.save(tmp)
    return manifest
