"""The vision-side (pre-LLM) token reduction mechanism, checked against hand-built reduced inputs."""

import pytest
import torch

from conftest import forward_logits
from mmkit.patching.pre_llm import (
    PreLLMReducer,
    ReductionPlan,
    VisionLayerCapture,
    feature_layer_index,
    sequence_selection,
)

N = 64  # tiny-random: 8 x 8 patches per image


def _fixed_plan(order_rows, valid_rows=None):
    """A plan_fn returning the same per-image order for every call (rows beyond the batch are ignored)."""

    def plan(features):
        i = features.shape[0]
        order = torch.as_tensor(order_rows[:i], dtype=torch.long)
        valid = None if valid_rows is None else torch.as_tensor(valid_rows[:i], dtype=torch.bool)
        return ReductionPlan(order=order, valid=valid)

    return plan


def _hand_reduced_logits(session, inputs, row_keep):
    """Reference: project the image ourselves, keep text + the given image tokens, run the LM on the shorter
    sequence with positions 0..m-1 (one unpadded row)."""
    model = session.model
    ids = inputs["input_ids"]
    with torch.inference_mode():
        embeds = model.model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output[0]
        image_pos = (ids[0] == session.adapter.image_token_id).nonzero().flatten()
        embeds[0, image_pos] = feats.to(embeds.dtype)
        start = int(image_pos[0])
        keep = list(range(start)) + [start + j for j in row_keep] + list(range(start + N, ids.shape[1]))
        reduced = embeds[:, keep]
        out = session.adapter.language_model(inputs_embeds=reduced,
                                             position_ids=torch.arange(len(keep))[None], use_cache=False)
        return model.lm_head(out.last_hidden_state)


@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_identity_plan_is_bit_exact(session, images, prompts, positions):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    base_text = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
    reducer = PreLLMReducer(session, _fixed_plan([list(range(N))] * 3), positions=positions)
    try:
        assert torch.equal(forward_logits(session, inputs), base)
        assert [r.text for r in session.generate(images, prompts, max_new_tokens=6)] == base_text
    finally:
        reducer.remove()


def test_reduced_prefill_matches_hand_built_sequence(session, images, prompts):
    keep = [3, 0, 17, 40, 63, 8]  # an arbitrary order: the plan decides the order inside the image span
    inputs = session.prepare(images[:1], prompts[:1])
    expected = _hand_reduced_logits(session, inputs, keep)
    reducer = PreLLMReducer(session, _fixed_plan([keep]))
    try:
        got = forward_logits(session, inputs)
    finally:
        reducer.remove()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


def test_original_positions_keep_position_ids(session, images, prompts):
    inputs = session.prepare(images[:1], prompts[:1])
    seen = {}
    lm = session.adapter.language_model

    def spy(module, args, kwargs):
        seen["pos"] = kwargs["position_ids"].clone()

    reducer = PreLLMReducer(session, _fixed_plan([[5, 9, 12]]), positions="original")
    handle = lm.register_forward_pre_hook(spy, with_kwargs=True)  # registered after: sees the reduced inputs
    try:
        forward_logits(session, inputs)
    finally:
        handle.remove()
        reducer.remove()
    ids = inputs["input_ids"][0]
    start = int((ids == session.adapter.image_token_id).nonzero()[0])
    expected = list(range(start)) + [start + 5, start + 9, start + 12] + list(range(start + N, ids.shape[0]))
    assert seen["pos"][0].tolist() == expected


def test_batch_with_different_keep_counts_equals_single_rows(session, images, prompts):
    orders = [[1, 2, 3, 4, 5, 6], [60, 10, 0, 0, 0, 0], [7, 8, 9, 33, 0, 0]]
    valid = [[True] * 6, [True, True, False, False, False, False], [True] * 4 + [False] * 2]
    reducer = PreLLMReducer(session, _fixed_plan(orders, valid))
    try:
        batched = session.answer_logprobs(images, prompts).logprobs
        texts = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
        stats = session.generate(images, prompts, max_new_tokens=2)
        for i in range(3):
            reducer.plan_fn = _fixed_plan([orders[i]], [valid[i]])
            single = session.answer_logprobs([images[i]], [prompts[i]]).logprobs[0]
            assert torch.allclose(torch.tensor(single), torch.tensor(batched[i]), atol=1e-4)
            assert session.generate([images[i]], [prompts[i]], max_new_tokens=6)[0].text == texts[i]
    finally:
        reducer.remove()
    assert [s.stats.visual_tokens for s in stats] == [N] * 3
    assert [s.stats.visual_tokens_kept for s in stats] == [[6] * 4, [2] * 4, [4] * 4]


@pytest.mark.parametrize("positions", ["contiguous", "original"])
def test_cached_decoding_matches_uncached_reforward(session, images, prompts, positions):
    """Each greedy token decoded with the reduced KV cache is the argmax of a fresh, uncached forward of the
    prompt plus the tokens so far (mask and positions re-indexed consistently during decoding)."""
    orders = [[0, 5, 10, 20], [63, 1, 2, 3], [4, 44, 12, 13]]
    valid = [[True] * 4, [True, True, False, False], [True] * 4]
    reducer = PreLLMReducer(session, _fixed_plan(orders, valid), positions=positions)
    pad = session.processor.tokenizer.pad_token_id
    try:
        inputs = session.prepare(images, prompts)
        with torch.inference_mode():
            out = session.model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                         pad_token_id=pad)
            n = inputs["input_ids"].shape[1]
            for t in range(5):
                ids = out[:, : n + t]
                mask = torch.cat([inputs["attention_mask"], torch.ones_like(out[:, n:n + t])], 1)
                logits = session.model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                                       use_cache=False).logits[:, -1]
                assert torch.equal(logits.argmax(-1), out[:, n + t])
    finally:
        reducer.remove()


def test_remove_restores_exactly(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base = forward_logits(session, inputs)
    reducer = PreLLMReducer(session, _fixed_plan([[0, 1, 2]] * 3))
    reduced = forward_logits(session, inputs)
    assert reduced.shape[1] == base.shape[1] - (N - 3)
    reducer.remove()
    assert torch.equal(forward_logits(session, inputs), base)
    lm = session.adapter.language_model
    assert not lm._forward_pre_hooks and not lm._forward_hooks
    assert not session.model.model.multi_modal_projector._forward_pre_hooks


def test_capture_sees_the_feature_layer_and_its_projector_input(session, images, prompts):
    layer = feature_layer_index(session.adapter)
    capture = VisionLayerCapture(session.adapter, layer, pixels=True)
    seen = {}

    def plan(features):
        seen["features"] = features.clone()
        return ReductionPlan(order=torch.arange(N).expand(features.shape[0], N))

    reducer = PreLLMReducer(session, plan)
    try:
        inputs = session.prepare(images, prompts)
        forward_logits(session, inputs)
        q, k, out = capture.take()
    finally:
        reducer.remove()
        capture.remove()
    assert out.shape == (3, N + 1, 64) and q.shape == k.shape == out.shape
    assert torch.equal(out[:, 1:], seen["features"])  # "default" strategy: CLS dropped
    assert torch.equal(capture.pixel_values, inputs["pixel_values"])
    with pytest.raises(RuntimeError, match="not run"):
        capture.take()


def test_sequence_selection_layout():
    image_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    order = torch.tensor([[3, 0], [1, 2]])
    valid = torch.tensor([[True, True], [True, False]])
    keep, ok, slot_image, slot_rank = sequence_selection(image_mask, order, valid, 4)
    assert keep.tolist()[0] == [0, 1, 5, 2, 6]
    assert ok[1].tolist() == [False, True, True, True, True]
    assert keep[1, 1:].tolist() == [0, 2, 5, 6]
    assert slot_image[0].tolist() == [-1, -1, 0, 0, -1] and slot_rank[0].tolist() == [-1, -1, 0, 1, -1]


def test_static_cache_and_llava_next_are_refused(session, images, prompts):
    import mmkit

    reducer = PreLLMReducer(session, _fixed_plan([[0, 1]] * 3))
    try:
        inputs = session.prepare(images, prompts)
        with pytest.raises(RuntimeError, match="static KV caches"):
            session.model.generate(**inputs, max_new_tokens=2, cache_implementation="static",
                                   pad_token_id=session.processor.tokenizer.pad_token_id)
    finally:
        reducer.remove()
    nxt = mmkit.load("tiny-random-next", device="cpu")
    with pytest.raises(ValueError, match="LLaVA-1.5 layout"):
        PreLLMReducer(nxt, _fixed_plan([[0]]))
    nxt.close()


def test_composes_with_llm_side_token_dropping(session, images, prompts):
    """FastV on top of a pre-LLM reduction ranks and drops in the reduced sequence; decoding stays consistent."""
    orders = [list(range(0, 64, 4)), list(range(16)), list(range(48, 64))]
    reducer = PreLLMReducer(session, _fixed_plan(orders))
    session.apply("fastv:layer=2,keep=0.5")
    pad = session.processor.tokenizer.pad_token_id
    try:
        results = session.generate(images, prompts, max_new_tokens=5)
        assert [r.stats.visual_tokens_kept for r in results] == [[16, 16, 8, 8]] * 3
        assert [r.stats.visual_tokens for r in results] == [N] * 3
        inputs = session.prepare(images, prompts)
        with torch.inference_mode():
            out = session.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                         pad_token_id=pad)
            n = inputs["input_ids"].shape[1]
            for t in range(4):
                mask = torch.cat([inputs["attention_mask"], torch.ones_like(out[:, n:n + t])], 1)
                logits = session.model(input_ids=out[:, : n + t], attention_mask=mask,
                                       pixel_values=inputs["pixel_values"], use_cache=False).logits[:, -1]
                assert torch.equal(logits.argmax(-1), out[:, n + t])
    finally:
        session.remove_all()
        reducer.remove()
