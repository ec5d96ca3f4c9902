import math

import numpy as np
import pytest
import torch

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.pruning.fastv import FastVConfig


def test_keep_one_is_identical_to_baseline(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply("fastv:layer=2,keep=1.0")
    try:
        same = forward_logits(session, inputs)
    finally:
        handle.remove()
    assert torch.equal(same, base)


def test_pruning_changes_logits_and_remove_restores_exactly(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    handle = session.apply(FastVConfig(layer=2, keep=0.25))
    pruned = forward_logits(session, inputs)
    assert pruned.shape[1] == base.shape[1] - 48  # 64 image tokens -> 16 kept
    assert not torch.allclose(pruned[:, -1], base[:, -1])
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base)
    assert session.model.config.text_config._attn_implementation == "sdpa"


def test_stats_report_kept_tokens_per_layer(session, images, prompts):
    session.apply("fastv:layer=2,keep=0.25")
    result = session.generate(images, prompts, max_new_tokens=4)
    for r in result:
        assert r.stats.visual_tokens_kept == [64, 64, 16, 16]
        assert r.stats.mean_visual_tokens_kept < r.stats.visual_tokens


def test_batch_of_different_prompts_equals_single_runs(session, images, prompts):
    session.apply("fastv:layer=2,keep=0.25")
    batched = session.generate(images, prompts, max_new_tokens=8)
    batch_scores = session.answer_logprobs(images, prompts, ["yes", "no"]).logprobs
    for i in range(3):
        single = session.generate([images[i]], [prompts[i]], max_new_tokens=8)[0]
        assert single.text == batched[i].text
        single_scores = session.answer_logprobs([images[i]], [prompts[i]], ["yes", "no"]).logprobs[0]
        assert torch.allclose(torch.tensor(single_scores), torch.tensor(batch_scores[i]), atol=1e-4)


def test_cache_holds_only_kept_tokens_after_the_drop_layer(session, images, prompts):
    session.apply("fastv:layer=2,keep=0.25")
    inputs = session.prepare(images, prompts)
    with torch.inference_mode():
        out = session.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                     return_dict_in_generate=True,
                                     pad_token_id=session.processor.tokenizer.pad_token_id)
    cache = out.past_key_values
    n = inputs["input_ids"].shape[1]
    # The last generated token is never fed back, so the cache holds the prompt plus 3 decoded tokens.
    assert cache.get_seq_length(0) == n + 3
    assert cache.get_seq_length(1) == n + 3
    assert cache.get_seq_length(2) == n - 48 + 3
    assert cache.get_seq_length(3) == n - 48 + 3


def test_keep_one_generation_matches_baseline(session, images, prompts):
    base = [r.text for r in session.generate(images, prompts, max_new_tokens=8)]
    session.apply("fastv:layer=1,keep=1.0")
    assert [r.text for r in session.generate(images, prompts, max_new_tokens=8)] == base


def test_two_token_dropping_methods_are_refused(session):
    session.apply("fastv:layer=2,keep=0.5")
    with pytest.raises(MmkitError, match="cannot combine"):
        session.apply("fastv:layer=3,keep=0.5")


def test_layer_past_the_model_is_refused(session):
    with pytest.raises(MmkitError, match="past the last decoder layer"):
        session.apply("fastv:layer=4")


def test_llava_next_rows_with_different_visual_token_counts():
    """Anyres images give each row its own number of image tokens; each row keeps its own share."""
    import mmkit

    session = mmkit.load("tiny-random-next", device="cpu")
    rng = np.random.default_rng(2)
    imgs = [(rng.random(shape) * 255).astype("uint8") for shape in [(28, 56, 3), (56, 56, 3), (28, 28, 3)]]
    prompts = ["hi", "describe this image", "what?"]
    base = session.generate(imgs, prompts, max_new_tokens=5)
    counts = [r.stats.visual_tokens for r in base]
    assert len(set(counts)) > 1
    session.apply("fastv:layer=2,keep=0.5")
    batched = session.generate(imgs, prompts, max_new_tokens=5)
    for r, n in zip(batched, counts):
        assert r.stats.visual_tokens_kept == [n, n, math.ceil(n / 2), math.ceil(n / 2)]
    singles = [session.generate([imgs[i]], [prompts[i]], max_new_tokens=5)[0].text for i in range(3)]
    assert [r.text for r in batched] == singles
    batch_scores = torch.tensor(session.answer_logprobs(imgs, prompts).logprobs)
    single_scores = torch.tensor([session.answer_logprobs([imgs[i]], [prompts[i]]).logprobs[0] for i in range(3)])
    assert torch.allclose(batch_scores, single_scores, atol=1e-4)
    session.close()


@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_static_cache_generation_matches_dynamic(session, images, prompts, keep):
    """Pruned decoding composes with transformers' static cache: same tokens as the dynamic cache."""
    session.apply(f"fastv:layer=2,keep={keep}")
    inputs = session.prepare(images, prompts)
    pad = session.processor.tokenizer.pad_token_id
    with torch.inference_mode():
        dynamic = session.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pad)
        static = session.model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=pad,
                                        cache_implementation="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("layer,keep", [(2, 0.25), (1, 0.5), (3, 0.1)])
def test_kept_set_is_the_top_k_of_an_eager_attention_row(session, images, prompts, layer, keep):
    """Independent reference: the unmodified model run with eager attention and `output_attentions`; FastV keeps,
    per row, the ceil(keep x 64) image tokens with the most attention from the last position at layer K-1 (mean
    over heads)."""
    inputs = session.prepare(images, prompts)
    lm = session.adapter.language_model
    original = lm.config._attn_implementation
    try:
        lm.set_attn_implementation("eager")  # the reference only
        with torch.inference_mode():
            attentions = session.model(**inputs, output_attentions=True).attentions
    finally:
        lm.set_attn_implementation(original)
    row = attentions[layer - 1][:, :, -1, :].float().mean(1)              # (B, n)
    is_image = inputs["input_ids"] == session.adapter.image_token_id
    k = math.ceil(64 * keep)
    expected = []
    for b in range(row.shape[0]):
        positions = is_image[b].nonzero().flatten()
        top = torch.topk(row[b, positions], k).indices
        expected.append(sorted(positions[top].tolist()))

    handle = session.apply(f"fastv:layer={layer},keep={keep}")
    with torch.inference_mode():
        session.model(**inputs)
    index = handle.impl._dropper.index                                   # kept -> original positions
    for b in range(row.shape[0]):
        kept = [p for p in index[b].tolist() if bool(is_image[b, p])]
        assert kept == expected[b]
