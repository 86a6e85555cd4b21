"""The bundle: what the runtime loads. Written by nectar_graphs, read here (no torch needed).

A bundle is a directory:

    bundle.json        manifest (schema below)
    model.onnx         the step graph (+ model.onnx.data when weights pass 2 GB)
    tokenizer.json     the base model's tokenizer (Hugging Face `tokenizers` format)
    context.safetensors   the KV a sequence's past starts with (context_tokens of them): the whole context
                       (full bundles) or the exact tokens (Nectar bundles); absent when there are none
    model.plan         optional TensorRT engine (`nectar-export build`)

bundle.json (format "nectar-bundle/1"):

    kind            "nectar" (document baked into Nectar heads) or "full" (context KV as past input)
    precision       "fp32" | "fp16" | "bf16"; kv_dtype: numpy-style name of the KV I/O type
    n               context tokens; first_position: position of the first new token (= n)
    context_tokens  tokens in context.safetensors (n for full bundles, the exact tokens for Nectar ones);
                    optional: absent means n for full bundles and 0 for Nectar ones (older bundles)
    max_new_tokens  new-token window: positions first_position .. first_position + max_new_tokens - 1
    logits          "last" (logits of the last new token) or "all"
    layers, kv_heads, head_dim, vocab_size
    inputs, outputs [{"name", "dtype", "shape"}], shape entries are ints or axis names
    past            {"key": "past_key_values.{layer}.key", "value": ..., "present_key": "present.{layer}.key",
                     "present_value": ...}: name templates
    template        {"question": str.format text placed after the document: "{question}" marks the user's
                    text, literal braces are doubled}
    stop_token_ids, pad_token_id
    files           {name: {"bytes", "sha256"}} for every file above that is present
    source          {"artifact", "model_fingerprint", "context_sha256", "variant", "code_version"}
    graph           {"opset", "ir_version", "passes": [...], "op_counts": {...}, "lint": {...}}
    engines         {"tensorrt": {"file", "profile", "tensorrt_version"}} once built
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nectar_runtime.errors import BundleError

FORMAT = "nectar-bundle/1"
MANIFEST = "bundle.json"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONTEXT_FILE = "context.safetensors"
ENGINE_FILE = "model.plan"
KINDS = ("nectar", "full")
LAYOUTS = ("dynamic", "static")     # optional key; absent means dynamic
REQUIRED = ("kind", "precision", "kv_dtype", "n", "first_position", "max_new_tokens", "logits", "layers",
            "kv_heads", "head_dim", "vocab_size", "inputs", "outputs", "past", "template", "stop_token_ids",
            "files")


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


@dataclass(frozen=True)
class Bundle:
    """A validated bundle directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.manifest[key]

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def context_tokens(self) -> int:
        """Tokens whose KV the past starts with (context.safetensors): the first slots of a static buffer."""
        default = self.manifest["n"] if self.kind == "full" else 0
        return int(self.manifest.get("context_tokens", default))

    @property
    def static(self) -> bool:
        """Static KV layout: fixed buffers of kv_capacity slots, new tokens written at `cache_position`."""
        return self.manifest.get("cache_layout", "dynamic") == "static"

    def past_names(self) -> list[str]:
        """Past input names in graph order: key_0, value_0, key_1, ..."""
        past = self.manifest["past"]
        return [past[kv].format(layer=i) for i in range(self.manifest["layers"]) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        past = self.manifest["past"]
        return [past[kv].format(layer=i) for i in range(self.manifest["layers"])
                for kv in ("present_key", "present_value")]

    def prompt_text(self, question: str) -> str:
        """The text after the document for a question: the template is a str.format string (literal braces
        doubled, as the exporter writes it), filled exactly as nectar_export.samples.question_ids does."""
        template = self.manifest["template"]["question"]
        try:
            return template.format(question=question)
        except (KeyError, IndexError, ValueError) as exc:
            raise BundleError(f"bundle.json's question template {template!r} is not a format string with only "
                              f"{{question}} ({exc}); re-export the bundle") from None


def load_bundle(path: str | Path, check_hashes: bool = False) -> Bundle:
    """Read bundle.json and check format, required keys and every listed file (size, optionally sha256)."""
    path = Path(path).expanduser()
    file = path / MANIFEST
    if not file.is_file():
        raise BundleError(f"{path} is not a bundle (no {MANIFEST}); create one with `nectar-export export`")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{file} is not valid JSON ({exc}); re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{file} has format {found!r}; this runtime reads {FORMAT!r}")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise BundleError(f"{file} lacks {', '.join(missing)}; re-export the bundle")
    if manifest["kind"] not in KINDS:
        raise BundleError(f"{file}: unknown kind {manifest['kind']!r} (expected one of {KINDS})")
    if manifest.get("cache_layout", "dynamic") not in LAYOUTS:
        raise BundleError(f"{file}: unknown cache_layout {manifest['cache_layout']!r} (expected one of {LAYOUTS})")
    for name, entry in manifest["files"].items():
        target = path / name
        if not target.is_file():
            raise BundleError(f"bundle file {target} is missing; re-export the bundle")
        size = target.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(f"bundle file {target} has {size} bytes, bundle.json says {entry['bytes']}: "
                              "it is damaged or was replaced; re-export the bundle")
        if check_hashes and sha256_file(target) != entry["sha256"]:
            raise BundleError(f"bundle file {target} does not match its sha256 in bundle.json; re-export the bundle")
    bundle = Bundle(path=path, manifest=manifest)
    for needed in (ONNX_FILE, TOKENIZER_FILE) + ((CONTEXT_FILE,) if bundle.context_tokens else ()):
        if needed not in manifest["files"]:
            raise BundleError(f"{file} does not list {needed}; re-export the bundle")
    return bundle
