"""The runtime's token loop against the torch model: same tokens, same prompts, clear errors at the window's edge."""

from __future__ import annotations

import pytest

from nectar_runtime.errors import GenerationError
from nectar_runtime.generator import Generator, TextStream
from nectar_runtime.sampling import Sampling

ANSWER = 32


@pytest.fixture(scope="session")
def reference(tiny_ckpt, artifact):
    """The torch side: model, tokenizer, context cache, Nectar contexts, held-out questions and template."""
    from nectar_export.artifact import load_artifact
    from nectar_export.evaluate import heads_contexts
    from nectar_export.models import load_model
    from nectar_export.prefill import prefill

    loaded = load_model(str(tiny_ckpt))
    heads = load_artifact(artifact, loaded.fingerprint)
    heldout = heads.heldout()
    cache = prefill(loaded.model, heldout.context_ids, progress=False)
    nectar = heads_contexts(heads.heads["nectar"], cache, heads.exact_sets())
    questions = [s.question for s in heldout.questions()]
    return {"model": loaded.model, "tokenizer": loaded.tokenizer, "n": heads.n, "questions": questions,
            "contexts": {"nectar": nectar, "full": cache.exact()},
            "template": heads.manifest.context.question_template}


def torch_greedy(ref: dict, kind: str, questions: list[str]) -> list[list[int]]:
    """nectar_export's own greedy generation (HF model in Nectar mode, or with the exact context)."""
    from nectar_export.batch_generate import Sampling as TorchSampling
    from nectar_export.batch_generate import generate
    from nectar_export.samples import pad_id, question_ids, stop_ids

    tok = ref["tokenizer"]
    prompts = [question_ids(tok, ref["template"], q) for q in questions]
    return generate(ref["model"], prompts, ref["contexts"][kind], ref["n"], TorchSampling(max_new_tokens=ANSWER),
                    stop_ids(tok), pad_id(tok))            # one left-padded batch: 10x faster than one by one


@pytest.mark.parametrize("kind,count", [("nectar", 10), ("full", 4)])
def test_greedy_equals_torch_token_for_token(reference, bundles, kind, count):
    questions = reference["questions"][:count]
    assert len(questions) == count
    expected = torch_greedy(reference, kind, questions)
    with Generator(bundles[kind]) as generator:
        got = [generator.generate(q, Sampling(max_new_tokens=ANSWER)).token_ids for q in questions]
    assert got == expected
    assert all(len(t) == ANSWER or t[-1] in generator.stop_ids for t in got)
    assert len({tuple(t) for t in got}) == count and min(len(set(t)) for t in got) > 4     # not a degenerate echo


def test_prompt_tokens_equal_the_exporters(reference, nectar_bundle):
    from nectar_export.samples import question_ids

    questions = reference["questions"][:3] + ["What does {x} mean in an f-string?", "naïve café — 日本語 🎉?",
                                              "  spaces around  "]
    with Generator(nectar_bundle) as generator:
        for q in questions:
            assert generator.prompt_ids(q) == question_ids(reference["tokenizer"], reference["template"], q)


def test_stream_yields_the_text_in_pieces(nectar_bundle):
    with Generator(nectar_bundle) as generator:
        pieces = list(generator.stream("What is a generator expression?", Sampling(max_new_tokens=16)))
        result = generator.last
    assert len(pieces) > 1 and "".join(pieces) == result.text
    assert len(result.token_ms) == len(result.token_ids) - 1 and result.prefill_ms > 0
    assert result.finish in ("length", "stop")


def test_incremental_decoding_never_splits_a_character(nectar_bundle):
    with Generator(nectar_bundle) as generator:
        tokenizer = generator.tokenizer
    text = "naïve café — 日本語の文 🎉🚀 ok"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())                       # some characters span several tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_empty_prompt_is_refused(nectar_bundle):
    with Generator(nectar_bundle) as generator:
        for prompt in ("", "   \n"):
            with pytest.raises(GenerationError, match="empty"):
                generator.generate(prompt)


def test_prompt_past_the_window_is_refused(nectar_bundle):
    with Generator(nectar_bundle) as generator:
        with pytest.raises(GenerationError, match=r"window is 512") as err:
            generator.generate("word " * 600)
    assert "\n" not in str(err.value)


def test_answer_stops_at_the_window(nectar_bundle):
    """A prompt that leaves a few positions: the answer fills them (window - prompt + 1 tokens, the last one
    not fed back) and ends there, below max_new_tokens and before any stop token."""
    with Generator(nectar_bundle) as generator:
        prompt = generator.prompt_ids("word " * 500)
        result = generator.generate("word " * 500, Sampling(max_new_tokens=100))
    room = generator.window - len(prompt) + 1
    assert 1 < room < 100
    assert result.finish == "window", (result.finish, result.token_ids)
    assert len(result.token_ids) == room and len(result.token_ms) == room - 1


def test_bad_sampling_settings_are_refused():
    for bad in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_new_tokens": 0}):
        with pytest.raises(GenerationError):
            Sampling(**bad)


def test_sampled_generation_repeats_with_its_seed(nectar_bundle):
    with Generator(nectar_bundle) as generator:
        def run(seed: int) -> list[int]:
            return generator.generate("Tell me about modules.", Sampling(max_new_tokens=12, temperature=1.5,
                                                                         seed=seed)).token_ids
        first, again, other = run(1), run(1), run(2)
    assert first == again and first != other


def test_damaged_weights_stop_with_an_error_instead_of_an_empty_answer(bundle_copy):
    """Issue 18: a weight overwritten with NaN (re-registered in bundle.json, so sizes and hashes agree) gave exit 0,
    NaN logits and an empty answer. The runtime stops at the first non-finite logits."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from nectar_runtime.bundle import read_manifest

    model = onnx.load(str(bundle_copy / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda w: int(np.prod(w.dims)))   # the largest: embeddings or head
    weight.CopyFrom(numpy_helper.from_array(np.full(tuple(weight.dims), np.nan, np.float32), weight.name))
    onnx.save(model, str(bundle_copy / "model.onnx"))
    read_manifest(bundle_copy).with_files(bundle_copy, ["model.onnx"]).save(bundle_copy)
    with Generator(bundle_copy, check_hashes=True) as generator:
        with pytest.raises(GenerationError, match="non-finite logits at step 0: the bundle's weights look damaged"):
            generator.generate("What is a list?", Sampling(max_new_tokens=4))
