"""runtime/external_data.py: the external-data locations of an ONNX file, read without the onnx package, agree with
onnx's own view wherever a tensor can sit; a bundle whose graph reads data from outside its listed files (absolute,
`..`, a symbolic link, an unlisted file) is refused before ONNX Runtime opens it; a listed data file loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nectar_runtime.bundle import read_manifest
from nectar_runtime.errors import BundleError
from nectar_runtime.external_data import external_locations
from nectar_runtime.generator import Generator
from nectar_runtime.sampling import Sampling


def _external(name: str, array: np.ndarray, location: str, offset: int = 0) -> TensorProto:
    tensor = numpy_helper.from_array(array, name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _everywhere() -> onnx.ModelProto:
    """A model with an external tensor in each place one can sit: initializer, sparse initializer (values and
    indices), a Constant's value, an attribute's tensor list, an If branch's initializer, a function's Constant,
    and a training graph's initializer."""
    w = np.ones(4, np.float32)
    branch = helper.make_graph([helper.make_node("Identity", ["B"], ["Z"])], "branch", [],
                               [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [4])],
                               [_external("B", w, "if-branch.bin")])
    sparse = helper.make_sparse_tensor(_external("S", w, "sparse-values.bin"),
                                       _external("S_i", np.arange(4, dtype=np.int64), "sparse-indices.bin"), [8])
    nodes = [helper.make_node("Add", ["X", "W"], ["A"]),
             helper.make_node("Constant", [], ["C"], value=_external("C", w, "constant.bin")),
             helper.make_node("If", ["cond"], ["Y"], then_branch=branch, else_branch=branch),
             helper.make_node("Identity", ["A"], ["L"], tensor_list=[_external("T", w, "attribute-list.bin")])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4])],
                              [_external("W", w, "initializer.bin")], sparse_initializer=[sparse])
    function = helper.make_function("local", "f", [], ["F"],
                                    [helper.make_node("Constant", [], ["F"], value=_external("F", w, "function.bin"))],
                                    [helper.make_opsetid("", 20)])
    model = helper.make_model(graph, functions=[function], opset_imports=[helper.make_opsetid("", 20)])
    training = model.training_info.add()
    training.initialization.CopyFrom(helper.make_graph([], "init", [], [], [_external("I", w, "training.bin")]))
    return model


def test_every_place_a_tensor_can_sit_is_read(tmp_path):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = _everywhere()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    ours = sorted(external_locations(path))
    onnx_view = sorted(entry.value for t in _get_all_tensors(model) if uses_external_data(t)
                       for entry in t.external_data if entry.key == "location")
    assert ours == sorted(["initializer.bin", "sparse-values.bin", "sparse-indices.bin", "constant.bin",
                           "if-branch.bin", "if-branch.bin", "attribute-list.bin", "function.bin", "training.bin"])
    assert set(onnx_view) <= set(ours)         # onnx's walker skips functions and training graphs; ours does not


def test_bytes_that_are_not_protobuf_are_refused(bundle_copy):
    (bundle_copy / "model.onnx").write_bytes(b"\xff" * 64)
    read_manifest(bundle_copy).with_files(bundle_copy, ["model.onnx"]).save(bundle_copy)
    with pytest.raises(BundleError, match="model.onnx is not an ONNX file"):
        Generator(bundle_copy)


def _point_outside(bundle: Path, location: str, data: Path) -> None:
    """Move the graph's largest weight into external data at `location`, its bytes into `data`, and re-register
    model.onnx in bundle.json (sizes and hashes agree: only the location can stop it)."""
    model = onnx.load(str(bundle / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda w: int(np.prod(w.dims)))
    array = numpy_helper.to_array(weight)
    data.write_bytes(array.tobytes())
    weight.CopyFrom(_external(weight.name, array, location))
    onnx.save(model, str(bundle / "model.onnx"))
    read_manifest(bundle).with_files(bundle, ["model.onnx"]).save(bundle)


def _untouched(path: Path) -> float:
    """Set the file's access time behind its modification time, so that any read moves it (relatime)."""
    st = path.stat()
    os.utime(path, ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
    return path.stat().st_atime


@pytest.mark.parametrize("how", ["absolute", "parent", "symlink", "unlisted"])
def test_a_graph_reading_outside_its_listed_files_is_refused_before_onnx_runtime(bundle_copy, tmp_path, how):
    outside = tmp_path / "secret.bin"
    target = {"absolute": str(outside), "parent": "../secret.bin", "symlink": "weights.bin",
              "unlisted": "weights.bin"}[how]
    _point_outside(bundle_copy, target, bundle_copy / "weights.bin" if how == "unlisted" else outside)
    if how == "symlink":
        (bundle_copy / "weights.bin").symlink_to(outside)
    atime = _untouched(outside) if outside.exists() else None
    with pytest.raises(BundleError) as exc:
        Generator(bundle_copy)
    assert f"reads tensor data from {target!r}, which is not a file bundle.json lists" in str(exc.value)
    assert "\n" not in str(exc.value)
    if atime is not None:
        assert outside.stat().st_atime == atime, "the file outside the bundle was read"
    done = subprocess.run([sys.executable, "-m", "nectar_runtime", str(bundle_copy), "--prompt", "Hi"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr


def test_self_check_a_read_moves_the_access_time(tmp_path):
    """The atime assertion above can fail: on this file system a read of such a file moves its access time."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    atime = _untouched(probe)
    probe.read_bytes()
    if probe.stat().st_atime == atime:
        pytest.skip("this file system does not record reads (noatime)")
    assert probe.stat().st_atime > atime


def test_listed_external_data_loads_and_answers_as_before(bundle_copy, nectar_bundle):
    """The layout export writes past 1 GiB of weights: model.onnx.data beside the graph, listed in bundle.json."""
    model = onnx.load(str(bundle_copy / "model.onnx"))
    onnx.save(model, str(bundle_copy / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    read_manifest(bundle_copy).with_files(bundle_copy, ["model.onnx", "model.onnx.data"]).save(bundle_copy)
    assert set(external_locations(bundle_copy / "model.onnx")) == {"model.onnx.data"}
    question, sampling = "What is a module?", Sampling(max_new_tokens=6)
    with Generator(bundle_copy) as moved, Generator(nectar_bundle) as original:
        assert moved.generate(question, sampling).token_ids == original.generate(question, sampling).token_ids
