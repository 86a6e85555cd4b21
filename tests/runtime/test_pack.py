"""Base bundles and packs: two documents on one base answer as their single-file bundles, switching keeps the
session, and a pack made for another base, a damaged pack or a wrong use is refused with one clear line."""

from __future__ import annotations

import json
import shutil

import pytest

from nectar_runtime.backends.ort import OrtCpuBackend
from nectar_runtime.bundle import load_bundle
from nectar_runtime.errors import BackendError, BundleError, GenerationError
from nectar_runtime.generator import Generator
from nectar_runtime.pack import PACK_FILE, PACK_MANIFEST, load_pack, resolve
from nectar_runtime.sampling import Sampling
from tests.helpers import HostBoundBackend, run_cli, same_greedy_sequences

QUESTIONS = ("What does the assert statement do?", "How is an augmented assignment evaluated?")
GREEDY = Sampling(max_new_tokens=12)


def _answers(generator: Generator) -> list[list[int]]:
    return [generator.generate(q, GREEDY).token_ids for q in QUESTIONS]


def test_two_packs_on_one_base_answer_as_their_single_file_bundles(packs, nectar_bundle):
    with Generator(nectar_bundle) as single:
        manual = _answers(single)
    with Generator(packs["whole_bundle"]) as single:
        whole = _answers(single)
    assert manual != whole                          # two documents, two sets of answers
    with Generator(packs["base"], pack=packs["manual"]) as generator:
        session = generator.backend.session
        other = generator.load_pack(packs["whole"])
        first = generator.pack
        assert _answers(generator) == manual
        generator.use(other)
        assert generator.window == other.manifest.max_new_tokens
        assert _answers(generator) == whole
        generator.use(first)                         # and back: nothing of the other document stays behind
        assert _answers(generator) == manual
        assert generator.backend.session is session  # one session all along
        assert 0 < generator.switch_ms < 1000


def test_a_pack_runs_on_the_static_base_too(packs, bundles):
    """The pack is made for the dynamic base; the static base has the same layout fingerprint."""
    with Generator(bundles["nectar_static"]) as single:
        want = _answers(single)
    with Generator(packs["base_static"], pack=packs["manual"]) as generator:
        assert _answers(generator) == want


@pytest.mark.parametrize("base", ["base", "base_static"])
def test_the_cuda_backend_binds_the_heads_and_keeps_each_packs_state(packs, base):
    """ort-cuda's bindings on host memory: heads bound as inputs, each pack's buffers kept across switches (with
    CUDA graphs, each pack's own graph id), logits equal to the CPU backend's at every step."""
    root = load_bundle(packs[base])
    manual, whole = (resolve(root, load_pack(packs[name])) for name in ("manual", "whole"))
    with HostBoundBackend(manual) as bound:
        ids = {}
        for bundle in (manual, whole, manual, whole):
            if bound.bundle is not bundle:
                bound.switch(bundle)
            ids.setdefault(bundle.pack.key, bound._graph_id)
            assert bound._graph_id == ids[bundle.pack.key]
            with OrtCpuBackend(bundle) as plain:
                same_greedy_sequences(plain, bound)
        assert len(set(ids.values())) == 2


def test_a_pack_is_a_small_part_of_a_bundle(packs, nectar_bundle):
    pack_bytes = (packs["manual"] / PACK_FILE).stat().st_size
    bundle_bytes = sum(f.stat().st_size for f in nectar_bundle.iterdir())
    base = load_bundle(packs["base"])
    assert pack_bytes < 0.2 * bundle_bytes
    assert all(not (packs["base"] / name).exists() for name in ("context.safetensors",))
    assert base.manifest.cached_tokens == 0 and base.kind == "base"
    heads = [s for s in base.manifest.inputs if s.name.startswith("nectar_heads.")]
    assert len(heads) == 4 * base.manifest.layers
    assert heads[0].shape[-1] == "nectar_width.0"      # any pack's widths fit


def test_a_pack_for_another_model_is_refused_naming_both(packs, artifact, tmp_path, other_ckpt):
    result = run_cli("pack", str(artifact), "--base", str(packs["base"]), "--model", str(other_ckpt),
                     "-o", str(tmp_path / "p"))
    assert result.returncode == 2 and result.stderr.count("error:") == 1
    assert "fingerprint" in result.stderr and str(packs["base"]) in result.stderr
    assert not (tmp_path / "p").exists()


def test_a_pack_made_for_another_layout_is_refused_naming_both(packs, tmp_path):
    pack = shutil.copytree(packs["manual"], tmp_path / "pack")
    data = json.loads((pack / PACK_MANIFEST).read_text())
    data["layout"]["fingerprint"] = "0123456789abcdef"
    (pack / PACK_MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"made for layout 0123456789abcdef .* but base .* has layout"):
        Generator(packs["base"], pack=pack)


def test_a_damaged_pack_is_refused(packs, tmp_path):
    pack = shutil.copytree(packs["manual"], tmp_path / "pack")
    data = bytearray((pack / PACK_FILE).read_bytes())
    data[-1] ^= 1
    (pack / PACK_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_pack(pack)


def test_pack_tensors_of_the_wrong_width_are_refused(packs, tmp_path):
    """A pack.json that claims other widths than its tensors make: the runtime names the tensor and both widths."""
    pack = shutil.copytree(packs["manual"], tmp_path / "pack")
    data = json.loads((pack / PACK_MANIFEST).read_text())
    data["widths"][0] += 16
    (pack / PACK_MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BackendError, match=r"nectar_pair\.0\.w1 of shape .*heads of width \d+; pack.json says"):
        Generator(packs["base"], pack=pack)


def test_a_pack_stores_the_joint_weights_and_builds_the_bundles_heads_bit_for_bit(packs):
    """The pack holds the fitted joint weights (a fraction of the carried form); the head inputs the runtime builds
    from them are the single-file bundle's JointPair initializers exactly."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    from nectar_graphs.passes import TRACED_HEADS
    from nectar_runtime.heads import JOINT_NAMES
    from nectar_runtime.pack import pack_heads

    bundle = resolve(load_bundle(packs["base"]), load_pack(packs["whole"]))
    tensors = load_file(str(packs["whole"] / PACK_FILE))
    assert not any(name.startswith("nectar_heads.") for name in tensors)
    heads = pack_heads(bundle, tensors, np.float32)
    model = onnx.load(str(packs["whole_bundle"] / "model.onnx"))
    initializers = {i.name: numpy_helper.to_array(i, str(packs["whole_bundle"])) for i in model.graph.initializer}
    joint = carried = 0
    for layer in range(bundle.manifest.layers):
        for weight in ("w1", "b1", "w2", "w3"):
            built, traced = heads[f"nectar_heads.{layer}.{weight}"], initializers[TRACED_HEADS.format(layer=layer,
                                                                                                        weight=weight)]
            assert built.dtype == traced.dtype and np.array_equal(built, traced), (layer, weight)
            carried += built.size
        joint += sum(tensors[f"nectar_pair.{layer}.{name}"].size for name in JOINT_NAMES)
    assert joint < carried / 2


def test_a_pack_of_the_first_format_is_refused_with_what_to_do(packs, tmp_path):
    pack = shutil.copytree(packs["manual"], tmp_path / "pack")
    data = json.loads((pack / PACK_MANIFEST).read_text())
    data["format"] = "nectar-pack/1"
    (pack / PACK_MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="reads nectar-pack/2: re-make the pack with `nectar-export pack`"):
        load_pack(pack)


def test_wrong_uses_get_one_clear_error(packs, nectar_bundle, tmp_path):
    with pytest.raises(GenerationError, match="base bundle: pass the pack"):
        Generator(packs["base"])
    with pytest.raises(GenerationError, match="single-file nectar bundle"):
        Generator(nectar_bundle, pack=packs["manual"])
    result = run_cli("pack", "unused", "--base", str(nectar_bundle), "-o", str(tmp_path / "p"))
    assert result.returncode == 2 and "needs a base bundle" in result.stderr
    result = run_cli("run", str(packs["base"]), "--pack", str(packs["manual"]), "--backend", "tensorrt",
                     "--prompt", "hi")
    assert result.returncode == 2 and "runs single-file bundles only" in result.stderr
    result = run_cli("run", str(packs["base"]), "--pack", str(packs["whole"]), "--prompt", QUESTIONS[0],
                     "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-2000:]


def test_verify_runs_a_pack_on_its_base_against_torch(packs):
    result = run_cli("verify", str(packs["base"]), "--pack", str(packs["whole"]), "--prompts", "3", "--steps", "4",
                     "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["kind"] == "base" and report["top1_match"] == 1.0 and report["max_abs_logit_diff"] < 1e-3
    result = run_cli("build", str(packs["base"]))
    assert result.returncode == 2 and "single-file bundles only" in result.stderr
