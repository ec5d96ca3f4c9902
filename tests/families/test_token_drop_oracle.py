"""Oracle test per family: dropping visual tokens at layer K through mmkit's token dropper equals a plain eager run
of the same weights in which those tokens' keys are masked out from layer K on, positions unchanged.

Batch of three rows with left padding and images of different sizes (so rows hold different numbers of visual
tokens, and Qwen-VL rows have different 3-D rotary positions). The reference masks keys with forward pre-hooks on
the eager model's decoder layers (the 4-D mask gets -inf on dropped key columns), in the prefill and in every decode
step; mmkit removes the tokens from the sequence and slices positions, rotary tables and masks.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmkit.patching.token_drop import TokenDropper, keep_top_visual
from mmkit.session import Session

from families_lib import FAMILY_BUILTINS, family_model, family_images

PROMPTS = ["What is in the image?", "Is there a red cube?", "Describe the scene in detail, please."]
DROP_LAYER = 2


def _dropped_mask(image_mask: torch.Tensor) -> torch.Tensor:
    """A different set per row: row 0 drops every other visual token, row 1 the first half, row 2 all but three."""
    drop = torch.zeros_like(image_mask)
    for row in range(image_mask.shape[0]):
        pos = image_mask[row].nonzero().flatten()
        if row % 3 == 0:
            chosen = pos[::2]
        elif row % 3 == 1:
            chosen = pos[: len(pos) // 2]
        else:
            chosen = pos[3:]
        drop[row, chosen] = True
    return drop


def _mask_keys_hook(dropped: torch.Tensor):
    """Pre-hook for an eager decoder layer: dropped prefill positions are never attended (any query, any step)."""

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        assert mask is not None and mask.dim() == 4, "the eager reference expects a 4-D mask"
        cols = torch.zeros(mask.shape[0], mask.shape[-1], dtype=torch.bool, device=mask.device)
        cols[:, : dropped.shape[1]] = dropped
        cols = cols[:, None, None, :]
        if mask.dtype == torch.bool:
            mask = mask & ~cols
        else:
            mask = mask.masked_fill(cols, torch.finfo(mask.dtype).min)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask
        return args, kwargs

    return hook


def _generate_scores(model, inputs, steps=3):
    out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=model.generation_config.pad_token_id)
    return torch.stack(out.scores, 1), out.sequences[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("name", FAMILY_BUILTINS)
def test_drop_equals_eager_key_masking(name):
    torch.manual_seed(0)
    model, processor = family_model(name)
    session = Session(model, processor, name)
    inputs = session.prepare(family_images(), PROMPTS)
    ids = inputs["input_ids"]
    assert (inputs["attention_mask"] == 0).any(), "rows must be left padded"
    image_mask = ids == session.adapter.image_token_id
    counts = image_mask.sum(1)
    assert len(set(counts.tolist())) > 1, "images of different sizes must give different visual-token counts"
    dropped = _dropped_mask(image_mask)

    # Reference: the same weights, eager attention, keys of the dropped tokens masked from DROP_LAYER on.
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    layers = reference.model.language_model.layers
    hooks = [layers[i].register_forward_pre_hook(_mask_keys_hook(dropped), with_kwargs=True)
             for i in range(DROP_LAYER, len(layers))]
    with torch.inference_mode():
        ref_scores, ref_tokens = _generate_scores(reference, inputs)
        ref_last = reference(**inputs).logits[:, -1]
    for h in hooks:
        h.remove()

    # mmkit: the dropper removes exactly those tokens before DROP_LAYER.
    keep_score = (~dropped).float()
    keep_counts = (image_mask & ~dropped).sum(1)

    def select(layer_idx, hidden, current_image_mask, valid):
        return keep_top_visual(keep_score, current_image_mask, keep_counts, valid)

    dropper = TokenDropper(session.context, session.adapter.decoder_layers, {DROP_LAYER: select})
    try:
        with torch.inference_mode():
            logits = model(**inputs).logits
            kept = session.context.visual_per_layer[DROP_LAYER].tolist()
            scores, tokens = _generate_scores(model, inputs)
    finally:
        dropper.remove()
        session.close()

    assert logits.shape[1] < ids.shape[1]  # the sequence really got shorter
    assert kept == keep_counts.tolist()
    torch.testing.assert_close(logits[:, -1], ref_last, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(scores, ref_scores, atol=2e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)
    # Guard against a vacuous oracle: masking the keys really changes the answer's logits.
    with torch.inference_mode():
        plain = model(**inputs).logits[:, -1]
    assert (plain - ref_last).abs().max() > 1e-3


def test_qwen3_deepstack_layers_stay_whole():
    """Qwen3-VL adds DeepStack features at the original image positions after its first decoder layers; drops
    there are refused with the reason, not left to crash in the middle of a forward."""
    from mmkit.errors import MmkitError

    model, processor = family_model("tiny-random-qwen3-vl")
    model.config.vision_config.deepstack_visual_indexes = [0, 1, 2]  # as in the released checkpoints (3 layers)
    session = Session(model, processor, "tiny-random-qwen3-vl")
    try:
        assert session.adapter.first_droppable_layer == 3
        with pytest.raises(MmkitError, match="DeepStack"):
            session.apply("fastv:layer=2,keep=0.5")
        with pytest.raises(ValueError, match="DeepStack"):
            TokenDropper(session.context, session.adapter.decoder_layers, {1: None})
        handle = session.apply("fastv:layer=3,keep=0.5")
        handle.remove()
    finally:
        session.close()
