"""The fitted artifact, and the only reader and writer of its files.

    nectar.json                 ArtifactManifest: the model, the context, the new-token window, the fit's config
                                and metrics, the head variants' files and shapes, eval's report once measured
    nectar.safetensors          the 'nectar' variant's heads (tensors `layers.{i}.{name}`)
    ablations/{variant}.safetensors   the baselines fitted at equal parameters (quadrature, uniform_allocation)
    heldout.json                HeldOut: the context's token ids and the held-out test samples
    attention_mass.safetensors  per layer [Hkv, n] (`layers.{i}`): each context token's mean softmax weight under
                                the training queries (the query-aware baseline's selection); older artifacts lack it

The folder is written atomically. Format "nectar-artifact/1" is the only one there has been.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nectar_export import __version__
from nectar_export.config import FitConfig
from nectar_export.errors import NectarError
from nectar_export.heads import MLPPair, Pair, QuadraturePair
from nectar_export.samples import Sample
from nectar_graphs.files import check_output_folder, staged_folder
from nectar_runtime.bundle import template_problem
from nectar_runtime.fields import MAX_MANIFEST, Fields, path_inside, read_json, write_json

FORMAT = "nectar-artifact/1"
MANIFEST = "nectar.json"
WEIGHTS = "nectar.safetensors"
HELDOUT = "heldout.json"
MASS = "attention_mass.safetensors"
FIX = "refit the artifact with `nectar-export fit`"
MAX_TOKENS = 1 << 24
MAX_HELDOUT = 1 << 30          # bytes of heldout.json: the context's ids (MAX_TOKENS of them) and the test samples


def _fields(data: Any, where: str) -> Fields:
    return Fields(data, where, NectarError, FIX)


@dataclass(frozen=True)
class ModelRecord:
    """The base model the heads were fitted for, and the attention shape they follow."""

    source: str
    fingerprint: str
    model_type: str
    layers: int
    kv_heads: int
    query_heads: int
    head_dim: int
    scaling: float                  # the softmax scale of the model's attention
    max_positions: int
    # a hybrid model (Gemma 3): the layers that attend to everything and so get heads, in order, and the sliding
    # layers' window; None: every layer gets heads
    head_layers: tuple[int, ...] | None = None
    sliding_window: int | None = None

    @property
    def pair_layers(self) -> list[int]:
        """The model layers that have a pair, in order (the artifact's `layers.{i}` count these)."""
        return list(self.head_layers) if self.head_layers is not None else list(range(self.layers))

    @classmethod
    def from_json(cls, f: Fields) -> "ModelRecord":
        layers = f.count("layers", 1, 1024)
        head_layers = f.ints("head_layers", None, below=layers) if f.data.get("head_layers") is not None else None
        if head_layers is not None and (not head_layers or list(head_layers) != sorted(set(head_layers))):
            raise f.fail("head_layers", "increasing layer indices, at least one")
        window = f.count("sliding_window", 1, MAX_TOKENS) if f.data.get("sliding_window") is not None else None
        return cls(source=f.get("source", str), fingerprint=f.get("fingerprint", str),
                   model_type=f.get("model_type", str), layers=layers,
                   kv_heads=f.count("kv_heads", 1, 4096), query_heads=f.count("query_heads", 1, 4096),
                   head_dim=f.count("head_dim", 1, 4096), scaling=f.number("scaling", low=1e-12, high=1e12),
                   max_positions=f.count("max_positions", 1, MAX_TOKENS), head_layers=head_layers,
                   sliding_window=window)


@dataclass(frozen=True)
class ContextRecord:
    """The n context tokens the heads replace, and which of them stay exact (the first sinks, the last window)."""

    source: str
    sha256: str
    n: int
    sinks: int
    window: int
    document_tokens: int            # how many of the n tokens are document (the rest is the chat prefix)
    prefix_text: str                # chat-template text before the document
    question_template: str          # str.format text after the document; "{question}" marks the user's text
    document_total_tokens: int | None = None    # the whole document's tokens (None: not recorded, older artifacts)
    salient: int = 0                # per (layer, KV-head): tokens of highest training attention mass also kept exact

    @property
    def document_whole(self) -> bool | None:
        """Whether the context holds the whole document (no continuation text exists); None when not recorded."""
        return None if self.document_total_tokens is None else self.document_tokens >= self.document_total_tokens

    @classmethod
    def from_json(cls, f: Fields) -> "ContextRecord":
        n = f.count("n", 1, MAX_TOKENS)
        template = f.get("question_template", str)
        if (problem := template_problem(template)) is not None:
            raise NectarError(f"{f.where}: the question template is refused: {problem}; {FIX}")
        return cls(source=f.get("source", str), sha256=f.get("sha256", str), n=n, sinks=f.count("sinks", 0, n),
                   window=f.count("window", 0, n), document_tokens=f.count("document_tokens", 0, n),
                   prefix_text=f.get("prefix_text", str), question_template=template,
                   document_total_tokens=f.count("document_total_tokens", 0, 1 << 40, None),
                   salient=f.count("salient", 0, n, 0))


@dataclass(frozen=True)
class VariantRecord:
    """One head set: its weights file (inside the artifact) and each layer's pair shape."""

    file: str
    layers: tuple[dict[str, Any], ...]

    @classmethod
    def from_json(cls, f: Fields, layers: int) -> "VariantRecord":
        file = f.get("file", str)
        if not file or len(file) > 4096 or Path(file).is_absolute() or ".." in Path(file).parts:
            raise f.fail("file", "a path inside the artifact folder")
        shapes = f.get("layers", list, expected="a list of pair shapes")
        if len(shapes) != layers:
            raise f.fail("layers", f"{layers} pair shapes, one per layer with heads")
        return cls(file=file, layers=tuple(_pair_shape(_fields(s, f"{f.where} layers[{i}]"))
                                           for i, s in enumerate(shapes)))


def _pair_shape(f: Fields) -> dict[str, Any]:
    family = f.choice("family", ("mlp", "quadrature"))
    if family == "quadrature":
        return {"family": family, "slots": f.count("slots", 1, 1 << 20)}
    return {"family": family, "target_hidden": f.count("target_hidden", 1, 1 << 20),
            "score_hidden": f.count("score_hidden", 1, 1 << 20)}


def _fit_report(f: Fields) -> dict[str, Any]:
    """fit's report, free-form but for the numbers eval reads: nectar_params, kv_entries and each variant's params."""
    f.count("nectar_params", 0, 1 << 62)
    f.count("kv_entries", 1, 1 << 62)
    variants = f.child("variants", {})
    for name in variants.data:
        variants.child(name).count("params", 0, 1 << 62, None)
    return f.data


@dataclass(frozen=True)
class ArtifactManifest:
    """nectar.json, typed and validated. `fit` and `eval` are the measured reports (free-form, as measured)."""

    model: ModelRecord
    context: ContextRecord
    max_new_tokens: int             # the new-token window after the context (fit --reserve)
    config: FitConfig
    fit: dict[str, Any]
    variants: dict[str, VariantRecord] = field(default_factory=dict)
    eval: dict[str, Any] | None = None
    code_version: str = __version__

    @property
    def n(self) -> int:
        return self.context.n

    @property
    def exact_tokens(self) -> tuple[int, int]:
        """(sinks, window): context tokens kept as exact KV at the start and at the end."""
        return self.context.sinks, self.context.window

    @property
    def nectar_params(self) -> int:
        """Numbers the 'nectar' variant stores per context (exact tokens' KV included)."""
        return int(self.fit["nectar_params"])

    @property
    def kv_entries(self) -> int:
        return int(self.fit["kv_entries"])

    def variant_params(self, variant: str) -> int | None:
        return self.fit.get("variants", {}).get(variant, {}).get("params")

    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT, "code_version": self.code_version, "model": dataclasses.asdict(self.model),
                "context": {k: v for k, v in dataclasses.asdict(self.context).items() if v is not None},
                "positions": {"first_new": self.n, "max_new_tokens": self.max_new_tokens},
                "config": self.config.to_json(), "fit": self.fit,
                "variants": {name: {"file": v.file, "layers": list(v.layers)} for name, v in self.variants.items()}}
        if self.eval is not None:
            data["eval"] = self.eval
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST) -> "ArtifactManifest":
        f = _fields(data, where)
        if data.get("format") != FORMAT:
            raise NectarError(f"{where} has format {data.get('format')!r}; this version reads {FORMAT!r}")
        model = ModelRecord.from_json(f.child("model"))
        context = ContextRecord.from_json(f.child("context"))
        positions = f.child("positions")
        variants = {name: VariantRecord.from_json(_fields(v, f"{where} variants[{name!r}]"),
                                                    len(model.pair_layers))
                    for name, v in f.get("variants", dict).items()}
        try:
            config = FitConfig.from_json(f.get("config", dict))
        except (NectarError, TypeError, ValueError) as exc:
            raise NectarError(f"{where}: config is not a fit configuration ({exc}); {FIX}") from None
        return cls(model=model, context=context, max_new_tokens=positions.count("max_new_tokens", 1, MAX_TOKENS),
                   config=config, fit=_fit_report(f.child("fit")), variants=variants, eval=f.get("eval", dict, None),
                   code_version=f.get("code_version", str, ""))

    def save(self, folder: Path) -> None:
        """Write nectar.json atomically (temp file, then rename)."""
        write_json(folder / MANIFEST, self.to_json())


@dataclass(frozen=True)
class HeldOut:
    """heldout.json: the context's token ids, the test samples nothing in fit sees, and the validation samples
    fit stopped early on (what a recipe may be tuned on; older artifacts have none)."""

    context_ids: tuple[int, ...]
    test: tuple[Sample, ...]
    val: tuple[Sample, ...] = ()

    def questions(self, limit: int | None = None) -> list[Sample]:
        """The test samples that are questions (self-study, prompts), at most `limit`."""
        return [s for s in self.test if s.question][:limit]

    def to_json(self) -> dict[str, Any]:
        def samples(items: tuple[Sample, ...]) -> list[dict[str, Any]]:
            return [{"source": s.source, "ids": list(s.ids), "question": s.question} for s in items]
        return {"context_ids": list(self.context_ids), "test": samples(self.test), "val": samples(self.val)}

    @classmethod
    def from_json(cls, data: Any, where: str = HELDOUT) -> "HeldOut":
        f = _fields(data, where)

        def samples(key: str) -> tuple[Sample, ...]:
            out = []
            for i, item in enumerate(f.get(key, list, [])):
                s = _fields(item, f"{where} {key}[{i}]")
                out.append(Sample(s.get("source", str), s.ints("ids"), s.get("question", (str, type(None)), None)))
            return tuple(out)
        if "test" not in f.data:
            f.get("test", list)                          # the one-line error for a missing test split
        return cls(context_ids=f.ints("context_ids"), test=samples("test"), val=samples("val"))


@dataclass
class Artifact:
    """A loaded artifact: its manifest and the heads of each variant ('nectar' and any ablations)."""

    path: Path
    manifest: ArtifactManifest
    heads: dict[str, list[Pair]]

    @property
    def n(self) -> int:
        return self.manifest.n

    @property
    def exact_tokens(self) -> tuple[int, int]:
        return self.manifest.exact_tokens

    def heldout(self) -> HeldOut:
        return read_heldout(self.path)

    def exact_sets(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Per layer, the context tokens kept exact ([E] shared by the heads, or [Hkv, E] with salient tokens)."""
        from nectar_export.selection import exact_sets

        context = self.manifest.context
        mass = self.attention_mass() if context.salient else None
        if context.salient and mass is None:
            raise NectarError(f"{self.path} keeps {context.salient} salient tokens exact but has no {MASS}; {FIX}")
        return exact_sets(self.n, context.sinks, context.window, context.salient, mass,
                          len(self.manifest.model.pair_layers), device)

    def attention_mass(self) -> list[torch.Tensor] | None:
        """Per layer [Hkv, n] mean softmax weights under the training queries; None for artifacts without them."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not (self.path / MASS).exists():
            return None
        file = path_inside(self.path, MASS, NectarError, "Nectar artifact")
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as exc:
            raise NectarError(f"cannot read {file}: {exc}; {FIX}") from None
        model = self.manifest.model
        want = (model.kv_heads, self.n)
        count = len(model.pair_layers)
        mass = [tensors.get(f"layers.{i}") for i in range(count)]
        if any(m is None or tuple(m.shape) != want for m in mass):
            raise NectarError(f"{file} does not hold a [{want[0]}, {want[1]}] tensor for each of the "
                              f"{count} layers with heads; {FIX}")
        return mass


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


OWNED = (MANIFEST, WEIGHTS, HELDOUT, MASS, "ablations/*.safetensors")     # what fit writes into an artifact


def check_output(out: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, an -o that is not empty or new, unless it is an earlier artifact and `overwrite`
    is given; even then, one that holds files fit does not write (replacing the folder would delete them)."""
    check_output_folder(out, MANIFEST, OWNED, overwrite, "Nectar artifact")


def save_artifact(out: Path, manifest: ArtifactManifest, heads: dict[str, list[Pair]],
                  heldout: HeldOut | None = None, overwrite: bool = False,
                  mass: list[torch.Tensor] | None = None) -> ArtifactManifest:
    """Write every variant's weights, heldout.json, the attention mass and the manifest into a temp folder,
    then move it into place."""
    from safetensors.torch import save_file

    out = out.expanduser()
    check_output(out, overwrite)
    manifest = dataclasses.replace(manifest, variants={
        v: VariantRecord(_weights_file(v), tuple(pair_shape(p) for p in pairs)) for v, pairs in heads.items()})
    with staged_folder(out) as tmp:
        for variant, pairs in heads.items():
            target = tmp / _weights_file(variant)
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file(_tensors(pairs), str(target), metadata={"format": FORMAT, "variant": variant})
        if heldout is not None:
            (tmp / HELDOUT).write_text(json.dumps(heldout.to_json()))
        if mass is not None:
            save_file({f"layers.{i}": m.float().contiguous() for i, m in enumerate(mass)}, str(tmp / MASS),
                      metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2))
    return manifest


def _read_json(file: Path, what: str) -> Any:
    if not file.is_file():
        raise NectarError(f"{file.parent} is not a Nectar artifact (no {file.name}); {what}")
    file = path_inside(file.parent, file.name, NectarError, "Nectar artifact")
    return read_json(file, NectarError, FIX, limit=MAX_HELDOUT if file.name == HELDOUT else MAX_MANIFEST)


def read_manifest(path: Path) -> ArtifactManifest:
    """nectar.json of an artifact folder, parsed and validated; NectarError when absent or damaged."""
    file = Path(path).expanduser() / MANIFEST
    return ArtifactManifest.from_json(_read_json(file, "create one with `nectar-export fit`"), str(file))


def read_heldout(path: Path) -> HeldOut:
    """heldout.json of an artifact folder; NectarError when absent or damaged."""
    file = Path(path).expanduser() / HELDOUT
    return HeldOut.from_json(_read_json(file, f"its held-out split is gone; {FIX}"), str(file))


def record_eval(path: Path, report: dict[str, Any]) -> None:
    """Store eval's report in nectar.json (atomically)."""
    path = Path(path).expanduser()
    dataclasses.replace(read_manifest(path), eval=report).save(path)


def check_compatible(manifest: ArtifactManifest, model_fingerprint: str, context_sha: str | None = None) -> None:
    """Refuse an artifact fitted for another model or another context, naming both fingerprints."""
    want = manifest.model.fingerprint
    if want != model_fingerprint:
        raise NectarError(f"artifact was fitted for model {want[:16]}, but the loaded model is "
                          f"{model_fingerprint[:16]}; pass the model it was fitted with")
    if context_sha is not None and context_sha != manifest.context.sha256:
        raise NectarError(f"artifact was fitted for context {manifest.context.sha256[:16]}, but this "
                          f"context is {context_sha[:16]}; refit for the new document")


def _load_pairs(path: Path, spec: VariantRecord, model: ModelRecord) -> list[Pair]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path_inside(path, spec.file, NectarError, "Nectar artifact")
    try:
        tensors = load_file(str(file))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise NectarError(f"cannot read {path / spec.file}: {exc}") from None
    pairs = []
    for i, shape in enumerate(spec.layers):
        pair = _make_pair(shape, model.kv_heads, model.head_dim)
        prefix = f"layers.{i}."
        try:
            pair.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        except RuntimeError as exc:
            raise NectarError(f"{path / spec.file} does not hold layer {i}'s heads as nectar.json describes them "
                              f"({str(exc).splitlines()[0]}); {FIX}") from None
        pairs.append(pair.eval())
    return pairs


def load_artifact(path: Path, model_fingerprint: str, context_sha: str | None = None) -> Artifact:
    """Read an artifact's manifest and heads after checking it belongs to this model (and context)."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    check_compatible(manifest, model_fingerprint, context_sha)
    heads = {variant: _load_pairs(path, spec, manifest.model) for variant, spec in manifest.variants.items()}
    return Artifact(path=path, manifest=manifest, heads=heads)
