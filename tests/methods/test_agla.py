import math

import numpy as np
import pytest
import torch

from conftest import forward_logits, tiny_clip
from mmkit.errors import MmkitError
from mmkit.hallucination.agla import AGLAConfig, keep_mask, mask_pixels, pixel_saliency


def _scores(session, images, prompts):
    return torch.tensor(session.answer_logprobs(images, prompts, ["a", "b", "c"]).logprobs)


def _eager_relevance(session, inputs, layers):
    """Reference: text-after-image rows of the full attention matrices from eager attention, mean over heads,
    rows and layers, at the image columns."""
    model = session.model
    original = model.config.text_config._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": original})
    image = inputs["input_ids"] == session.adapter.image_token_id
    rows = []
    for b in range(image.shape[0]):
        last = int(image[b].nonzero().max())
        per_layer = [attentions[l][b, :, last + 1:].float().mean((0, 1)) for l in layers]
        rows.append(torch.stack(per_layer).mean(0)[image[b]])
    return torch.stack(rows).view(-1, 8, 8)


def test_attention_matcher_matches_eager_attention(session, images, prompts):
    inputs = session.prepare(images, prompts)
    handle = session.apply("agla:layers=1/3")
    with torch.inference_mode():
        grid, itc = handle.impl.matcher.relevance(inputs)
    handle.remove()
    assert itc is None
    expected = _eager_relevance(session, inputs, (1, 3))
    assert torch.allclose(grid, expected, atol=1e-6, rtol=1e-4)


def test_scoring_pass_stops_after_the_last_scoring_layer(session, images, prompts):
    calls = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, layer in enumerate(session.adapter.decoder_layers)]
    try:
        handle = session.apply("agla:layers=1")
        with torch.inference_mode():
            handle.impl.matcher.relevance(session.prepare(images, prompts))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0, 1]
    assert session.context.prefill is False


def test_local_view_masks_the_least_relevant_pixels():
    grid = torch.zeros(1, 4, 4)
    grid[0, 0, 0] = 1.0  # one relevant patch in the top-left corner
    saliency = pixel_saliency(grid, (32, 32), blur=0.02)
    assert saliency.min() == 0 and saliency.max() == 1
    keep = keep_mask(saliency, torch.tensor([0.25]))
    assert abs(keep.float().mean().item() - 0.25) < 0.05
    assert bool(keep[0, 0, 0]) and not bool(keep[0, -1, -1])
    mean = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)
    std = torch.tensor([0.2, 0.2, 0.2]).view(3, 1, 1)
    pixels = torch.randn(1, 3, 32, 32)
    masked = mask_pixels(pixels, keep, "black", mean, std)
    assert torch.equal(masked[:, :, keep[0]], pixels[:, :, keep[0]])
    black = masked[0, :, -1, -1] * std.flatten() + mean.flatten()
    assert torch.allclose(black, torch.zeros(3), atol=1e-6)
    mean_fill = mask_pixels(pixels, keep, "mean", mean, std)
    assert torch.allclose(mean_fill[0, :, -1, -1], pixels[0].mean((1, 2)))


def test_combination_rule(session, images, prompts):
    handle = session.apply("agla:alpha=1.5,beta=0.3,keep=0.6")
    inputs = session.prepare(images, prompts)
    with torch.inference_mode():
        expanded = handle.impl.expand_inputs(session, inputs)
        z = session.model(**expanded, logits_to_keep=1).logits[:, -1].float()
    assert torch.equal(expanded["pixel_values"][:3], inputs["pixel_values"])
    assert not torch.equal(expanded["pixel_values"][3:], inputs["pixel_values"])
    assert torch.allclose(handle.impl.last_mask.float().mean((1, 2)), torch.full((3,), 0.6), atol=0.01)
    glob, local = z[:3], z[3:]
    expected = glob + 1.5 * local  # AGLA adds the local view
    expected[glob < math.log(0.3) + glob.max(-1, keepdim=True).values] = float("-inf")
    got = handle.impl.combine_logits(z)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.allclose(got[torch.isfinite(got)], expected[torch.isfinite(expected)])


def test_alpha_zero_is_identical_to_baseline(session, images, prompts):
    base_scores = _scores(session, images, prompts)
    base_text = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
    session.apply("agla:alpha=0")
    assert torch.equal(_scores(session, images, prompts), base_scores)
    assert [r.text for r in session.generate(images, prompts, max_new_tokens=6)] == base_text


def test_changes_outputs_and_remove_restores(session, images, prompts):
    inputs = session.prepare(images, prompts)
    base_logits = forward_logits(session, inputs)
    base_scores = _scores(session, images, prompts)
    base_text = [r.text for r in session.generate(images, prompts, max_new_tokens=8)]
    handle = session.apply("agla:beta=0")
    assert not torch.allclose(_scores(session, images, prompts), base_scores, atol=1e-3)
    assert [r.text for r in session.generate(images, prompts, max_new_tokens=8)] != base_text
    handle.remove()
    assert session.model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(forward_logits(session, inputs), base_logits)
    assert torch.equal(_scores(session, images, prompts), base_scores)


def test_batch_of_different_prompts_equals_single_runs(session, images, prompts):
    session.apply("agla")
    batched = [r.text for r in session.generate(images, prompts, max_new_tokens=8)]
    batch_scores = _scores(session, images, prompts)
    for i in range(3):
        assert session.generate([images[i]], [prompts[i]], max_new_tokens=8)[0].text == batched[i]
        single = _scores(session, [images[i]], [prompts[i]])[0]
        finite = torch.isfinite(single)
        assert torch.equal(finite, torch.isfinite(batch_scores[i]))
        assert torch.allclose(single[finite], batch_scores[i][finite], atol=1e-4)


def test_sampling_is_seeded(session, images, prompts):
    session.apply("agla:beta=0.05")
    a = [r.text for r in session.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=5)]
    assert a == [r.text for r in session.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=5)]
    assert a != [r.text for r in session.generate(images, prompts, max_new_tokens=8, do_sample=True, seed=6)]


def test_clip_matcher(session, images, prompts, tmp_path):
    tiny_clip(tmp_path)
    base = torch.tensor(session.answer_logprobs(images, prompts, choices=["yes", "no"]).logprobs)
    handle = session.apply(f"agla:matcher=clip,clip_model={tmp_path}")
    inputs = session.prepare(images, prompts)
    assert handle.impl.matcher.prompts(inputs["input_ids"]) == prompts
    with torch.inference_mode():
        grid, itc = handle.impl.matcher.relevance(inputs)
    assert grid.shape == (3, 4, 4) and bool((grid >= 0).all()) and bool((grid > 0).any())
    assert itc.shape == (3,) and bool((itc.abs() <= 1.0 + 1e-5).all())
    result = session.generate(images, prompts, max_new_tokens=4)
    assert len(result) == 3 and all(r.stats.new_tokens >= 1 for r in result)
    # The keep fraction follows the official 1 - ITC/2 rule.
    assert torch.allclose(handle.impl.last_keep, (1 - itc / 2).clamp(max=1 - 1e-5))
    # The CLIP-masked view enters the ensemble: the answer scores move away from the plain model's.
    with_agla = torch.tensor(session.answer_logprobs(images, prompts, choices=["yes", "no"]).logprobs)
    assert not torch.allclose(with_agla, base, atol=1e-4)


def test_clip_matcher_reports_a_path_that_does_not_load(session, tmp_path):
    with pytest.raises(MmkitError, match="could not load a CLIP model"):
        session.apply(f"agla:matcher=clip,clip_model={tmp_path / 'missing'}")
    assert session.methods == []


@pytest.mark.parametrize("spec, message", [
    ("agla:alpha=-1", "alpha"),
    ("agla:beta=2", "beta"),
    ("agla:keep=0", "keep"),
    ("agla:matcher=clip", "clip_model"),
    ("agla:clip_model=/x", "matcher=clip"),
    ("agla:matcher=blip", "matcher"),
    ("agla:fill=white", "fill"),
    ("agla:layers=9", "past the last decoder layer"),
])
def test_config_validation(session, spec, message):
    with pytest.raises(MmkitError, match=message):
        session.apply(spec)


def test_llava_next_is_refused():
    import mmkit

    next_session = mmkit.load("tiny-random-next", device="cpu")
    try:
        with pytest.raises(MmkitError, match="LLaVA-1.5-layout"):
            next_session.apply("agla")
    finally:
        next_session.close()
