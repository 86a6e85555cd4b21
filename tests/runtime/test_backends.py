"""Backends on real bundles: damaged bundles and unavailable backends fail in one line; the IOBinding KV
ping-pong of the CUDA backend, bound to host memory, gives the plain CPU backend's logits and cache."""

from __future__ import annotations


import json

import numpy as np
import onnxruntime as ort
import pytest

from nectar_runtime.backends import BACKENDS, make_backend
from nectar_runtime.backends.ort import OrtCpuBackend
from nectar_runtime.backends.ort_cuda import OrtCudaBackend
from nectar_runtime.bundle import load_bundle, read_manifest
from nectar_runtime.errors import BackendError, BundleError
from nectar_runtime.generator import Generator
from nectar_runtime.sampling import Sampling
from tests.helpers import STEP_PROMPT, HostBoundBackend, same_greedy_sequences


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError) as exc:
        Generator(bundle_copy)
    assert "tokenizer.json is missing" in one_line(exc)


def test_size_mismatch_is_reported(bundle_copy):
    with open(bundle_copy / "model.onnx", "ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(BundleError) as exc:
        Generator(bundle_copy)
    assert "bytes, bundle.json says" in one_line(exc)


def test_corrupt_onnx_of_the_right_size_fails_on_load(bundle_copy):
    path = bundle_copy / "model.onnx"
    data = bytearray(path.read_bytes())
    data[:4096] = b"\xff" * 4096                           # same size: the hash notices, or the graph's reader
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Generator(bundle_copy)
    with pytest.raises(BundleError) as exc:
        Generator(bundle_copy, check_hashes=False)
    assert "model.onnx is not an ONNX file" in one_line(exc)
    path.write_bytes(b"\x08\x0a")                          # a protobuf message (ir_version 10) but no graph
    read_manifest(bundle_copy).with_files(bundle_copy, ["model.onnx"]).save(bundle_copy)
    with pytest.raises(BackendError) as exc:
        Generator(bundle_copy)
    assert "ONNX Runtime cannot load" in one_line(exc)


def test_corrupt_tokenizer_is_reported(bundle_copy):
    from nectar_runtime.errors import GenerationError

    (bundle_copy / "tokenizer.json").write_text("{not json")
    manifest = read_manifest(bundle_copy)                    # re-registered, so only the tokenizer can notice
    manifest.with_files(bundle_copy, ["tokenizer.json"]).save(bundle_copy)
    with pytest.raises(GenerationError) as exc:
        Generator(bundle_copy)
    assert "tokenizer.json" in one_line(exc)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has the CUDA EP")
def test_ort_cuda_without_the_cuda_ep_says_what_to_install(nectar_bundle):
    with pytest.raises(BackendError) as exc:
        Generator(nectar_bundle, backend="ort-cuda")
    assert "onnxruntime-gpu" in one_line(exc)


def test_tensorrt_without_an_engine_says_how_to_build_one(nectar_bundle):
    with pytest.raises(BackendError) as exc:
        Generator(nectar_bundle, backend="tensorrt")
    assert "nectar-export build" in one_line(exc)


def test_unknown_backend(nectar_bundle):
    with pytest.raises(BackendError, match="unknown backend"):
        make_backend(load_bundle(nectar_bundle), "ort-rocm")


@pytest.mark.parametrize("kind", ["nectar", "full"])
def test_iobinding_ping_pong_equals_the_cpu_backend(bundles, kind):
    bundle = load_bundle(bundles[kind])
    with OrtCpuBackend(bundle) as plain, HostBoundBackend(bundle) as bound:
        same_greedy_sequences(plain, bound)
        # the present of the last step, read back from the device buffer that holds it (what verify compares)
        kv = bound.present_kv()
        assert kv[0].shape[2] == bound.past_tokens == plain.past_tokens == bundle.cached_tokens + 5 + 5
        for got, want in zip(kv, plain.present_kv()):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["nectar", "full"])
def test_static_layout_equals_the_dynamic_one(bundles, kind):
    dynamic, static = load_bundle(bundles[kind]), load_bundle(bundles[f"{kind}_static"])
    assert static.static and not dynamic.static
    with OrtCpuBackend(dynamic) as grow, OrtCpuBackend(static) as fixed:
        grow.reset(1)
        fixed.reset(1)
        tokens = STEP_PROMPT
        for _ in range(8):
            want, got = grow.step(tokens), fixed.step(tokens)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
            assert int(got.argmax()) == int(want.argmax())
            tokens = want.argmax(-1)[:, None]
        for a, b in zip(grow.present_kv(), fixed.present_kv()):    # the filled slots hold the same KV
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["nectar_static", "full_static"])
def test_in_place_static_buffers_equal_the_cpu_backend(bundles, kind):
    """The ort-cuda static path (one buffer bound as past and present, fixed one-token binding) on host memory."""
    bundle = load_bundle(bundles[kind])
    with OrtCpuBackend(bundle) as plain, HostBoundBackend(bundle) as bound:
        assert bound.cuda_graph
        same_greedy_sequences(plain, bound)
        for got, want in zip(bound.present_kv(), plain.present_kv()):   # the filled slots of each buffer
            np.testing.assert_array_equal(got, want)


def test_cuda_graph_needs_a_static_bundle(nectar_bundle):
    with pytest.raises(BackendError, match="--cache static"):
        OrtCudaBackend(load_bundle(nectar_bundle), cuda_graph=True)


def test_the_base_class_checks_every_call_the_same_way(nectar_bundle):
    with OrtCpuBackend(load_bundle(nectar_bundle)) as backend:
        with pytest.raises(BackendError, match="batch 2, the sequence was reset with batch 1"):
            backend.step(np.zeros((2, 1), np.int64))
        with pytest.raises(BackendError, match=r"shape \[batch, tokens\]"):
            backend.step(np.zeros(3, np.int64))
        with pytest.raises(BackendError, match=f"0 \\+ {backend.window + 1} new tokens exceed this bundle's "
                                               f"new-token window of {backend.window}"):
            backend.step(np.zeros((1, backend.window + 1), np.int64))
        backend.step(STEP_PROMPT)
        assert backend.new_tokens == 5 and backend.position == backend.manifest.first_position + 5
        assert backend.last_step.ms > 0
    with pytest.raises(BackendError, match="not active"):
        backend.present_kv()


@pytest.mark.parametrize("kind", ["nectar", "full_static"])
def test_verify_compares_the_kv_of_the_cuda_backend(bundles, kind, monkeypatch):
    """verify on the ort-cuda code (IOBinding, device buffers), bound to host memory: it reads the present KV
    back through present_kv() and compares it, as on ort-cpu."""
    from nectar_export.verify import run_verify

    monkeypatch.setitem(BACKENDS, "ort-cuda-on-host", (HostBoundBackend.__module__, "HostBoundBackend"))
    cpu = run_verify(bundles[kind], prompts=2, steps=3, backend_name="ort-cpu")
    bound = run_verify(bundles[kind], prompts=2, steps=3, backend_name="ort-cuda-on-host")
    presents = {f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")}
    assert set(bound["max_abs_diff_by_output"]) == {"logits"} | presents
    assert bound["max_abs_diff_by_output"] == cpu["max_abs_diff_by_output"]
    assert max(bound["max_abs_diff_by_output"][name] for name in presents) < 1e-4


def test_a_manifest_that_disagrees_with_its_graph_is_refused(bundle_copy):
    """Issue 18: bundle.json's numbers are checked against the graph's own inputs and outputs when a session opens
    (a layer count within bounds but not the graph's, re-registered so that only the graph can tell)."""
    data = json.loads((bundle_copy / "bundle.json").read_text())
    data["layers"] = 3
    (bundle_copy / "bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as exc:
        Generator(bundle_copy)
    assert "does not match" in one_line(exc) and "3 layers" in str(exc.value)


def test_a_damaged_weight_of_the_right_size_is_found_by_the_default_hash_check(bundle_copy):
    """Issue 18: sha256 was checked only by verify and build, so zeroed weights of the right size ran silently.
    Every load hashes now; check_hashes=False (the CLIs' --no-hash-check) keeps the size check only."""
    path = bundle_copy / "model.onnx"
    with open(path, "r+b") as fh:                       # inside the embedding table: finite floats, same size
        fh.seek(path.stat().st_size // 2)
        fh.write(b"\0" * 4096)
    with pytest.raises(BundleError) as exc:
        Generator(bundle_copy)
    assert "model.onnx does not match its sha256" in one_line(exc)
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bundle_copy)
    with Generator(bundle_copy, check_hashes=False) as generator:
        assert generator.generate("What is a list?", Sampling(max_new_tokens=2)).token_ids
