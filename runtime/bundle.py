"""The bundle: what the runtime loads. `BundleManifest` is the only reader and writer of bundle.json (no torch needed).

A bundle is a directory:

    bundle.json          the manifest (fields below)
    model.onnx           the step graph (+ model.onnx.data when weights pass 1 GB)
    tokenizer.json       the base model's tokenizer (Hugging Face `tokenizers` format)
    context.safetensors  the KV every sequence's past starts with (`cached_tokens` of them): the whole context in a
                         full bundle, the exact tokens (sinks and exact window) in a Nectar bundle; absent when none
    model.plan           optional TensorRT engine (`nectar-export build`)

bundle.json, format "nectar-bundle/2" ("nectar-bundle/1" still loads: its `context_tokens` is read as
`cached_tokens`, and where it is absent, n for a full bundle and 0 for a Nectar one):

    kind              "nectar" (document baked into Nectar heads), "full" (context KV as past input) or "base" (the
                      Nectar graph with no document: heads are graph inputs, a pack supplies them and the exact
                      tokens' KV; its n, first_position, cached_tokens, window and template are 0, 0, 0, a default
                      and "{question}" until a pack gives its own: see nectar_runtime.pack)
    precision         "fp32" | "fp16" | "bf16" | "int4" (the base's projections as ONNX Runtime's 4-bit MatMulNBits,
                      everything else fp16: graphs/int4.py); kv_dtype: numpy-style name of the KV I/O type
    cache_layout      "dynamic" (the past grows each step) or "static" (fixed buffers written in place)
    n                 context tokens; first_position: position of the first new token (= n)
    cached_tokens     tokens whose KV is in context.safetensors (see above); `fit --context-tokens` is n, not this
    max_new_tokens    the new-token window: positions first_position .. first_position + max_new_tokens - 1
    logits            "last" (logits of the last new token) or "all"
    layers, kv_heads, head_dim, vocab_size
    inputs, outputs   [{"name", "dtype", "shape"}]; shape entries are ints or axis names
    past              name templates {"key", "value", "present_key", "present_value"} (PAST_TEMPLATES)
    template          {"question": str.format text placed after the document: "{question}" marks the user's
                      text, literal braces are doubled}
    stop_token_ids, pad_token_id
    files             {name: {"bytes", "sha256"}} for every file above that is present
    source            {"artifact", "model_source", "model_fingerprint", "context_sha256", "variant", "code_version"}
    graph             export's report: {"opset", "ir_version", "passes", "op_counts", "lint", ...}
    engines           {"tensorrt": {"file", "profile", "tensorrt_version", "build_seconds"}} once built
    ops               "portable" (standard ONNX operators, the TensorRT input; the default when absent) or "ort" (ONNX
                      Runtime's contrib operators: GroupQueryAttention, SkipSimplifiedLayerNormalization, ...;
                      graphs/fused.py). head_dim is the KV I/O's head size: a fused Nectar graph pads it (the extra
                      channels hold its exact merge's constant)
    step_tokens       most new tokens one call of the graph takes (0: any); a runtime feeds longer prompts in pieces
    max_batch         most sequences one call takes (0: any)
"""

from __future__ import annotations

import dataclasses
import hashlib
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nectar_runtime.errors import BundleError
from nectar_runtime.external_data import check_external_data
from nectar_runtime.fields import Fields, path_inside, read_json, write_json

FORMAT = "nectar-bundle/2"
READABLE = ("nectar-bundle/1", FORMAT)
MANIFEST = "bundle.json"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONTEXT_FILE = "context.safetensors"
ENGINE_FILE = "model.plan"
KINDS = ("nectar", "full", "base")
LAYOUTS = ("dynamic", "static")
PRECISIONS = ("fp32", "fp16", "bf16", "int4")
KV_DTYPES = ("float32", "float16", "bfloat16")
DTYPES = (*KV_DTYPES, "float64", "int64", "int32", "int16", "int8", "uint8", "bool")    # of graph inputs and outputs
LOGITS = ("last", "all")
OPS = ("portable", "ort")
# The past and present tensor names of the step graph (the Hugging Face / Optimum convention), spelled once.
PAST_TEMPLATES = {"key": "past_key_values.{layer}.key", "value": "past_key_values.{layer}.value",
                  "present_key": "present.{layer}.key", "present_value": "present.{layer}.value"}
# a base bundle's head inputs per layer (the three products and first bias of graphs.step.JointPair), in graph
# order after the past; their hidden width is the axis WIDTH_AXIS, so heads of any size fit one base
HEAD_PREFIX = "nectar_heads."
HEAD_TEMPLATES = tuple(HEAD_PREFIX + "{layer}." + w for w in ("w1", "b1", "w2", "w3"))
WIDTH_AXIS = "nectar_width.{layer}"
MAX_LAYERS = 1024                # bounds that no real decoder reaches; a larger number is a damaged manifest
MAX_TOKENS = 1 << 24
MAX_TEMPLATE = 1 << 16           # characters of the question template (chat templates' are a few dozen)


def template_problem(template: str) -> str | None:
    """Why a question template is unusable, or None: it must be a str.format text of at most MAX_TEMPLATE
    characters whose only field is one plain `{question}` (a format spec such as `{question:>30000000}` would pad
    the prompt to any length before the window is checked; other fields would fail or read attributes)."""
    if len(template) > MAX_TEMPLATE:
        return f"it has {len(template)} characters, more than {MAX_TEMPLATE}"
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        return f"it is not a format string ({exc})"
    if fields != [("question", "", None)]:
        shown = ", ".join("{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                          for name, spec, conv in fields) or "none"
        return f"its fields are {shown[:120]}; it must have exactly one plain {{question}}"
    return None


def inside(folder: Path, name: str) -> Path:
    """folder / name for a file bundle.json lists, refused unless it lies inside the folder (see path_inside)."""
    return path_inside(folder, name, BundleError, "bundle")


def past_names(layers: int) -> list[str]:
    """Past input names in graph order: key 0, value 0, key 1, ..."""
    return [PAST_TEMPLATES[kv].format(layer=i) for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    """Present output names in graph order, paired with past_names."""
    return [PAST_TEMPLATES[kv].format(layer=i) for i in range(layers) for kv in ("present_key", "present_value")]


def head_names(layers: int) -> list[str]:
    """A base bundle's head input names in graph order: w1, b1, w2, w3 of layer 0, then of layer 1, ..."""
    return [t.format(layer=i) for i in range(layers) for t in HEAD_TEMPLATES]


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one bundle file."""

    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> "FileEntry":
        return cls(bytes=path.stat().st_size, sha256=sha256_file(path))


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy-style dtype, shape of ints and axis names (None: unknown rank)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...] | None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": None if self.shape is None else list(self.shape)}


@dataclass(frozen=True)
class Source:
    """Where the bundle came from: the artifact, the model and the variant of heads."""

    artifact: str
    model_source: str
    model_fingerprint: str
    context_sha256: str
    variant: str | None
    code_version: str


def _fields(data: Any, where: str) -> Fields:
    return Fields(data, where, BundleError, "re-export the bundle")


def _tensor_specs(reader: Fields, key: str) -> tuple[TensorSpec, ...]:
    specs = []
    for i, item in enumerate(reader.get(key, list, expected="a list of tensors")):
        spec = _fields(item, f"{reader.where} {key}[{i}]")
        shape = spec.get("shape", (list, type(None)), None, "a list of ints and axis names")
        if shape is not None and not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
            raise spec.fail("shape", "a list of ints and axis names")
        dims = None if shape is None else tuple(shape)
        specs.append(TensorSpec(spec.get("name", str), spec.choice("dtype", DTYPES), dims))
    return tuple(specs)


def _files(reader: Fields) -> dict[str, FileEntry]:
    files = {}
    for name, entry in reader.get("files", dict, expected="an object of file entries").items():
        item = Fields(entry, f"{reader.where} files[{name!r}]", reader.error, reader.fix)
        files[name] = FileEntry(item.count("bytes", 0, 1 << 50), item.get("sha256", str))
    return files


def _graph(reader: Fields) -> dict[str, Any]:
    """export's report, free-form but for what commands read of it: each pass's name and counts (verify's fusion
    counts) and the op counts, integers by name."""
    graph = reader.child("graph", {})
    for i, item in enumerate(graph.get("passes", list, [], "a list of pass reports")):
        report = _fields(item, f"{graph.where} passes[{i}]")
        report.get("name", str)
        _counts(report.child("counts", {}))
    _counts(graph.child("op_counts", {}))
    return graph.data


def _counts(reader: Fields) -> None:
    for key in reader.data:
        reader.count(key, 0, 1 << 62)


def _source(reader: Fields) -> Source | None:
    if reader.data.get("source") is None:
        return None
    s = reader.child("source")
    return Source(artifact=s.get("artifact", str), model_source=s.get("model_source", str, ""),
                  model_fingerprint=s.get("model_fingerprint", str), context_sha256=s.get("context_sha256", str),
                  variant=s.get("variant", (str, type(None)), None), code_version=s.get("code_version", str, ""))


@dataclass(frozen=True)
class BundleManifest:
    """bundle.json, typed and validated (fields in the module docstring)."""

    kind: str
    precision: str
    kv_dtype: str
    n: int
    first_position: int
    max_new_tokens: int
    cached_tokens: int
    logits: str
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    question_template: str
    stop_token_ids: tuple[int, ...]
    pad_token_id: int
    cache_layout: str = "dynamic"
    source: Source | None = None
    graph: dict[str, Any] = field(default_factory=dict)     # export's report: passes, op counts, lint, sizes
    files: dict[str, FileEntry] = field(default_factory=dict)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    ops: str = "portable"
    step_tokens: int = 0            # most new tokens per graph call (0: any)
    max_batch: int = 0              # most sequences per graph call (0: any)

    @property
    def static(self) -> bool:
        """Static KV layout: fixed buffers of kv_capacity slots, new tokens written at `cache_position`."""
        return self.cache_layout == "static"

    @property
    def logits_name(self) -> str:
        return self.outputs[0].name

    def past_names(self) -> list[str]:
        return past_names(self.layers)

    def present_names(self) -> list[str]:
        return present_names(self.layers)

    def fusion_counts(self) -> dict[str, int]:
        """What export's sibling-MatMul fusion merged ({} when it did not run)."""
        passes = self.graph.get("passes", [])
        return next((p.get("counts", {}) for p in passes if p.get("name") == "fuse_sibling_matmuls"), {})

    def with_files(self, folder: Path, names: list[str]) -> "BundleManifest":
        """The manifest with size and sha256 entries for `names` in `folder` (added or replaced)."""
        return dataclasses.replace(self, files={**self.files, **{name: FileEntry.of(folder / name) for name in names}})

    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT, "kind": self.kind, "precision": self.precision, "kv_dtype": self.kv_dtype,
                "cache_layout": self.cache_layout, "n": self.n, "first_position": self.first_position,
                "max_new_tokens": self.max_new_tokens, "cached_tokens": self.cached_tokens, "logits": self.logits,
                "layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size, "inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs], "past": dict(PAST_TEMPLATES),
                "template": {"question": self.question_template}, "stop_token_ids": list(self.stop_token_ids),
                "pad_token_id": self.pad_token_id,
                "source": None if self.source is None else dataclasses.asdict(self.source),
                "graph": self.graph, "files": {k: dataclasses.asdict(v) for k, v in self.files.items()}}
        if self.engines:
            data["engines"] = self.engines
        data.update(ops=self.ops, step_tokens=self.step_tokens, max_batch=self.max_batch)
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST) -> "BundleManifest":
        """Validate types and bounds of every field a reader uses; BundleError names the first bad one."""
        r = _fields(data, where)
        version = data.get("format")
        if version not in READABLE:
            raise BundleError(f"{where} has format {version!r}; this runtime reads {', '.join(READABLE)}")
        kind = r.choice("kind", KINDS)
        n = r.count("n", 0, MAX_TOKENS)
        legacy = n if kind == "full" else 0       # format 1 called it context_tokens, and early bundles lacked it
        cached = r.count("cached_tokens", 0, n) if version == FORMAT else r.count("context_tokens", 0, n, legacy)
        past = r.get("past", dict, dict(PAST_TEMPLATES))
        if past != PAST_TEMPLATES:
            raise r.fail("past", f"the names {PAST_TEMPLATES}")
        vocab = r.count("vocab_size", 1, 1 << 24)
        template = r.child("template").get("question", str)
        if (problem := template_problem(template)) is not None:
            raise BundleError(f"{where}: the question template is refused: {problem}; re-export the bundle")
        manifest = cls(
            kind=kind, precision=r.choice("precision", PRECISIONS), kv_dtype=r.choice("kv_dtype", KV_DTYPES),
            n=n, first_position=r.count("first_position", n, n),            # the first new token follows the n
            max_new_tokens=r.count("max_new_tokens", 1, MAX_TOKENS), cached_tokens=cached,
            logits=r.choice("logits", LOGITS), layers=r.count("layers", 1, MAX_LAYERS),
            kv_heads=r.count("kv_heads", 1, 4096), head_dim=r.count("head_dim", 1, 4096),
            vocab_size=vocab, inputs=_tensor_specs(r, "inputs"),
            outputs=_tensor_specs(r, "outputs"), question_template=template,
            stop_token_ids=r.ints("stop_token_ids", below=vocab), pad_token_id=r.count("pad_token_id", 0, vocab - 1),
            cache_layout=r.choice("cache_layout", LAYOUTS, "dynamic"), source=_source(r),
            graph=_graph(r), files=_files(r), engines=r.get("engines", dict, {}), ops=r.choice("ops", OPS, "portable"),
            step_tokens=r.count("step_tokens", 0, MAX_TOKENS, 0), max_batch=r.count("max_batch", 0, MAX_TOKENS, 0))
        if not manifest.outputs:
            raise r.fail("outputs", "the logits output first")
        if version == FORMAT and CONTEXT_FILE in manifest.files and not cached:     # format 1 kept it either way
            raise r.fail("cached_tokens", f"the number of tokens whose KV {CONTEXT_FILE} holds")
        return manifest

    def save(self, folder: Path) -> None:
        """Write bundle.json into folder through a temp file and a rename (readers never see half of it)."""
        write_json(folder / MANIFEST, self.to_json())


def _listed_io(manifest: BundleManifest, inputs: list[tuple[str, list]], outputs: list[tuple[str, list]]) -> str | None:
    """Where bundle.json's `inputs` and `outputs` differ from the graph's (names, and each dimension the graph
    names or fixes), or None."""
    for listed, actual, what in ((manifest.inputs, inputs, "inputs"), (manifest.outputs, outputs, "outputs")):
        if [s.name for s in listed] != [name for name, _ in actual]:
            return f"its {what} are not the graph's {len(actual)} {what}"
        for spec, (name, shape) in zip(listed, actual):
            if spec.shape is None or shape is None:
                continue
            if len(spec.shape) != len(shape) or any(b is not None and a != b for a, b in zip(spec.shape, shape)):
                return f"it gives {name} the shape {list(spec.shape)[:8]}, the graph {list(shape)}"
    return None


def check_graph_io(manifest: BundleManifest, inputs: list[tuple[str, list]], outputs: list[tuple[str, list]],
                   where: Path) -> None:
    """Refuse a manifest whose numbers disagree with the graph's own inputs and outputs ((name, shape) pairs as
    a runtime reports them): names and order, and the KV's heads and head size, the logits' vocabulary."""
    third = "cache_position" if manifest.static else "attention_mask"
    heads = head_names(manifest.layers) if manifest.kind == "base" else []
    want_in = ["input_ids", "position_ids", third, *manifest.past_names(), *heads]
    want_out = [manifest.logits_name, *manifest.present_names()]
    names_in, names_out = [n for n, _ in inputs], [n for n, _ in outputs]
    problem = _listed_io(manifest, inputs, outputs)
    if names_in != want_in or names_out != want_out:
        problem = (f"it describes {manifest.layers} layers of the {manifest.cache_layout} layout ({len(want_in)} inputs, "
                   f"{len(want_out)} outputs), the graph has {len(names_in)} inputs and {len(names_out)} outputs")
    kv_inputs = inputs[3:len(inputs) - len(heads)]
    for name, shape in [*kv_inputs, *outputs[1:]]:                  # [B, Hkv, P, D] each
        if not shape or len(shape) != 4:
            continue
        heads, dim = shape[1], shape[3]
        if (isinstance(heads, int) and heads != manifest.kv_heads) or (isinstance(dim, int) and dim != manifest.head_dim):
            problem = f"it says {manifest.kv_heads} KV heads of {manifest.head_dim}, the graph's {name} is {shape}"
    logits = outputs[0][1] if outputs else None
    if logits and isinstance(logits[-1], int) and logits[-1] != manifest.vocab_size:
        problem = f"it says a vocabulary of {manifest.vocab_size}, the graph's logits have {logits[-1]}"
    if problem:
        raise BundleError(f"{where / MANIFEST} does not match {where / ONNX_FILE}: {problem}; re-export the bundle")


@dataclass(frozen=True)
class Bundle:
    """A validated bundle directory and its manifest; for a base bundle running a document, the pack too
    (nectar_runtime.pack.resolve: the manifest then holds the pack's numbers)."""

    path: Path
    manifest: BundleManifest
    pack: Any = None                 # nectar_runtime.pack.Pack

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def cached_tokens(self) -> int:
        """Tokens whose KV the past starts with (context.safetensors): the first slots of a static buffer."""
        return self.manifest.cached_tokens

    @property
    def static(self) -> bool:
        return self.manifest.static

    def past_names(self) -> list[str]:
        return self.manifest.past_names()

    def present_names(self) -> list[str]:
        return self.manifest.present_names()

    def prompt_text(self, question: str) -> str:
        """The text after the document for a question: the template is a str.format string (literal braces
        doubled, as the exporter writes it), filled exactly as nectar_export.samples.question_ids does."""
        return self.manifest.question_template.format(question=question)   # one plain {question}: from_json checks


def read_manifest(path: str | Path) -> BundleManifest:
    """bundle.json of a bundle folder, parsed and validated; BundleError when absent or damaged."""
    file = Path(path).expanduser() / MANIFEST
    if not file.is_file():
        raise BundleError(f"{file.parent} is not a bundle (no {MANIFEST}); create one with `nectar-export export`")
    file = inside(file.parent, MANIFEST)
    return BundleManifest.from_json(read_json(file, BundleError, "re-export the bundle"), str(file))


def check_listed_files(path: Path, files: dict[str, FileEntry], check_hashes: bool, kind: str = "bundle",
                       manifest: str = MANIFEST, fix: str = "re-export the bundle") -> None:
    """Every file a manifest lists (a bundle's or a pack's) inside the folder, present, of its size and, with
    `check_hashes`, of its sha256; BundleError naming the file otherwise."""
    for name, entry in files.items():
        target = path_inside(path, name, BundleError, kind)
        if not target.is_file():
            raise BundleError(f"{kind} file {target} is missing; {fix}")
        size = target.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{kind} file {target} has {size} bytes, {manifest} says {entry.bytes}: "
                              f"it is damaged or was replaced; {fix}")
        if check_hashes and sha256_file(target) != entry.sha256:
            raise BundleError(f"{kind} file {target} does not match its sha256 in {manifest}; {fix}")


def _check_files(path: Path, manifest: BundleManifest, check_hashes: bool) -> None:
    """Every listed file present with its size (and sha256), and the files a bundle of this kind needs listed."""
    check_listed_files(path, manifest.files, check_hashes)
    for needed in (ONNX_FILE, TOKENIZER_FILE) + ((CONTEXT_FILE,) if manifest.cached_tokens else ()):
        if needed not in manifest.files:
            raise BundleError(f"{path / MANIFEST} does not list {needed}; re-export the bundle")


def load_bundle(path: str | Path, check_hashes: bool = True) -> Bundle:
    """Read bundle.json and check format, fields and every listed file: inside the folder, its size, and its
    sha256 unless `check_hashes` is False (the command lines' --no-hash-check: it saves reading every byte once,
    see the README's trust model); and the graph's external data, which may name only listed files."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    _check_files(path, manifest, check_hashes)
    check_external_data(path, ONNX_FILE, set(manifest.files))
    return Bundle(path=path, manifest=manifest)
