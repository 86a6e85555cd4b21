"""GPU decode latency and fitting speed at the paper's model scale (issue 5), on one NVIDIA GPU.

For a model shape built in code with random weights (`gpu_reference.SHAPES`: speed does not depend on the
values) and every context length n of `--ns`, this script runs stages, each skipped when its output is
already under `--work` (so a run cut short by a time limit resumes where it stopped):

  checkpoint  the random-weight model saved as a float32 safetensors checkpoint, with the tokenizer of
              `--tokenizer` (the default model's; its ids are a subset of the shape's vocabulary)
  fit         `run_fit(..., device="cuda")` with heads of `--head-params` per layer and KV-head at every n
              (`--recipe default` is the full recipe whose per-stage times answer "how long does fitting
              take"; `--recipe quick` only makes heads of the right shape for the decode benchmark)
  export      a Nectar bundle and a full-attention baseline bundle per n (`--precision`, context prefilled
              on the GPU, graph traced on the CPU); `--jobs N` runs N exports at once in child processes,
              beside the fits, and measures each n as soon as its bundles exist
  measure     one fresh subprocess per (engine, n), each the GPU's only user:
                nectar_ort_cuda / full_ort_cuda: `bench/decode_latency.py --child --backend ort-cuda`
                hf_static: transformers' own decode with a StaticCache and SDPA (`gpu_reference`)
                nectar_ort_fused / full_ort_fused: the same on `export --ops ort` bundles (graphs/fused.py:
                GroupQueryAttention, SkipSimplifiedLayerNormalization, the heads without carried columns); the
                fused Nectar graph takes one token per call, so its prefill_ms is the question fed token by token
                nectar_ort_int4: the portable Nectar graph with `--precision int4` (MatMulNBits base weights,
                fp16 heads), measured like nectar_ort_cuda; its floor is the int4 bytes a step reads
              plus, in this process, the device-to-device copy bandwidth and the floor: the model's weight
              bytes (in the bundle's precision) streamed once at that bandwidth.

`run` calls one function per stage (stage_checkpoint, stage_fit, stage_export and collect_exports,
stage_measure, stage_floor) on a `Job`: the flags, the paths under --work, and the `State` saved to
WORK/<shape>-state.json after every step.

The context is the Python reference manual repeated until it holds the largest n (a random-weight model
does not care what it reads). Rows: {"engine", "n", "ms_per_token", "prefill_ms", "device_mem_mb"}, where
device_mem_mb is the GPU memory in use at the end of the measured pass minus what was in use before the
engine's process started (nvidia-smi, so the CUDA context and allocator caches count, the same way for
every engine). Writes OUT/<shape>.json and OUT/<shape>.png.

    python bench/gpu_decode.py --shape qwen3-1.7b --ns 4096,32768,131072 --work /tmp/gpu --out bench/results

The fused rows on the H200 (issue 15 parts 1-2; one device call, resumable: a second call skips what exists):
    NECTAR_TIMEOUT=580 bash bench/h200.sh --shape qwen3-1.7b --ns 4096,32768,131072 --full-ns 4096,32768,131072 \
        --engines nectar_ort_fused,full_ort_fused,nectar_ort_cuda,full_ort_cuda --recipe quick --timed-n 0 \
        --jobs 4 --work /tmp/ng
then the kernel trace of the fused steps beside the old one (bench/results/step_trace.json):
    python3 bench/step_trace.py /tmp/ng/qwen3-1.7b-nectar-fused-4096 /tmp/ng/qwen3-1.7b-full-fused-4096 \
        /tmp/ng/qwen3-1.7b-nectar-fused-131072 --name step_trace_fused --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import gpu_reference        # bench/gpu_reference.py and bench/harness.py: found beside this script
import harness

ENGINES = ("nectar_ort_cuda", "full_ort_cuda", "nectar_ort_fused", "full_ort_fused", "nectar_ort_int4", "hf_static")
# engine -> (bundle kind, --ops) of the bundles it measures; hf_static runs the checkpoint itself
BUNDLE_ENGINES = {"nectar_ort_cuda": ("nectar", "portable"), "full_ort_cuda": ("full", "portable"),
                  "nectar_ort_fused": ("nectar-fused", "ort"), "full_ort_fused": ("full-fused", "ort"),
                  "nectar_ort_int4": ("nectar-int4", "portable")}
OPTIONAL_ENGINES = ("nectar_ort_fused", "full_ort_fused", "nectar_ort_int4")   # bundles made only when named
# bits a weight of an int4 product takes: 4-bit codes, an fp16 scale and a 4-bit zero point per block of 32
INT4_BITS = 4 + 16 / 32 + 4 / 32
STAGES = ("checkpoint", "fit", "export", "measure")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
# --recipe NAME -> the FitConfig recipe and the fields on top. This script's "quick" has always meant heads of
# the right shape and nothing more (FitConfig's "shape" recipe), not `fit --quick`; neither fits the ablations.
RECIPES = {"default": ("default", {"ablations": False}), "quick": ("shape", {})}
FIT_KEYS = ("seconds", "fit_seconds", "nectar_params", "samples")     # what the state keeps of run_fit's metrics


def log(message: str) -> None:
    print(f"[gpu] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# -- stages ------------------------------------------------------------------------------------------


def make_checkpoint(shape: str, tokenizer: Path, folder: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Save the shape's random-weight model (float32) and the tokenizer files as a checkpoint folder."""
    import torch

    config = gpu_reference.make_config(shape, **overrides)
    model = gpu_reference.random_model(config, torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, tmp / name)
    os.replace(tmp, folder)
    return {"params": sum(p.numel() for p in model.parameters()),
            "weight_bytes_fp32": gpu_reference.weight_bytes(model)}


def context_file(work: Path, tokens_needed: int) -> Path:
    """The reference manual repeated enough times for `tokens_needed` tokens (~4 characters per token)."""
    from nectar_export.context import load_document

    text = load_document("default").text
    copies = max(1, -(-tokens_needed * 4 // len(text)) + 1)
    path = work / f"context-x{copies}.txt"
    if not path.is_file():
        path.write_text("\n\n".join([text] * copies), encoding="utf-8")
    return path


def fit_config(checkpoint: Path, context: Path, n: int, head_params: int, recipe: str, reserve: int):
    """The FitConfig of `--recipe recipe` (RECIPES) for the checkpoint and context at n."""
    from nectar_export.config import FitConfig

    name, extra = RECIPES[recipe]
    return FitConfig.recipe(name, model=str(checkpoint), context=str(context), context_tokens=n,
                            head_params=head_params, reserve=reserve, **extra)


def fit_one(checkpoint: Path, context: Path, n: int, head_params: int, recipe: str, reserve: int,
            out: Path, device: str) -> dict[str, Any]:
    from nectar_export.fit import run_fit

    return run_fit(fit_config(checkpoint, context, n, head_params, recipe, reserve), out, device=device)


def export_one(artifact: Path, out: Path, baseline: bool, precision: str, cache: str, device: str,
               ops: str = "portable") -> dict[str, Any]:
    from nectar_export.export import ExportConfig, run_export

    manifest = run_export(ExportConfig(artifact=artifact, output=out, precision=precision, baseline=baseline,
                                       device=device, cache="static" if ops == "ort" else cache, ops=ops))
    return {"export_seconds": manifest.graph["export_seconds"], "weight_bytes": manifest.graph["weight_bytes"],
            "bytes": {k: v.bytes for k, v in manifest.files.items()}}


class Exports:
    """Export subprocesses, at most `jobs` at a time, so the exports' CPU work (tracing, folding, writing:
    minutes each at 1.7B) overlaps the fits and each other instead of queueing behind them."""

    def __init__(self, jobs: int, args: argparse.Namespace):
        import threading

        self.jobs, self.args = jobs, args
        self.queued: list[tuple[str, list[str]]] = []
        self.running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
        self.finished: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._keep_polling, daemon=True).start()   # queued exports start during fits

    def _keep_polling(self) -> None:
        while True:
            time.sleep(2)
            self.poll()

    def submit(self, artifact: Path, out: Path, baseline: bool, ops: str = "portable",
               precision: str | None = None) -> None:
        cmd = harness.python_cmd(__file__, "--export-child", artifact, "--bundle", out, "--precision",
                                 precision or self.args.precision, "--cache", self.args.cache, "--device",
                                 self.args.device,
                                 "--ops", ops)
        with self.lock:
            self.queued.append((out.name, cmd + (["--baseline"] if baseline else [])))
        self.poll()

    def poll(self) -> None:
        with self.lock:
            self._poll()

    def _poll(self) -> None:
        """Collect finished exports and start queued ones while there is room."""
        for name, (proc, start, log_path) in list(self.running.items()):
            if proc.poll() is None:
                continue
            del self.running[name]
            try:
                self.finished[name] = harness.last_json(harness.check_child(
                    proc.returncode, log_path.read_text(errors="replace")))
                log(f"export {name}: {time.perf_counter() - start:.1f} s")
            except harness.ChildError as exc:
                self.finished[name] = {"error": f"exit {exc.returncode}: {str(exc)[:1500]}"}
                log(f"export {name} FAILED: {self.finished[name]['error']}")
        threads = str(max(1, (os.cpu_count() or 2) // max(1, self.jobs)))
        while self.queued and len(self.running) < self.jobs:
            name, cmd = self.queued.pop(0)
            log_path = self.args.work / f"{name}.export.log"
            env = {**os.environ, "OMP_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
            with log_path.open("w") as handle:
                proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
            self.running[name] = (proc, time.perf_counter(), log_path)
            log(f"export {name} started ({len(self.running)} running, {len(self.queued)} queued)")

    def wait(self, names: set[str]) -> dict[str, dict[str, Any]]:
        """Block until none of `names` is queued or running; their results (or {"error": ...})."""
        while True:
            with self.lock:
                if not names & ({n for n, _ in self.queued} | set(self.running)):
                    return {n: self.finished.pop(n) for n in names if n in self.finished}
            time.sleep(2)


def disk_plan(shape: str, overrides: dict[str, Any], ns: list[int], full_ns: set[int], precision: str,
              head_params: int, tokenizer: Path, work: Path, checkpoint: Path | None, fused: Sequence[str] = (),
              reserve: int = 512) -> dict[str, int]:
    """Bytes the missing checkpoint (None: not made by this run) and bundles will take under --work.

    The checkpoint is float32; a bundle holds the weights in `precision` (each parameter once), the tokenizer,
    and for Nectar the heads (`head_params` per layer and KV-head), for full attention the context's KV. The
    heads' share is low: a Qwen3-1.7B Nectar bundle at 131,072 parameters per head was 4% over this estimate
    (its head weights are padded, their biases and norms kept in float32), hence check_disk's margin. `fused`
    names the optional kinds made too: "nectar-fused", "full-fused" (the same plus their rotary caches), and
    "nectar-int4" (int4_weight_bytes, the tied table's fp16 copy for the embedding, fp16 heads).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from nectar_export.export import TORCH_DTYPES

    config = gpu_reference.make_config(shape, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    width = TORCH_DTYPES[precision].itemsize
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    files = [tokenizer / name for name in TOKENIZER_FILES if (tokenizer / name).is_file()]
    extra = 0                                    # a bundle's tokenizer.json is the same JSON without spaces
    if (tokenizer / "tokenizer.json").is_file():
        text = json.loads((tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
        extra = len(json.dumps(text, separators=(",", ":"), ensure_ascii=False).encode())
    plan = {}
    if checkpoint is not None and not (checkpoint / "config.json").is_file():
        plan[checkpoint.name] = params * 4 + sum(f.stat().st_size for f in files)
    for n in ns:
        kinds = {"nectar": head_params * layers * kv_heads * width}
        if n in full_ns:
            kinds["full"] = 2 * layers * kv_heads * head_dim * n * width
        rotary = (n + reserve) * head_dim * width                # a fused graph's cos and sin caches
        for kind in [k for k in kinds if f"{k}-fused" in fused]:
            kinds[f"{kind}-fused"] = kinds[kind] + rotary
        sizes = {kind: params * width + own + extra for kind, own in kinds.items()}
        if "nectar-int4" in fused:
            table = model.get_input_embeddings().weight
            tied = table is model.get_output_embeddings().weight
            sizes["nectar-int4"] = (int4_weight_bytes(model) + (table.numel() - table.shape[1]) * 2 * tied
                                    + head_params * layers * kv_heads * 2 + extra)
        for kind, size in sizes.items():
            bundle = work / f"{shape}-{kind}-{n}"
            if not (bundle / "bundle.json").is_file():
                plan[bundle.name] = size
    return plan


def check_disk(plan: dict[str, int], free: int, work: Path) -> None:
    """Refuse a run whose checkpoint and bundles would not fit under --work, before any of them is made."""
    need = sum(plan.values())
    if need > 0.9 * free:                        # the estimate's error, logs, state files, the context text
        parts = ", ".join(f"{name} {size / 1e9:.1f} GB" for name, size in plan.items())
        raise SystemExit(f"error: this run writes {need / 1e9:.1f} GB under {work} ({parts}) and only "
                         f"{free / 1e9:.1f} GB is free there; use fewer --ns / --full-ns, or a larger disk")


def release_device_memory() -> None:
    """Hand this process's cached device memory back after a fit. PyTorch's allocator keeps what a fit used
    (137.9 GiB after the 128K fit on the H200): export children started next then fail with out-of-memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_engine(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """A measuring child; its last stdout line is its JSON row. Memory is counted from before it started."""
    base = harness.gpu_mem_used_mb()
    row = harness.run_json_child(cmd, env)
    row["device_mem_mb"] = round(row.get("device_mem_mb", base) - base, 1)
    return row


def measure_bundle(bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    """ort-cuda on one bundle; a static bundle also without its CUDA graph (the row is the faster, both kept)."""
    cmd = harness.python_cmd(harness.BENCH / "decode_latency.py", "--child", bundle, "--backend", "ort-cuda",
                             "--tokens", args.tokens, "--warmup", args.warmup, "--prompt-tokens", args.prompt_tokens)
    from nectar_runtime.bundle import read_manifest

    static = read_manifest(bundle).static
    runs = []
    for extra in ([[], ["--no-cuda-graph"]] if static else [[]]):
        try:
            runs.append(run_engine(cmd + extra))
        except harness.ChildError as exc:
            runs.append({"cuda_graph": not extra, "error": str(exc)[:500]})
    done = [r for r in runs if "ms_per_token" in r]
    if not done:
        raise RuntimeError("; ".join(r["error"] for r in runs))
    row = {**min(done, key=lambda r: r["ms_per_token"]), "variants": runs}
    if args.profile:             # ORT's trace needs the step run node by node: no CUDA graph, a run of its own
        try:
            traced = run_engine(cmd + ["--no-cuda-graph", "--profile", str(args.work / f"{bundle.name}-profile")])
            row["profile"] = {"ms_per_token": traced["ms_per_token"], **traced.get("profile", {})}
        except harness.ChildError as exc:
            row["profile"] = {"error": str(exc)[:500]}
    return row


def measure_hf(checkpoint: Path, artifact: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Eager, and with --compile also compiled (its own process); the row is the faster, both are kept."""
    runs = []
    for compiled in ([False, True] if args.compile else [False]):
        cmd = harness.python_cmd(__file__, "--hf-child", checkpoint, "--artifact", artifact, "--precision",
                                 args.precision, "--tokens", args.tokens, "--warmup", args.warmup, "--prompt-tokens",
                                 args.prompt_tokens, *(["--compile"] if compiled else []))
        try:
            runs.append(run_engine(cmd))
        except harness.ChildError as exc:
            if not compiled:
                raise
            runs.append({"compiled": True, "error": str(exc)[:500]})
    best = min((r for r in runs if "ms_per_token" in r), key=lambda r: r["ms_per_token"])
    return {**best, "variants": runs}


def hf_child(args: argparse.Namespace) -> dict[str, Any]:
    """transformers' static-cache decode of the checkpoint after the artifact's context (this process only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from nectar_export.artifact import read_heldout
    from nectar_export.export import TORCH_DTYPES

    dtype = TORCH_DTYPES[args.precision]
    model = AutoModelForCausalLM.from_pretrained(args.hf_child, dtype=dtype, attn_implementation="sdpa",
                                                 local_files_only=True, trust_remote_code=False).to("cuda").eval()
    context = list(read_heldout(args.artifact).context_ids)
    prompt = [(17 * i + 11) % 30000 + 100 for i in range(args.prompt_tokens)]   # any ids: weights are random
    row = gpu_reference.hf_static_decode(model, context, prompt, args.tokens, args.warmup, compile=args.compile)
    return {**row, "n": len(context), "device_mem_mb": harness.gpu_mem_used_mb(),
            "allocated_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


# -- the run's state ---------------------------------------------------------------------------------


@dataclass
class State:
    """What the runs under --work have done: WORK/<shape>-state.json, saved after every step, so a run cut short
    resumes where it stopped (finished stages and measured rows are skipped). Keys as saved: rows, fit, export,
    errors, shape, gpu, settings, and disk_plan, checkpoint and floor once made."""

    rows: list[dict[str, Any]] = field(default_factory=list)          # one per (engine, n), as measured
    fit: dict[str, dict[str, Any]] = field(default_factory=dict)      # str(n) -> recipe, seconds, params, samples
    export: dict[str, dict[str, Any]] = field(default_factory=dict)   # bundle name -> export_one's result
    errors: list[dict[str, str]] = field(default_factory=list)        # {"step", "error"} of every failed step
    shape: str = ""
    gpu: str = ""
    settings: dict[str, Any] = field(default_factory=dict)            # the latest run's flags
    disk_plan: dict[str, int] | None = None
    checkpoint: dict[str, Any] | None = None                          # make_checkpoint's result
    floor: dict[str, Any] | None = None                               # floor()'s result

    @classmethod
    def load(cls, path: Path) -> "State":
        """The state saved at `path`; a fresh one when there is none."""
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def save(self, path: Path) -> None:
        """Write the state through a temp file and a rename (what is not made yet is left out)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in asdict(self).items() if v is not None}, indent=2))
        os.replace(tmp, path)

    def add_row(self, row: dict[str, Any]) -> None:
        """Keep `row`, in place of an earlier one of the same engine and n."""
        self.rows = [r for r in self.rows if (r["engine"], r["n"]) != (row["engine"], row["n"])] + [row]


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class Job:
    """One run of this script: its flags and what they pick, the paths under --work, and the state."""

    args: argparse.Namespace
    state: State
    ns: list[int]                           # --ns, in order
    full_ns: set[int]                       # the n that also get a full-attention bundle
    stages: set[str]
    overrides: dict[str, Any]               # --overrides, for the shape's config
    context: Path | None = None             # the context text, written before the first fit
    exports: Exports | None = None          # the export processes, with --jobs > 1

    @classmethod
    def start(cls, args: argparse.Namespace) -> "Job":
        """The folders made, the state loaded and stamped with this run's shape, GPU and flags."""
        import torch

        args.work.mkdir(parents=True, exist_ok=True)
        args.out.mkdir(parents=True, exist_ok=True)
        ns = [int(n) for n in args.ns.split(",")]
        job = cls(args=args, state=State.load(args.work / f"{args.shape}-state.json"), ns=ns,
                  full_ns={int(n) for n in args.full_ns.split(",")} if args.full_ns else set(ns),
                  stages=set(args.stages.split(",")), overrides=json.loads(args.overrides))
        job.state.shape = args.shape
        job.state.gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        job.state.settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                              if k != "hf_child"}
        return job

    @property
    def checkpoint(self) -> Path:
        return self.args.work / f"{self.args.shape}-ckpt"

    def artifact(self, n: int) -> Path:
        return self.args.work / f"{self.args.shape}-art-{n}"

    @property
    def engines(self) -> list[str]:
        return self.args.engines.split(",")

    def bundles(self, n: int) -> dict[str, Path]:
        """The bundle folder of each ort-cuda engine that --engines names, at n (full attention only at the full n)."""
        out = {}
        for engine, (kind, ops) in BUNDLE_ENGINES.items():
            if (kind.startswith("full") and n not in self.full_ns) or engine not in self.engines:
                continue
            out[engine] = self.args.work / f"{self.args.shape}-{kind}-{n}"
        return out

    def save(self) -> None:
        self.state.save(self.args.work / f"{self.args.shape}-state.json")

    def attempt(self, name: str, fn: Callable[[], Any]) -> Any:
        """fn's result; on failure None, the error recorded (later stages of other n may still run). Saves."""
        log(name)
        start = time.perf_counter()
        try:
            result = fn()
            log(f"{name}: {time.perf_counter() - start:.1f} s")
            return result
        except Exception as exc:                 # recorded in the JSON: a partial run still reports
            self.state.errors.append({"step": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            log(f"{name} FAILED: {exc}")
            return None
        finally:
            self.save()


def is_artifact(path: Path) -> bool:
    return (path / "nectar.json").is_file()


def is_bundle(path: Path) -> bool:
    return (path / "bundle.json").is_file()


def plan_disk(job: Job) -> None:
    """Refuse, before any stage runs, a run whose checkpoint and bundles would not fit under --work."""
    if not job.stages & {"checkpoint", "export"}:
        return
    a = job.args
    fused = [BUNDLE_ENGINES[e][0] for e in job.engines if e in OPTIONAL_ENGINES]
    plan = disk_plan(a.shape, job.overrides, job.ns if "export" in job.stages else [], job.full_ns, a.precision,
                     a.head_params, a.tokenizer, a.work, job.checkpoint if "checkpoint" in job.stages else None,
                     fused, a.reserve)
    wanted = {job.checkpoint.name} | {out.name for n in job.ns for out in job.bundles(n).values()}
    plan = {name: size for name, size in plan.items() if name in wanted}      # the bundles --engines asks for
    job.state.disk_plan = plan
    check_disk(plan, shutil.disk_usage(a.work).free, a.work)


def stage_checkpoint(job: Job) -> None:
    """The random-weight checkpoint, unless it exists."""
    if "checkpoint" in job.stages and not (job.checkpoint / "config.json").is_file():
        a = job.args
        job.state.checkpoint = job.attempt("checkpoint", lambda: make_checkpoint(a.shape, a.tokenizer, job.checkpoint,
                                                                                 job.overrides))


def stage_fit(job: Job, n: int) -> None:
    """The artifact at n, unless it exists: --recipe at --timed-n, quick at every other n."""
    if "fit" not in job.stages or is_artifact(job.artifact(n)):
        return
    a = job.args
    recipe = a.recipe if n == a.timed_n else "quick"
    result = job.attempt(f"fit n={n} ({recipe})", lambda: fit_one(job.checkpoint, job.context, n, a.head_params, recipe,
                                                                  a.reserve, job.artifact(n), a.device))
    if result is not None:
        job.state.fit[str(n)] = {"recipe": recipe, **{k: result[k] for k in FIT_KEYS}}
    release_device_memory()


def stage_export(job: Job, n: int) -> None:
    """Each missing bundle of n: exported in this process, or handed to the export processes (--jobs > 1)."""
    if "export" not in job.stages or not is_artifact(job.artifact(n)):
        return
    a = job.args
    for engine, out in job.bundles(n).items():
        kind, ops = BUNDLE_ENGINES[engine]
        baseline = kind.startswith("full")
        precision = "int4" if kind.endswith("int4") else a.precision
        if is_bundle(out):
            continue
        if job.exports is not None:
            job.exports.submit(job.artifact(n), out, baseline, ops, precision)
            continue
        result = job.attempt(f"export {out.name}", lambda: export_one(job.artifact(n), out, baseline, precision,
                                                                        a.cache, a.device, ops))
        if result is not None:
            job.state.export[out.name] = result


def collect_exports(job: Job, n: int) -> None:
    """Wait for the export processes of n's bundles (--jobs > 1) and record what each did."""
    if job.exports is None:
        return
    for name, result in job.exports.wait({out.name for out in job.bundles(n).values()}).items():
        if "error" in result:
            job.state.errors.append({"step": f"export {name}", "error": result["error"]})
        else:
            job.state.export[name] = result
    job.save()


def stage_measure(job: Job, n: int) -> None:
    """A row for each engine at n that has what it needs and no row yet (every engine with --remeasure)."""
    if "measure" not in job.stages:
        return
    done = set() if job.args.remeasure else {(r["engine"], r["n"]) for r in job.state.rows}
    for engine in job.engines:
        if (engine, n) in done:                           # a resumed run keeps what it measured
            continue
        # exports still running beside this measurement (CPU work only; recorded with the row)
        busy = {"concurrent_exports": len(job.exports.running) if job.exports is not None else 0}
        row = measure_engine(job, engine, n)
        if row is not None:
            job.state.add_row({**row, **busy})


def measure_engine(job: Job, engine: str, n: int) -> dict[str, Any] | None:
    """One engine's row at n; None when it has nothing to measure yet or its measurement failed (recorded)."""
    if engine == "hf_static":
        if not (job.artifact(n) / "heldout.json").is_file():
            return None
        row = job.attempt(f"measure hf_static n={n}", lambda: measure_hf(job.checkpoint, job.artifact(n), job.args))
        return None if row is None else {**row, "engine": engine, "n": n}
    bundle = job.bundles(n).get(engine)
    if bundle is None or not is_bundle(bundle):
        return None
    row = job.attempt(f"measure {engine} n={n}", lambda: measure_bundle(bundle, job.args))
    return None if row is None else {**row, "engine": engine}


def stage_floor(job: Job) -> None:
    """The weight-streaming floor, with every measurement."""
    if "measure" in job.stages:
        job.state.floor = job.attempt("floor", lambda: floor(job.checkpoint, job.args.precision))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage for every n, each skipped where its output exists; then the report."""
    job = Job.start(args)
    plan_disk(job)
    stage_checkpoint(job)
    job.context = context_file(args.work, max(job.ns) + 65536)     # room for continuation samples past the context
    job.exports = Exports(args.jobs, args) if args.jobs > 1 else None
    if args.timed_n in job.ns:
        stage_fit(job, args.timed_n)                                # the number the issue asks for, first
    for n in job.ns:
        stage_fit(job, n)
        stage_export(job, n)
        if job.exports is None:
            stage_measure(job, n)
    if job.exports is not None:
        for n in job.ns:                                            # each n as soon as its bundles are written
            collect_exports(job, n)
            stage_measure(job, n)
    stage_floor(job)
    report = write_report(job.state, args.out / f"{args.shape}.json", args.out / f"{args.shape}.png")
    job.save()
    return report


def floor(checkpoint: Path, precision: str) -> dict[str, Any]:
    """The bytes a decode step must read (gpu_reference.weight_bytes, in `precision`) over the copy bandwidth."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nectar_export.export import TORCH_DTYPES

    dtype = TORCH_DTYPES[precision]
    with torch.device("meta"):
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    nbytes = gpu_reference.weight_bytes(model)
    bandwidth = gpu_reference.copy_bandwidth("cuda")
    int4 = int4_weight_bytes(model)
    return {"weight_bytes": nbytes, "bandwidth": bandwidth,
            "floor_ms": round(gpu_reference.floor_ms(nbytes, bandwidth["gb_per_s"]), 4),
            "int4_weight_bytes": int4, "int4_floor_ms": round(gpu_reference.floor_ms(int4, bandwidth["gb_per_s"]), 4)}


def int4_weight_bytes(model: Any) -> int:
    """Bytes an int4 step reads (graphs/int4.py's layout): every nn.Linear of the decoder and lm_head at INT4_BITS
    a weight, everything else at 2 bytes (gpu_reference.weight_bytes's rule for the embedding: a tied one is read
    as lm_head's int4 product plus one fp16 row, an untied one as one row)."""
    import torch

    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    embedding = model.get_input_embeddings().weight
    total = 0
    for p in model.parameters():                              # parameters() skips shared tensors
        total += p.numel() * INT4_BITS / 8 if id(p) in linear else p.numel() * 2
    if embedding is model.get_output_embeddings().weight:
        total += embedding.shape[1] * 2                       # the Gather's fp16 row
    else:
        total -= (embedding.shape[0] - 1) * embedding.shape[1] * 2
    return int(total)


ROW_KEYS = ("engine", "n", "ms_per_token", "prefill_ms", "device_mem_mb")


def write_report(state: State, json_path: Path, png: Path) -> dict[str, Any]:
    """OUT/<shape>.json (the rows with ROW_KEYS only, sorted by engine and n; every measured run beside them)
    and its PNG."""
    rows = sorted(({k: r[k] for k in ROW_KEYS} for r in state.rows),
                  key=lambda r: (ENGINES.index(r["engine"]), r["n"]))
    floor_ms = (state.floor or {}).get("floor_ms")
    report = {"shape": state.shape, "gpu": state.gpu, "rows": rows, "floor_ms": floor_ms, "floor": state.floor,
              "fit": state.fit, "export": state.export, "checks": checks(rows, floor_ms), "errors": state.errors,
              "settings": state.settings, "runs": state.rows}
    if int4 := int4_checks(rows, (state.floor or {}).get("int4_floor_ms")):
        report["checks"]["int4"] = int4
    json_path.write_text(json.dumps(report, indent=2))
    plot_report(report, png)
    return report


def plot_report(report: dict[str, Any], png: Path) -> None:
    """The PNG of a report; skipped with a note where matplotlib is absent (the H200 host has none)."""
    if not report["rows"]:
        return
    try:
        gpu_reference.plot_rows(report["rows"], report["floor_ms"],
                                f"{report['shape']} (random weights), {report['gpu']}, batch 1", png)
    except ImportError:
        log(f"matplotlib is not installed: no {png.name}; run --replot {png.with_suffix('.json')} elsewhere")


def checks(rows: list[dict[str, Any]], floor_ms: float | None) -> dict[str, Any]:
    """The issue's ratios, from whatever rows exist (the fused rows' in `fused`, see fused_checks)."""
    at = {(r["engine"], r["n"]): r["ms_per_token"] for r in rows}
    nectar = sorted(n for e, n in at if e == "nectar_ort_cuda")
    out: dict[str, Any] = {}
    if len(nectar) >= 2:
        lo, hi = nectar[0], nectar[-1]
        out["nectar_large_over_small"] = {"n_small": lo, "n_large": hi,
                                          "ratio": round(at["nectar_ort_cuda", hi] / at["nectar_ort_cuda", lo], 4)}
    for other in ("full_ort_cuda", "hf_static"):
        common = [n for n in nectar if (other, n) in at]
        if common:
            n = common[-1]
            out[f"{other}_over_nectar"] = {"n": n, "ratio": round(at[other, n] / at["nectar_ort_cuda", n], 3)}
    if floor_ms and nectar:
        out["nectar_over_floor"] = {n: round(at["nectar_ort_cuda", n] / floor_ms, 3) for n in nectar}
    if fused := fused_checks(at, floor_ms):
        out["fused"] = fused
    return out


def int4_checks(rows: list[dict[str, Any]], floor_ms: float | None) -> dict[str, Any]:
    """The int4 row against its own floor (the int4 bytes a step reads) and against the fp16 Nectar row."""
    at = {(r["engine"], r["n"]): r["ms_per_token"] for r in rows}
    ns = sorted(n for e, n in at if e == "nectar_ort_int4")
    out: dict[str, Any] = {}
    if ns and floor_ms:
        out["over_int4_floor"] = {n: round(at["nectar_ort_int4", n] / floor_ms, 3) for n in ns}
    if ratios := {n: round(at["nectar_ort_cuda", n] / at["nectar_ort_int4", n], 3) for n in ns
                  if ("nectar_ort_cuda", n) in at}:
        out["fp16_over_int4"] = ratios
    return out


def fused_checks(at: dict[tuple[str, int], float], floor_ms: float | None) -> dict[str, Any]:
    """Issue 15's acceptance ratios for the fused rows: Nectar over the floor at every n and its largest over
    smallest n, fused full attention over fused Nectar at every common n, and fused over the portable graphs."""
    nectar = sorted(n for e, n in at if e == "nectar_ort_fused")
    out: dict[str, Any] = {}
    if not nectar:
        return out
    if floor_ms:
        out["nectar_over_floor"] = {n: round(at["nectar_ort_fused", n] / floor_ms, 3) for n in nectar}
    if len(nectar) >= 2:
        out["nectar_large_over_small"] = round(at["nectar_ort_fused", nectar[-1]] / at["nectar_ort_fused", nectar[0]], 4)
    for other, key in (("full_ort_fused", "full_over_nectar"), ("nectar_ort_cuda", "portable_nectar_over_fused")):
        ratios = {n: round(at[other, n] / at["nectar_ort_fused", n], 3) for n in nectar if (other, n) in at}
        if ratios:
            out[key] = ratios
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(gpu_reference.SHAPES), default="qwen3-1.7b")
    p.add_argument("--ns", default="4096,32768,131072", help="Context lengths, comma-separated, run in this order.")
    p.add_argument("--full-ns", default=None, help="Lengths that also get a full-attention bundle [default: all].")
    p.add_argument("--cache", choices=("static", "dynamic"), default="static",
                   help="KV layout of the bundles: static (in-place buffers, CUDA-graph decode) or dynamic.")
    p.add_argument("--work", type=Path, default=Path("/tmp/nectar-gpu"), help="Checkpoints, artifacts, bundles.")
    p.add_argument("--out", type=Path, default=harness.RESULTS, help="Folder for <shape>.json and <shape>.png.")
    p.add_argument("--tokenizer", type=Path, help="Folder with tokenizer.json (+ tokenizer_config.json, template).")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--head-params", type=int, default=131072,
                   help="Head parameters per layer and KV-head at every n (131072: the default 1/8 budget at 4K).")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="default",
                   help="Fitting recipe at --timed-n (quick: heads of the right shape only).")
    p.add_argument("--timed-n", type=int, default=32768, help="The n fitted with --recipe; other n use quick.")
    p.add_argument("--reserve", type=int, default=512, help="New-token positions after the context.")
    p.add_argument("--precision", choices=("fp16", "bf16", "fp32", "int4"), default="fp16",
                   help="Of the bundles (nectar_ort_int4's are always int4).")
    p.add_argument("--device", default="cuda", help="Where fit and export's prefill run (measure needs a GPU).")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="torch.compile the hf_static decode step.")
    p.add_argument("--overrides", default="{}", help="JSON config overrides for the shape (tests make it tiny).")
    p.add_argument("--remeasure", action="store_true", help="Measure again rows a resumed run already has.")
    p.add_argument("--jobs", type=int, default=1,
                   help="Exports running at once, each its own process (1: one after another, in this process).")
    p.add_argument("--profile", action="store_true",
                   help="Also profile each bundle's step node by node (ORT trace, without the CUDA graph).")
    p.add_argument("--replot", type=Path, help="Only redraw the PNG beside this report JSON.")
    p.add_argument("--hf-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--export-child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ops", choices=("portable", "ort"), default="portable", help=argparse.SUPPRESS)
    p.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.hf_child:
        print(json.dumps(hf_child(args)))
        return 0
    if args.export_child:
        print(json.dumps(export_one(args.export_child, args.bundle, args.baseline, args.precision, args.cache,
                                    args.device, args.ops)))
        return 0
    if args.replot:
        plot_report(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    report = run(args)
    print(json.dumps({k: report[k] for k in ("shape", "gpu", "rows", "floor_ms", "checks", "errors")}, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
