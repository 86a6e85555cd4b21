"""bench/harness.py: children that print a JSON line last, their failures; and how the scripts reach it."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

import harness              # bench/ is on sys.path (tests/conftest.py)

MODULES = sorted(p.name for p in harness.BENCH.glob("*.py"))
SCRIPTS = [m for m in MODULES if 'if __name__ == "__main__":' in (harness.BENCH / m).read_text()]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_result_is_its_last_stdout_line():
    code = "import json, sys; print('progress'); print('noise', file=sys.stderr); print(json.dumps({'ms': 1.5}))"
    assert harness.run_json_child(_python(code)) == {"ms": 1.5}
    assert harness.run_child(_python("print('a'); print('b')")) == "a\nb\n"


def test_a_failed_child_reports_its_last_lines():
    code = "import sys; print('out'); print('one\\n\\ntwo\\nthree\\nfour', file=sys.stderr); sys.exit(3)"
    with pytest.raises(harness.ChildError) as caught:
        harness.run_json_child(_python(code))
    assert caught.value.returncode == 3 and caught.value.lines == ["two", "three", "four"]
    assert str(caught.value) == "two | three | four" and caught.value.last == "four"
    with pytest.raises(harness.ChildError, match="^out$"):        # nothing on stderr: its stdout
        harness.run_child(_python("import sys; print('out'); sys.exit(1)"))
    with pytest.raises(harness.ChildError, match="^no output$"):
        harness.run_child(_python("import sys; sys.exit(1)"))


def test_a_child_without_a_json_line_is_a_failure_too():
    with pytest.raises(harness.ChildError, match="no JSON on the last line of its output: done"):
        harness.run_json_child(_python("print('done')"))
    with pytest.raises(harness.ChildError, match="output: nothing"):
        harness.last_json("")
    assert harness.last_json(harness.check_child(0, "x\n[1, 2]\n")) == [1, 2]


def test_python_cmd_runs_a_script_with_this_interpreter():
    cmd = harness.python_cmd(harness.BENCH / "decode_latency.py", "--tokens", 8, harness.BENCH)
    assert cmd == [sys.executable, str(harness.BENCH / "decode_latency.py"), "--tokens", "8", str(harness.BENCH)]


def test_plot_lines_writes_a_png(tmp_path):
    rows = [{"n": n, "ms_per_token": ms} for n, ms in ((1024, 8.0), (512, 7.0))]
    harness.plot_lines({"a": rows, "empty": []}, "tiny", tmp_path / "p.png", floor=3.0)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_harness_imports_only_the_standard_library_at_load():
    tree = ast.parse((harness.BENCH / "harness.py").read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert top <= {"__future__", "json", "subprocess", "sys", "pathlib", "typing"}


@pytest.mark.parametrize("module", MODULES)
def test_no_module_touches_sys_path(module):
    tree = ast.parse((harness.BENCH / module).read_text())
    assert [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys"] == []


@pytest.mark.parametrize("module", MODULES)
def test_no_function_is_over_60_lines(module):
    tree = ast.parse((harness.BENCH / module).read_text())
    assert [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_runs_as_a_program_from_anywhere(script, tmp_path):
    """`python bench/X.py --help` from another folder: its sibling imports resolve from the script's own folder."""
    done = subprocess.run([sys.executable, str(harness.BENCH / script), "--help"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")


def test_nectar_export_bench_runs_the_script():
    done = subprocess.run([sys.executable, "-m", "nectar_export.cli", "bench", "--help"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: decode_latency") and "--head-params" in done.stdout
