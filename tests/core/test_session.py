import pytest
import torch

from conftest import forward_logits
from mmkit.errors import MmkitError, UnsupportedModelError
from mmkit.models.adapters import adapter_for


def test_image_spans_found_from_token_ids(session, images, prompts):
    inputs = session.prepare(images, prompts)
    spans = session.adapter.image_spans(inputs["input_ids"])
    lengths = inputs["attention_mask"].sum(1).tolist()
    width = inputs["input_ids"].shape[1]
    for row_spans, length in zip(spans, lengths):
        assert len(row_spans) == 1
        start, end = row_spans[0]
        assert end - start == 64
        # Left padding shifts the span of shorter prompts to the right.
        assert start == width - length + len(session.processor.tokenizer("USER: ")["input_ids"])


def test_generate_batch_returns_texts_and_stats(session, images, prompts):
    results = session.generate(images, prompts, max_new_tokens=5)
    assert len(results) == 3
    for r in results:
        assert isinstance(r.text, str)
        assert r.stats.visual_tokens == 64
        assert r.stats.visual_tokens_kept == [64, 64, 64, 64]
        assert r.stats.prefill_ms > 0
        assert 0 <= r.stats.new_tokens <= 5


def test_batched_generation_matches_single_rows(session, images, prompts):
    batched = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
    singles = [session.generate([images[i]], [prompts[i]], max_new_tokens=6)[0].text for i in range(3)]
    assert batched == singles


def test_sampling_is_reproducible_by_seed(session, images, prompts):
    a = [r.text for r in session.generate(images, prompts, max_new_tokens=6, do_sample=True, seed=3)]
    b = [r.text for r in session.generate(images, prompts, max_new_tokens=6, do_sample=True, seed=3)]
    c = [r.text for r in session.generate(images, prompts, max_new_tokens=6, do_sample=True, seed=4)]
    assert a == b
    assert a != c


def test_answer_logprobs_matches_full_forward(session, images, prompts):
    scores = session.answer_logprobs(images, prompts, ["yes", "no"])
    ids = session.choice_token_ids(["yes", "no"])
    logits = forward_logits(session, session.prepare(images, prompts))[:, -1].float()
    expected = torch.log_softmax(logits, -1)[:, ids]
    assert torch.allclose(torch.tensor(scores.logprobs), expected, atol=1e-5)
    assert scores.best()[0] in ("yes", "no")


def test_answer_logprobs_needs_distinct_answers(session, images, prompts):
    with pytest.raises(MmkitError):
        session.answer_logprobs(images[:1], prompts[:1], ["yes"])


def test_mismatched_images_and_prompts(session, images):
    with pytest.raises(MmkitError, match="one image per prompt"):
        session.generate(images[:2], ["a", "b", "c"])


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration"):
        adapter_for(torch.nn.Linear(2, 2))


def test_describe_reports_layout(session):
    info = session.describe()
    assert info["visual_tokens"] == 64
    assert info["prompt_layout"] == "USER: <image>\n{prompt} ASSISTANT:"
    assert info["architecture"] == "LlavaForConditionalGeneration"


def test_load_errors():
    import mmkit

    with pytest.raises(MmkitError, match="not a directory"):
        mmkit.load("./no/such/dir")
    with pytest.raises(MmkitError, match="unknown dtype"):
        mmkit.load("tiny-random", dtype="float7")


class _TwinBranches:
    """Two identical branches averaged: decoding must equal plain generation."""

    def expand_inputs(self, session, inputs):
        return {k: torch.cat([v, v]) for k, v in inputs.items()}

    def combine_logits(self, logits):
        half = logits.shape[0] // 2
        return (logits[:half] + logits[half:]) / 2

    def remove(self):
        pass


def test_branched_decoding_equals_plain_generation(session, images, prompts):
    from mmkit.registry import get_method
    from mmkit.session import MethodHandle

    plain = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
    plain_scores = torch.tensor(session.answer_logprobs(images, prompts).logprobs)
    plain_sampled = [r.text for r in session.generate(images, prompts, max_new_tokens=6, do_sample=True, seed=1)]
    session._handles.append(MethodHandle(session, get_method("fastv"), None, _TwinBranches()))
    branched = session.generate(images, prompts, max_new_tokens=6)
    assert [r.text for r in branched] == plain
    assert branched[0].stats.visual_tokens == 64
    assert torch.allclose(torch.tensor(session.answer_logprobs(images, prompts).logprobs), plain_scores, atol=1e-5)
    sampled = [r.text for r in session.generate(images, prompts, max_new_tokens=6, do_sample=True, seed=1)]
    assert sampled == plain_sampled
    assert sampled != plain  # the seed really sampled (the comparison above is not greedy against greedy)
