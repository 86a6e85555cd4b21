"""Bundles of `export --ops ort` (graphs/fused.py) through the runtime: the manifest's contract, the ort-cpu
backend against the portable static bundles of the same artifact, and the ort-cuda code path (one buffer bound
as past and present, GroupQueryAttention updating it in place, the fixed one-token binding) on host memory."""

from __future__ import annotations

import numpy as np
import pytest

from nectar_runtime.backends.ort import OrtCpuBackend
from nectar_runtime.bundle import load_bundle
from nectar_runtime.errors import BackendError
from tests.conftest import _run_all
from tests.helpers import STEP_PROMPT, HostBoundBackend, same_greedy_sequences, run_cli


@pytest.fixture(scope="module")
def fused(tmp_path_factory, artifact) -> dict:
    """Fused bundles of the artifact: Nectar and full attention in fp32, Nectar in fp16."""
    root = tmp_path_factory.mktemp("fused")
    jobs = {"nectar": [], "full": ["--baseline"], "nectar_fp16": ["--precision", "fp16"]}
    _run_all({name: ["export", str(artifact), "-o", str(root / name), "--ops", "ort", "--cache", "static", *flags]
              for name, flags in jobs.items()})
    return {name: root / name for name in jobs}


def test_the_manifest_says_what_the_graph_takes(fused, bundles):
    nectar, full = load_bundle(fused["nectar"]).manifest, load_bundle(fused["full"]).manifest
    portable = load_bundle(bundles["nectar_static"]).manifest
    assert (nectar.ops, nectar.step_tokens, nectar.max_batch) == ("ort", 1, 1)
    assert (full.ops, full.step_tokens, full.max_batch) == ("ort", 0, 0)
    assert (portable.ops, portable.step_tokens, portable.max_batch) == ("portable", 0, 0)
    assert nectar.head_dim == 24 and full.head_dim == portable.head_dim == 16      # padded for the merge's channel
    assert nectar.static and nectar.cached_tokens == portable.cached_tokens
    assert nectar.graph["op_counts"]["GroupQueryAttention"] == nectar.layers
    assert "Softmax" not in nectar.graph["op_counts"]


@pytest.mark.parametrize("kind", ["nectar", "full"])
def test_fused_bundle_equals_the_portable_one(fused, bundles, kind):
    """ort-cpu (ONNX Runtime's optimizations on): greedy sequences of 8 steps after a 5-token prompt, logits within
    1e-4 and the same tokens; the KV of the filled slots in the model's D channels."""
    fast, plain = load_bundle(fused[kind]), load_bundle(bundles[f"{kind}_static"])
    with OrtCpuBackend(fast) as got_backend, OrtCpuBackend(plain) as want_backend:
        tokens = STEP_PROMPT
        for _ in range(8):
            want, got = want_backend.step(tokens), got_backend.step(tokens)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
            assert int(got.argmax()) == int(want.argmax())
            tokens = want.argmax(-1)[:, None]
        dim = plain.manifest.head_dim
        for a, b in zip(want_backend.present_kv(), got_backend.present_kv()):
            np.testing.assert_allclose(b[..., :dim], a, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["nectar", "full", "nectar_fp16"])
def test_in_place_buffers_equal_the_cpu_backend(fused, kind):
    """The ort-cuda static path on host memory: GroupQueryAttention with past and present sharing one buffer gives
    the logits and KV of the plain CPU backend (whose GroupQueryAttention copies the past)."""
    bundle = load_bundle(fused[kind])
    with OrtCpuBackend(bundle) as plain, HostBoundBackend(bundle) as bound:
        assert bound.cuda_graph
        same_greedy_sequences(plain, bound)
        for got, want in zip(bound.present_kv(), plain.present_kv()):
            np.testing.assert_array_equal(got, want)


def test_a_prompt_goes_in_one_token_at_a_time_and_batches_are_refused(fused):
    bundle = load_bundle(fused["nectar"])
    with OrtCpuBackend(bundle) as whole, OrtCpuBackend(bundle) as pieces:
        want = whole.step(STEP_PROMPT)
        for t in range(STEP_PROMPT.shape[1]):
            got = pieces.step(STEP_PROMPT[:, t:t + 1])
        np.testing.assert_array_equal(got, want)
        assert whole.new_tokens == pieces.new_tokens == STEP_PROMPT.shape[1]
        with pytest.raises(BackendError, match="at most 1 sequence"):
            whole.reset(2)


def test_fp16_bundle_agrees_with_fp32(fused):
    with OrtCpuBackend(load_bundle(fused["nectar"])) as fp32, OrtCpuBackend(load_bundle(fused["nectar_fp16"])) as fp16:
        want, got = fp32.step(STEP_PROMPT), fp16.step(STEP_PROMPT)
        assert np.abs(got - want).max() < 5e-2
        assert int(got.argmax()) == int(want.argmax())


@pytest.mark.parametrize("flags, message", [(["--precision", "bf16"], "fp32 or fp16"),
                                            (["--cache", "dynamic"], "--cache static"),
                                            (["--cache", "static", "--base"], "neither --base")])
def test_what_the_fused_graph_does_not_offer_is_refused(artifact, tmp_path, flags, message):
    result = run_cli("export", str(artifact), "-o", str(tmp_path / "b"), "--ops", "ort", *flags)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b" / "bundle.json").exists()
