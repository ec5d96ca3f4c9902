"""PAINT on LLaVA-NeXT, LLaVA-OneVision and the Qwen-VL families (tiny built-in models).

Independent references: the local / summary token sets against the vision tower's attention recomputed eagerly
(CLIP / SigLIP: a copy of the tower run with eager attention and `output_attentions`; Qwen-VL: the block's
attention recomputed from its q/k with transformers' own vision rotary), placed on the prompt by matching the
projected rows the language model receives; and the logits against a run whose decoder attention is transformers'
eager formula with the paper's edit z + alpha |z| on the current row (its q/k come from the model's own code, so
Qwen's 3-D rotary positions are whatever the model computes).

The batch is three rows of different prompts, left padded, with images of three sizes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import mmkit
from mmkit.errors import MmkitError

from families_lib import family_images

FAMILIES = ["tiny-random-next", "tiny-random-onevision", "tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl",
            "tiny-random-qwen3-vl"]
QWEN = FAMILIES[2:]
PROMPTS = ["What is in the image?", "Is there a red cube?", "Describe the scene in detail, please."]
ON = "paint:start_layer=1"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    session = mmkit.load(request.param, device="cpu")
    yield request.param, session
    session.close()


def _logits(session, inputs):
    with torch.inference_mode():
        return session.model(**inputs, use_cache=False).logits[:, -1]


def test_paint_changes_outputs_and_remove_restores_exactly(family):
    name, session = family
    inputs = session.prepare(family_images(), PROMPTS)
    base = _logits(session, inputs)
    handle = session.apply(ON)
    try:
        boosted = _logits(session, inputs)
        state = handle.impl._state
        image = inputs["input_ids"] == session.adapter.image_token_id
        assert bool(state.local.any()) and not bool((state.local & state.summary).any())
        assert not bool((state.local & ~image).any()) and not bool((state.summary & ~image).any())
        assert (state.local.sum(1) <= 0.25 * image.sum(1)).all()
        assert (boosted - base).abs().max() > 1e-5, f"paint changed nothing on {name}"
    finally:
        handle.remove()
    assert torch.equal(_logits(session, inputs), base)


def test_zero_gains_are_bit_identical(family):
    name, session = family
    images = family_images()
    inputs = session.prepare(images, PROMPTS)
    base = _logits(session, inputs)
    text = [r.text for r in session.generate(images, PROMPTS, max_new_tokens=3)]
    handle = session.apply("paint:alpha=0,beta=0")
    try:
        assert handle.impl._handles == [] and handle.impl._scorer is None
        assert torch.equal(_logits(session, inputs), base)
        assert [r.text for r in session.generate(images, PROMPTS, max_new_tokens=3)] == text
    finally:
        handle.remove()


def test_batch_of_different_prompts_and_image_sizes_equals_single_runs(family):
    name, session = family
    images = family_images()
    handle = session.apply(ON)
    try:
        inputs = session.prepare(images, PROMPTS)
        assert (inputs["attention_mask"] == 0).any(), "rows must be left padded"
        counts = (inputs["input_ids"] == session.adapter.image_token_id).sum(1).tolist()
        assert len(set(counts)) == 3, "the images must give different numbers of image tokens"
        batch_logits = _logits(session, inputs)
        batch = session.generate(images, PROMPTS, max_new_tokens=3)
        for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
            single = _logits(session, session.prepare([image], [prompt]))
            torch.testing.assert_close(batch_logits[i:i + 1], single, atol=1e-4, rtol=1e-4)
            assert session.generate([image], [prompt], max_new_tokens=3)[0].text == batch[i].text
    finally:
        handle.remove()


def test_the_score_choice_is_automatic_and_logged(family, caplog):
    name, session = family
    expected = "cls" if name == "tiny-random-next" else "mean"
    with caplog.at_level("INFO", logger="mmkit.hallucination.paint"):
        handle = session.apply(ON)
    handle.remove()
    assert f"local tokens by {expected} at vision layer 0" in caplog.text
    assert f"summary tokens by {expected} at vision layer" in caplog.text
    if name != "tiny-random-next":
        with pytest.raises(MmkitError, match="local_score=cls needs a vision tower with a CLS token"):
            session.apply("paint:local_score=cls")
        with pytest.raises(MmkitError, match="summary_score=cls needs a vision tower with a CLS token"):
            session.apply("paint:summary_score=cls")
        assert session.methods == []


# -- independent references ----------------------------------------------------------------------------------------
def _select(local_scores, summary_scores, ratio=0.25):
    """The official `update_modpai_alpha` rule on one image's tokens (NaN = a row newline, never chosen): local =
    top int(ratio N), summary = IQR outliers (numpy percentiles), local -= summary."""
    real = ~np.isnan(local_scores)
    local = np.zeros(local_scores.shape, dtype=bool)
    summary = np.zeros(local_scores.shape, dtype=bool)
    idx = np.flatnonzero(real)
    scores = summary_scores[idx]
    q1, q3 = np.percentile(scores, 25), np.percentile(scores, 75)
    summary[idx] = scores > q3 + 1.5 * (q3 - q1)
    order = idx[np.argsort(-local_scores[idx], kind="stable")]
    local[order[:int(ratio * idx.size)]] = True
    return local & ~summary, summary


def _tower_token_scores(session, inputs):
    """CLIP / SigLIP towers: per row, per image position, the (local, summary) score of the tile patch the token
    comes from (NaN for row newlines), from an eager copy of the tower run with `output_attentions`."""
    adapter = session.adapter
    tower = adapter.vision_tower
    seen = {}
    hooks = [tower.register_forward_pre_hook(
        lambda m, a, kw: seen.update(pixels=a[0] if a else kw["pixel_values"]), with_kwargs=True),
        session.model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: seen.update(proj=o)),
        adapter.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)]
    try:
        _logits(session, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(seen["pixels"], output_attentions=True).attentions
    layers = len(attentions)
    if adapter.has_cls_token:      # CLS row, summed over heads, over the patches (CLS dropped from the features)
        local = attentions[0][:, :, 0, 1:].sum(1)
        summary = attentions[layers - 2][:, :, 0, 1:].sum(1)
    else:                          # attention received: summed over heads, averaged over queries
        local = attentions[0].sum(1).mean(1)
        summary = attentions[layers - 2].sum(1).mean(1)
    proj = seen["proj"].flatten(0, 1).float()
    newline = session.model.model.image_newline.float()
    image = inputs["input_ids"] == adapter.image_token_id
    rows = []
    for b in range(image.shape[0]):
        embeds = seen["embeds"][b][image[b]].float()
        distance = torch.cdist(embeds, proj)        # cdist's matmul form: ~1e-5 noise on equal rows
        nearest = distance.min(1)
        is_newline = (embeds - newline).abs().max(1).values < 1e-6
        assert bool(((nearest.values < 1e-3) | is_newline).all()), "every image token is a projected patch or a newline"
        assert int(is_newline.sum()) > 0
        patches = nearest.indices[~is_newline]
        assert patches.unique().numel() == patches.numel()      # each patch matched once
        values = np.full((embeds.shape[0], 2), np.nan)
        patch = nearest.indices[~is_newline]
        values[(~is_newline).numpy(), 0] = local.flatten()[patch].double().numpy()
        values[(~is_newline).numpy(), 1] = summary.flatten()[patch].double().numpy()
        rows.append(values)
    return rows


def _native_token_scores(session, inputs):
    """Qwen-VL towers: per row, per image position, the (local, summary) score of the visual token: the attention
    each patch receives in block 0 (the local layer, and the summary layer of these 2-block towers), recomputed from
    the block's q/k with transformers' vision rotary per attention segment (windows on Qwen2.5-VL), times the
    segment's length, averaged over the token's 2 x 2 patches; tokens matched to the merger's output rows."""
    module = __import__(type(session.model).__module__, fromlist=["apply_rotary_pos_emb_vision"])
    tower = session.adapter.vision_tower
    assert len(tower.blocks) == 2   # summary layer = the second-to-last = block 0, as the local layer
    block = tower.blocks[0]
    seen = {}
    hooks = [block.attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(hidden=a[0] if a else kw["hidden_states"], cu=kw["cu_seqlens"],
                                     rope=kw["position_embeddings"]), with_kwargs=True),
        tower.blocks[-1].register_forward_hook(lambda m, a, o: seen.update(last=o)),
        tower.register_forward_hook(lambda m, a, kw, o: seen.update(tokens=o.pooler_output), with_kwargs=True)]
    try:
        _logits(session, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    attn = block.attn
    with torch.no_grad():
        n = seen["hidden"].shape[0]
        q, k, _ = attn.qkv(seen["hidden"]).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = seen["rope"]
        q, k = module.apply_rotary_pos_emb_vision(q, k, cos, sin)
        received = torch.zeros(n, dtype=torch.float64)
        cu = seen["cu"].tolist()
        for start, end in zip(cu[:-1], cu[1:]):
            qh, kh = q[start:end].transpose(0, 1).double(), k[start:end].transpose(0, 1).double()
            probs = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scaling, dim=-1)
            received[start:end] = probs.mean(dim=(0, 1)) * (end - start)
        merged = tower.merger(seen["last"])                 # block order
    group_to_image = torch.cdist(merged.float(), seen["tokens"].float()).argmin(1)
    assert torch.equal(group_to_image.sort().values, torch.arange(n // 4))
    per_token = torch.empty(n // 4, dtype=torch.float64)
    per_token[group_to_image] = received.view(-1, 4).mean(1)
    counts = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    return [np.stack([t.numpy(), t.numpy()], 1) for t in torch.split(per_token, counts)]


def _expected_sets(session, inputs):
    """(local, summary) (B, n) bool in prompt coordinates from the independent scores (one image per row)."""
    scores = (_native_token_scores if hasattr(session.adapter.vision_tower, "blocks") else _tower_token_scores)(
        session, inputs)
    image = inputs["input_ids"] == session.adapter.image_token_id
    local = torch.zeros(image.shape, dtype=torch.bool)
    summary = torch.zeros(image.shape, dtype=torch.bool)
    for b, values in enumerate(scores):
        row_local, row_summary = _select(values[:, 0], values[:, 1])
        local[b, image[b]] = torch.from_numpy(row_local)
        summary[b, image[b]] = torch.from_numpy(row_summary)
    return local, summary


def test_token_sets_equal_an_eager_recompute_of_the_tower_attention(family):
    name, session = family
    inputs = session.prepare(family_images(), PROMPTS)
    local, summary = _expected_sets(session, inputs)
    assert bool(local.any())
    handle = session.apply(ON)
    try:
        _logits(session, inputs)
        state = handle.impl._state
        assert torch.equal(state.local.cpu(), local)
        assert torch.equal(state.summary.cpu(), summary)
    finally:
        handle.remove()


def _edited_eager(local, summary, alpha, beta, start, calls):
    """transformers' eager attention with the paper's edit on the current (last) row of layers >= start, on the
    prompt's local / summary keys, in float64."""

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls.append(module.layer_idx)
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1).double(), value.repeat_interleave(groups, 1).double()
        z = query.double() @ k.transpose(-1, -2) * scaling
        if module.layer_idx >= start:
            gain = (local * alpha + summary * beta).double().to(z.device)[:, None, :]     # (B, 1, n)
            z[:, :, -1] = z[:, :, -1] + gain * z[:, :, -1].abs()
        if attention_mask is not None:
            z = z + attention_mask[:, :, :, :k.shape[-2]].double()
        out = torch.softmax(z, dim=-1) @ v
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return attention


def test_logits_equal_eager_attention_with_the_papers_edit(family):
    """Prefill logits of a left-padded batch: PAINT (through the probe) equals a run whose decoder attention is the
    eager formula with z + alpha |z| (local) and z + beta |z| (summary) on the last row, q/k from the model's own
    rotary (Qwen: 3-D positions)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    name, session = family
    alpha, beta, start = 3.0, 2.0, 1    # large gains, so the edit is far above the tolerance
    inputs = session.prepare(family_images(), PROMPTS)
    local, summary = _expected_sets(session, inputs)
    handle = session.apply(f"paint:start_layer={start},alpha={alpha},beta={beta}")
    try:
        got = _logits(session, inputs)
    finally:
        handle.remove()
    text_config = session.adapter.text_config
    calls = []
    AttentionInterface.register("paint_reference", _edited_eager(local, summary, alpha, beta, start, calls))
    ALL_MASK_ATTENTION_FUNCTIONS.register("paint_reference", eager_mask)
    saved = text_config._attn_implementation
    text_config._attn_implementation = "paint_reference"
    try:
        expected = _logits(session, inputs)
    finally:
        text_config._attn_implementation = saved
    plain = _logits(session, inputs)
    assert sorted(set(calls)) == list(range(session.adapter.num_layers))   # the reference ran in every layer
    error, effect = float((got - expected).abs().max()), float((got - plain).abs().max())
    assert error < 1e-5 and effect > 100 * error, (error, effect)


def test_onevision_grid_resized_after_projection_gets_resized_scores():
    """OneVision shrinks a high-resolution grid of more than `anyres_max_N` tiles by bilinear resize after the
    projector; PAINT's per-patch scores go through the same resize, so the token sets fit the shrunk image spans,
    newlines stay out, and the batch still equals single runs."""
    session = mmkit.load("tiny-random-onevision", device="cpu")
    try:
        session.model.config.vision_aspect_ratio = "anyres_max_1"
        session.processor.vision_aspect_ratio = "anyres_max_1"
        images = family_images()
        inputs = session.prepare(images, PROMPTS)
        image = inputs["input_ids"] == session.adapter.image_token_id
        assert image.sum(1).tolist()[0] < 24          # the 2 x 2 grid of the square image was shrunk
        seen = {}
        hook = session.adapter.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"]), with_kwargs=True)
        handle = session.apply(ON)
        try:
            logits = _logits(session, inputs)
        finally:
            hook.remove()
        state = handle.impl._state
        newline = (seen["embeds"] - session.model.model.image_newline).abs().max(-1).values < 1e-6
        assert bool(state.local.any())
        assert not bool(((state.local | state.summary) & (~image | newline)).any())
        for i, (im, prompt) in enumerate(zip(images, PROMPTS)):
            single = _logits(session, session.prepare([im], [prompt]))
            torch.testing.assert_close(logits[i:i + 1], single, atol=1e-4, rtol=1e-4)
        handle.remove()
    finally:
        session.close()
