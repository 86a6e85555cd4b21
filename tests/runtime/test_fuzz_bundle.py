"""Fuzz bundle.json (issue 18): every node of a real bundle's manifest, walked recursively (so a new field is
covered without a change here), gets wrong types, out-of-range, huge and negative numbers, NaN, empty and huge
strings, paths out of the folder (absolute, `..`, a symbolic link to a file outside), format fields, extra
nesting, removal; then the whole file is damaged. Each mutated bundle is run with `nectar-export run` in this
process (click's CliRunner: the same exit code and stderr as the command line, as a few subprocess runs check),
and each run must end either with an answer (exit 0) or with one `error:` line and exit 2: never a traceback,
within CASE_SECONDS, without changing a file or reading the file outside the folder (its access time, set behind
its modification time, would move), and the whole fuzz within MEMORY_MB more peak memory.

bundle.json is read only through BundleManifest (nectar_runtime.bundle), so a case whose parsed manifest equals
one already run, up to `graph`, `engines` and `source` (export's report, the engine record and the bundle's origin,
which `run` does not read), gives that run's outcome; those cases are not run again, except every RERUN-th, which
must match. What reads the first two (verify's fusion counts, the TensorRT backend's engine lookup) is called on
each of them instead; `source` is verify's, and its fields are strings checked as the file is read.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from nectar_export.cli import main
from nectar_runtime.bundle import BundleManifest, load_bundle
from nectar_runtime.errors import NectarError
from tests.helpers import TIMING, Raw, dump, hostile_copy, mutations

CASE_SECONDS = 5.0
MEMORY_MB = 1024
RERUN = 20
ARGS = ("--prompt", "What is a list?", "--max-new-tokens", "2")
NOT_READ_BY_RUN = ("graph", "engines", "source")
# what must never be accepted: a file entry that leads out of the folder, a template with more than {question}, the
# runtime's numbers made negative, huge or of another type
MUST_REFUSE = re.compile(r"^files: key .* renamed|^template/question: (format spec|attribute field|'')|"
                         r"^(n|first_position|max_new_tokens|layers|kv_heads|head_dim|vocab_size): (-1|10\*\*|null|'x')")


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float = 0.0

    def problem(self) -> str | None:
        """Why this outcome breaks the rules, or None."""
        if "Traceback" in self.err or self.code not in (0, 2):
            return f"exit {self.code}: {self.err[-1500:]}"
        if self.code == 2 and (self.err.count("\n") != 1 or not self.err.startswith("error: ")):
            return f"not one error line: {self.err[-600:]!r}"
        if self.code == 0 and (self.err or not TIMING.match(self.out.strip().splitlines()[-1])):
            return f"an answer without its timing line, or with stderr: {self.out[-300:]!r} {self.err[-300:]!r}"
        if self.seconds > CASE_SECONDS:
            return f"took {self.seconds:.1f} s"
        return None

    def same(self, other: "Outcome") -> bool:
        """The same exit, error line and answer (the timing line's numbers aside)."""
        return (self.code, self.err, self.out.splitlines()[:-1]) == (other.code, other.err, other.out.splitlines()[:-1])


def _timeout(*_: object) -> None:
    raise TimeoutError(f"a case ran past {4 * CASE_SECONDS} s")


def run_in_process(bundle: Path) -> Outcome:
    """`nectar-export run BUNDLE ...` through click's CliRunner, stopped by SIGALRM if it hangs."""
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(int(4 * CASE_SECONDS))
    start = time.perf_counter()
    try:
        result = CliRunner().invoke(main, ["run", str(bundle), *ARGS])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        err += "".join(traceback.format_exception(result.exception))
    return Outcome(result.exit_code, result.stdout, err, time.perf_counter() - start)


def run_subprocess(bundle: Path, edge: bool) -> Outcome:
    """The same run as a program: `nectar-export run` or the edge entry point `python -m nectar_runtime`."""
    command = ["-m", "nectar_runtime", str(bundle)] if edge else ["-m", "nectar_export.cli", "run", str(bundle)]
    done = subprocess.run([sys.executable, *command, *ARGS], capture_output=True, text=True, timeout=120)
    return Outcome(done.returncode, done.stdout, done.stderr)


def parsed_key(document: object) -> str | None:
    """The parsed manifest up to what `run` does not read, or None when it does not parse."""
    try:
        data = BundleManifest.from_json(json.loads(dump(document))).to_json()
    except Exception:                          # refused (or a bug, which the run itself then shows)
        return None
    return json.dumps({k: v for k, v in data.items() if k not in NOT_READ_BY_RUN}, sort_keys=True)


def read_the_rest(bundle: Path) -> str | None:
    """What reads `graph` and `engines`: verify's report of the fusions and ops, the TensorRT backend's engine
    lookup. Each must return or raise a one-line NectarError; what else happens is returned."""
    from nectar_runtime.backends import make_backend

    try:
        loaded = load_bundle(bundle)
        json.dumps({"fusions": loaded.manifest.fusion_counts(), "ops": loaded.manifest.graph.get("op_counts", {})})
        make_backend(loaded, "tensorrt").activate()
    except NectarError as exc:
        return f"a NectarError of several lines: {exc}" if "\n" in str(exc) else None
    except Exception as exc:
        return "".join(traceback.format_exception(exc))[-1500:]
    return None


def summary(problems: list[str], shown: int = 40) -> list[str]:
    """Each problem as its case and its last line (a traceback's exception), one per distinct last line first."""
    lines = [p.split(":", 1)[0] + ": " + p.strip().splitlines()[-1][-200:] for p in problems]
    first = list({line.split(": ", 1)[-1]: line for line in lines}.values())
    return (first + [line for line in lines if line not in first])[:shown]


class Watch:
    """What must not change while a case runs: every file under `root` but `skip` (names, sizes, modification
    times; folders by name), and the access time of `secret`, a file outside the folder that path mutations point
    at."""

    def __init__(self, root: Path, skip: Path, secret: Path):
        self.root, self.skip, self.secret = root, skip, secret
        st = secret.stat()
        shutil.os.utime(secret, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))   # relatime: a read moves it now
        self.before = self.state()

    def state(self) -> tuple:
        files = {str(p.relative_to(self.root)): "folder" if p.is_dir() and not p.is_symlink() else
                 (p.is_symlink(), p.lstat().st_size, p.lstat().st_mtime_ns)
                 for p in self.root.rglob("*") if p != self.skip}
        return files, self.secret.stat().st_atime_ns

    def problem(self) -> str | None:
        now = self.state()
        if now[1] != self.before[1]:
            return f"{self.secret} was read"
        if now[0] != self.before[0]:
            changed = set(now[0].items()) ^ set(self.before[0].items())
            return f"files changed: {sorted(changed)[:4]}"
        return None


@pytest.fixture
def fuzz_bundle(tmp_path, nectar_bundle):
    """A copy of the Nectar bundle, a file outside it holding tokenizer.json's bytes (so a files entry renamed to
    reach it still has the right size and sha256) and a symbolic link in the bundle to that file."""
    return hostile_copy(nectar_bundle, tmp_path, "tokenizer.json")


def test_every_mutation_of_bundle_json_is_an_answer_or_one_error_line(fuzz_bundle, tmp_path):
    bundle, secret, paths = fuzz_bundle
    manifest = bundle / "bundle.json"
    original = json.loads(manifest.read_text())
    baseline = run_in_process(bundle)
    assert baseline.code == 0 and baseline.problem() is None, baseline.err
    watch = Watch(tmp_path, manifest, secret)
    memo, counts = {parsed_key(original): baseline}, dict.fromkeys(("cases", "run", "answers", "memo", "must_refuse"), 0)
    problems: list[str] = []
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    for label, document in mutations(original, paths):
        manifest.write_bytes(dump(document))
        key = parsed_key(document)
        counts["cases"] += 1
        if key in memo and counts["memo"] % RERUN:
            counts["memo"] += 1
            outcome = memo[key]
            if problem := read_the_rest(bundle):
                problems.append(f"{label}: {problem}")
        else:
            outcome = run_in_process(bundle)
            counts["run"] += 1
            if key in memo:
                counts["memo"] += 1
                if not outcome.same(memo[key]):
                    problems.append(f"{label}: differs from the run it was taken for: {outcome.err or outcome.out}")
            elif key is not None:
                memo[key] = outcome
        counts["answers"] += outcome.code == 0
        if MUST_REFUSE.search(label):
            counts["must_refuse"] += 1
            if outcome.code == 0:
                problems.append(f"{label}: accepted")
        for problem in (outcome.problem(), watch.problem()):
            if problem:
                problems.append(f"{label}: {problem}")
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    print(f"bundle.json fuzz: {counts} in {seconds:.1f} s, peak memory +{grown:.0f} MB")
    assert not problems, f"{len(problems)} of {counts['cases']} cases:\n" + "\n".join(summary(problems))
    assert counts["cases"] > 1000 and 0 < counts["answers"] < counts["cases"] and counts["must_refuse"] > 30
    assert grown < MEMORY_MB, f"peak memory grew by {grown:.0f} MB"


def test_the_in_process_runs_say_what_the_programs_say(fuzz_bundle):
    """A refused type, a refused path, a damaged file and an answer: the same exit code and stderr from
    `nectar-export run` and `python -m nectar_runtime` as subprocesses as from the in-process run."""
    bundle, _, paths = fuzz_bundle
    manifest = bundle / "bundle.json"
    original = json.loads(manifest.read_text())
    files = {paths.parent if k == "tokenizer.json" else k: v for k, v in original["files"].items()}
    cases = {"layers": {**original, "layers": -1}, "files": {**original, "files": files},
             "text": Raw("{bundle"), "answer": {**original, "stop_token_ids": []}}
    for i, (name, document) in enumerate(cases.items()):
        manifest.write_bytes(dump(document))
        inside, outside = run_in_process(bundle), run_subprocess(bundle, edge=bool(i % 2))
        assert inside.problem() is None and outside.problem() is None, (name, inside.err, outside.err)
        assert inside.same(outside), (name, inside, outside)
        assert inside.code == (0 if name == "answer" else 2), (name, inside.err)
