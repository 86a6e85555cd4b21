"""Document packs: one document's Nectar heads and exact tokens' KV, run on a shared base bundle.

A base bundle (`nectar-export export ARTIFACT --base`, kind "base") is the Nectar step graph with no document
inside: each layer's heads are graph inputs instead of initializers (HEAD_TEMPLATES; their hidden width is an axis,
`nectar_width.{layer}`, so heads of any size fit). A pack (`nectar-export pack ARTIFACT --base BASE`) is what one
document adds, a few megabytes beside a base of hundreds:

    pack.json            the manifest (fields below)
    pack.safetensors     each layer's fitted joint weights, `nectar_pair.{layer}.{w1,b1,w2,b2,w3,b3}`
                         (nectar_runtime.heads; w1, w2, w3 in the base's float type, the biases in float32),
                         and the exact tokens' KV [1, Hkv, C, D] named as the past inputs (absent when
                         cached_tokens is 0)

A pack stores the joint weights, not the carried form the base's head inputs take (about 4x larger, most of it
zeros and identities): `pack_heads` builds that form at load with nectar_runtime.heads.carried, the function
export builds a single-file bundle's heads with, so the inputs are bit for bit that bundle's initializers (the
weights are only copied into the carried form, and the biases, which it divides, stay float32 until then).

pack.json, format "nectar-pack/2" (format 1, which stored the carried form, is refused: re-make the pack):

    layout            the base layout it fits (`layout_fingerprint` of the base's manifest) and, for messages, the
                      model fingerprint and precision it stands for
    n, first_position, max_new_tokens, cached_tokens, template {"question"}: as in bundle.json, for this document
    widths            each layer's head width (the `nectar_width.{layer}` axis)
    source            as in bundle.json (artifact, model, context sha256, variant, code version)
    files             {"pack.safetensors": {"bytes", "sha256"}}

`resolve(base, pack)` gives the Bundle a backend runs: the base's graph and files with the pack's numbers, so the
backends treat a base with a pack as they treat a single-file bundle and switch packs without a new session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nectar_runtime.bundle import (HEAD_PREFIX, HEAD_TEMPLATES, MAX_TOKENS, Bundle, BundleManifest,
                                   FileEntry, Source, _files, _source, check_listed_files, inside, past_names,
                                   template_problem)
from nectar_runtime.errors import BundleError
from nectar_runtime.fields import read_json, write_json
from nectar_runtime.heads import JOINT_NAMES, carried, carried_width, joint_problem

PACK_FORMAT = "nectar-pack/2"
PACK_MANIFEST = "pack.json"
PACK_FILE = "pack.safetensors"
PAIR_TEMPLATE = "nectar_pair.{layer}.{name}"           # a layer's joint weight in pack.safetensors (JOINT_NAMES)
# what the base's head inputs mean: JointPair's carried three-product form (graphs/step.py); a change of that
# form changes every layout fingerprint, so no pack of the old form runs on a new base
HEADS_FORMAT = "joint-mlp/1"
MAX_WIDTH = 1 << 20


def layout_fingerprint(base: BundleManifest) -> str:
    """What a pack must match to run on this base: the model, the precision, the KV's shape and the head inputs'
    names, types and shapes (axes by name), and the heads' form."""
    heads = [s.to_json() for s in base.inputs if s.name.startswith(HEAD_PREFIX)]
    model = base.source.model_fingerprint if base.source else ""
    key = {"heads_format": HEADS_FORMAT, "model": model, "precision": base.precision, "kv_dtype": base.kv_dtype,
           "layers": base.layers, "kv_heads": base.kv_heads, "head_dim": base.head_dim,
           "vocab_size": base.vocab_size, "heads": heads}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Layout:
    """The base layout a pack was made for, and what it stands for (messages name both sides)."""

    fingerprint: str
    model_fingerprint: str
    precision: str

    @classmethod
    def of(cls, base: BundleManifest) -> "Layout":
        return cls(layout_fingerprint(base), base.source.model_fingerprint if base.source else "", base.precision)

    def describe(self) -> str:
        return f"layout {self.fingerprint} (model {self.model_fingerprint[:12]}, {self.precision})"


@dataclass(frozen=True)
class PackManifest:
    """pack.json, typed and validated (fields in the module docstring)."""

    layout: Layout
    n: int
    first_position: int
    max_new_tokens: int
    cached_tokens: int
    question_template: str
    widths: tuple[int, ...]
    source: Source | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": PACK_FORMAT, "layout": dataclasses.asdict(self.layout), "n": self.n,
                "first_position": self.first_position, "max_new_tokens": self.max_new_tokens,
                "cached_tokens": self.cached_tokens, "template": {"question": self.question_template},
                "widths": list(self.widths), "source": None if self.source is None else dataclasses.asdict(self.source),
                "files": {k: dataclasses.asdict(v) for k, v in self.files.items()}}

    @classmethod
    def from_json(cls, data: Any, where: str = PACK_MANIFEST) -> "PackManifest":
        """Validate every field a reader uses; BundleError names the first bad one."""
        r = _pack_fields(data, where)
        if data.get("format") != PACK_FORMAT:
            raise BundleError(f"{where} has format {data.get('format')!r:.60}; this runtime reads {PACK_FORMAT}: "
                              "re-make the pack with `nectar-export pack`")
        layout = r.child("layout")
        n = r.count("n", 1, MAX_TOKENS)
        template = r.child("template").get("question", str)
        if (problem := template_problem(template)) is not None:
            raise BundleError(f"{where}: the question template is refused: {problem}; re-make the pack")
        widths = r.get("widths", list, expected="a list of head widths")
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_WIDTH for w in widths):
            raise r.fail("widths", f"a list of head widths in [1, {MAX_WIDTH}]")
        files = _files(r)
        if PACK_FILE not in files:
            raise r.fail("files", f"an entry for {PACK_FILE}")
        return cls(layout=Layout(layout.get("fingerprint", str), layout.get("model_fingerprint", str),
                                 layout.get("precision", str)),
                   n=n, first_position=r.count("first_position", n, n), max_new_tokens=r.count("max_new_tokens", 1,
                                                                                             MAX_TOKENS),
                   cached_tokens=r.count("cached_tokens", 0, n), question_template=template, widths=tuple(widths),
                   source=_source(r), files=files)

    def save(self, folder: Path) -> None:
        write_json(folder / PACK_MANIFEST, self.to_json())


def _pack_fields(data: Any, where: str) -> Any:
    """A manifest reader whose errors say to re-make the pack."""
    from nectar_runtime.fields import Fields

    return Fields(data, where, BundleError, "re-make the pack with `nectar-export pack`")


@dataclass(frozen=True)
class Pack:
    """A validated pack folder and its manifest."""

    path: Path
    manifest: PackManifest

    @property
    def file(self) -> Path:
        return self.path / PACK_FILE

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def key(self) -> tuple[str, str]:
        """What a backend keeps a loaded pack's state under: its folder and its whole manifest (a pack re-made or
        edited in place is another pack)."""
        return str(self.path), hashlib.sha256(json.dumps(self.manifest.to_json(), sort_keys=True).encode()).hexdigest()


def load_pack(path: str | Path, check_hashes: bool = True) -> Pack:
    """Read pack.json and check its file: inside the folder, its size, and its sha256 unless `check_hashes` is False."""
    path = Path(path).expanduser()
    file = path / PACK_MANIFEST
    if not file.is_file():
        raise BundleError(f"{path} is not a pack (no {PACK_MANIFEST}); create one with `nectar-export pack`")
    file = inside(path, PACK_MANIFEST)
    manifest = PackManifest.from_json(read_json(file, BundleError, "re-make the pack"), str(file))
    check_listed_files(path, manifest.files, check_hashes, "pack", PACK_MANIFEST, "re-make the pack")
    return Pack(path=path, manifest=manifest)


def check_pack(base: Bundle, pack: Pack) -> None:
    """Refuse a pack made for another base layout (another model, precision or head form), naming both."""
    if base.kind != "base":
        raise BundleError(f"{base.path} is a single-file {base.kind} bundle; packs run on a base bundle "
                          "(`nectar-export export ARTIFACT --base`)")
    want, got = Layout.of(base.manifest), pack.manifest.layout
    if got.fingerprint != want.fingerprint:
        raise BundleError(f"pack {pack.path} was made for {got.describe()}, but base {base.path} has "
                          f"{want.describe()}; make the pack with `nectar-export pack ARTIFACT --base {base.path}`")
    if len(pack.manifest.widths) != base.manifest.layers:
        raise BundleError(f"pack {pack.path} has heads for {len(pack.manifest.widths)} layers, base {base.path} "
                          f"has {base.manifest.layers}; re-make the pack")


def resolve(base: Bundle, pack: Pack) -> Bundle:
    """The bundle a backend runs: the base's graph and files, the pack's document numbers, and the pack itself."""
    check_pack(base, pack)
    p = pack.manifest
    manifest = dataclasses.replace(base.manifest, n=p.n, first_position=p.first_position,
                                   max_new_tokens=p.max_new_tokens, cached_tokens=p.cached_tokens,
                                   question_template=p.question_template, source=p.source)
    return Bundle(path=base.path, manifest=manifest, pack=pack)


def pair_names(layers: int) -> list[str]:
    """The joint-weight tensors of a pack, layer by layer (JOINT_NAMES each)."""
    return [PAIR_TEMPLATE.format(layer=layer, name=name) for layer in range(layers) for name in JOINT_NAMES]


def pack_tensors_problem(bundle: Bundle, tensors: dict[str, Any]) -> str | None:
    """Why a pack's tensors do not fit its base (a missing or misshapen joint weight or KV tensor, or heads of
    another width than pack.json says), or None."""
    m = bundle.manifest
    widths = bundle.pack.manifest.widths
    for layer in range(m.layers):
        names = [PAIR_TEMPLATE.format(layer=layer, name=name) for name in JOINT_NAMES]
        if missing := next((name for name in names if name not in tensors), None):
            return f"it lacks {missing}"
        w1 = tensors[names[0]]
        if (problem := joint_problem(*(tensors[name] for name in names))) is not None:
            return f"layer {layer}'s joint weights are malformed: {problem}"
        if tuple(w1.shape[:2]) != (m.kv_heads, m.head_dim):
            return f"it holds {names[0]} of shape {list(w1.shape)}, the base has {m.kv_heads} KV-heads of {m.head_dim}"
        if (width := carried_width(tuple(w1.shape))) != widths[layer]:
            return f"it holds {names[0]} of shape {list(w1.shape)}, heads of width {width}; pack.json says {widths[layer]}"
    kv = (1, m.kv_heads, m.cached_tokens, m.head_dim)
    for name in past_names(m.layers) if m.cached_tokens else ():
        if name not in tensors:
            return f"it lacks {name}"
        if tuple(tensors[name].shape) != kv:
            return f"it holds {name} of shape {list(tensors[name].shape)}, the base needs {list(kv)}"
    return None


def pack_heads(bundle: Bundle, tensors: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The base's head inputs (HEAD_TEMPLATES per layer, in `dtype`) built from a checked pack's joint weights."""
    import numpy as np

    heads = {}
    for layer in range(bundle.manifest.layers):
        joint = (tensors[PAIR_TEMPLATE.format(layer=layer, name=name)] for name in JOINT_NAMES)
        for template, array in zip(HEAD_TEMPLATES, carried(*joint)):
            heads[template.format(layer=layer)] = np.ascontiguousarray(array.astype(dtype, copy=False))
    return heads

