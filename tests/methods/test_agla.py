import importlib.util
import math

import numpy as np
import pytest
import torch

from conftest import forward_logits, tiny_blip, tiny_clip
from mmkit.errors import MmkitError
from mmkit.hallucination.agla import AGLAConfig, fill_value, keep_mask, pixel_saliency
from mmkit.hallucination.common import image_normalisation
from mmkit.hallucination.agla_views import image_views


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
        grid, itc = handle.impl.matcher.relevance(inputs, image_views(session, inputs))
    handle.remove()
    assert itc is None
    expected = _eager_relevance(session, inputs, (1, 3))
    assert torch.allclose(torch.stack(grid), expected, atol=1e-6, rtol=1e-4)


def test_scoring_pass_stops_after_the_last_scoring_layer(session, images, prompts):
    calls = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, layer in enumerate(session.adapter.decoder_layers)]
    try:
        handle = session.apply("agla:layers=1")
        with torch.inference_mode():
            inputs = session.prepare(images, prompts)
            handle.impl.matcher.relevance(inputs, image_views(session, inputs))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [0, 1]
    assert session.context.prefill is False


def test_local_view_masks_the_least_relevant_pixels(session, images, prompts):
    side = session.model.config.vision_config.image_size
    grid = torch.zeros(1, 4, 4)
    grid[0, 0, 0] = 1.0  # one relevant patch in the top-left corner
    saliency = pixel_saliency(grid, (side, side), blur=0.02)
    assert saliency.min() == 0 and saliency.max() == 1
    keep = keep_mask(saliency, torch.tensor([0.25]))[0]
    assert abs(keep.float().mean().item() - 0.25) < 0.05
    assert bool(keep[0, 0]) and not bool(keep[-1, -1])
    inputs = session.prepare(images, prompts)
    pixels = inputs["pixel_values"]
    views = image_views(session, inputs)
    mean, std = image_normalisation(session)
    fills = [fill_value(image, "black", mean, std) for image in views.canvases]
    masked = views.masked([keep] * 3, fills)["pixel_values"]
    assert torch.equal(masked[:, :, keep], pixels[:, :, keep])
    black = masked[:, :, -1, -1] * std.flatten() + mean.flatten()
    assert torch.allclose(black, torch.zeros(3), atol=1e-6)
    fills = [fill_value(image, "mean", mean, std) for image in views.canvases]
    mean_fill = views.masked([keep] * 3, fills)["pixel_values"]
    assert torch.allclose(mean_fill[:, :, -1, -1], pixels.mean((2, 3)))


def test_combination_rule(session, images, prompts):
    handle = session.apply("agla:alpha=1.5,beta=0.3,keep=0.6")
    inputs = session.prepare(images, prompts)
    with torch.inference_mode():
        expanded = handle.impl.expand_inputs(session, inputs)
        z = session.model(**expanded, logits_to_keep=1).logits[:, -1].float()
    assert torch.equal(expanded["pixel_values"][:3], inputs["pixel_values"])
    assert not torch.equal(expanded["pixel_values"][3:], inputs["pixel_values"])
    assert torch.allclose(torch.stack(handle.impl.last_mask).float().mean((1, 2)), torch.full((3,), 0.6), atol=0.01)
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
        grid, itc = handle.impl.matcher.relevance(inputs, image_views(session, inputs))
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
    ("agla:matcher=sam", "matcher"),
    ("agla:matcher=blip", "blip=PATH"),
    ("agla:matcher=attention,blip=/x", "only used with matcher=blip"),
    ("agla:matcher=clip,clip_model=/x,blip=/y", "only used with matcher=blip"),
    ("agla:blip=/x,layers=1", "layers are only used with the attention matcher"),
    ("agla:blip_layer=-1", "blip_layer"),
    ("agla:fill=white", "fill"),
    ("agla:layers=9", "past the last decoder layer"),
])
def test_config_validation(session, spec, message):
    with pytest.raises(MmkitError, match=message):
        session.apply(spec)


# -- the paper's matcher: Grad-CAM of BLIP's image-text matching head --------------------------------------------
@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("blip")
    tiny_blip(path)
    return path


BLIP_BLOCK = 1  # the tiny BLIP has 3 text blocks; the paper's block 6 exists only in BLIP's 12-block text encoder


def _reference_gradcam(path, block, image, text):
    """Grad-CAM and ITC of one (image, text) pair recomputed from scratch: eager BLIP forward with transformers'
    own cross-attention outputs, autograd of the ITM match logit, and LAVIS's formula written out token by token."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    model = BlipForImageTextRetrieval.from_pretrained(path).eval()
    processor = BlipProcessor.from_pretrained(path)
    enc = processor(images=[image], text=[text], return_tensors="pt")
    itm_ids = enc["input_ids"].clone()
    itm_ids[0, 0] = processor.tokenizer.convert_tokens_to_ids("[ENC]")  # official BLIP: [ENC] opens the ITM text
    image_embeds = model.vision_model(pixel_values=enc["pixel_values"]).last_hidden_state
    out = model.text_encoder(input_ids=itm_ids, attention_mask=enc["attention_mask"],
                             encoder_hidden_states=image_embeds, output_attentions=True)
    match = model.itm_head(out.last_hidden_state[:, 0])[0, 1]
    (grad,) = torch.autograd.grad(match, out.cross_attentions[block])
    attention, grad = out.cross_attentions[block][0], grad[0]  # (heads, T, 1 + P)
    length = itm_ids.shape[1] - 2  # without the first token and [SEP]
    cam = torch.zeros(attention.shape[-1] - 1)
    for t in range(1, length + 1):
        cam += (attention[:, t, 1:] * grad[:, t, 1:].clamp(min=0)).mean(0)
    cam = cam / length
    text_cls = model.text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    itc = torch.cosine_similarity(model.vision_proj(image_embeds[0, 0]), model.text_proj(text_cls[0, 0]), dim=0)
    side = int(math.isqrt(cam.numel()))
    return cam.view(side, side).detach(), itc.detach()


def test_blip_gradcam_matches_an_independent_recomputation(session, images, blip_dir):
    handle = session.apply(f"agla:blip={blip_dir},blip_layer={BLIP_BLOCK}")
    texts = ["what is in the image?", "describe the image in detail, please", "count the objects"]
    with torch.inference_mode():  # generation runs under inference mode: the matcher must still get gradients
        grid, itc = handle.impl.matcher.scores(images, texts)
    assert grid.shape == (3, 4, 4)  # BLIP's patch grid: 64 px / 16 px patches
    for i, (image, text) in enumerate(zip(images, texts)):  # single rows: also checks the padded batch
        expected_cam, expected_itc = _reference_gradcam(blip_dir, BLIP_BLOCK, image, text)
        assert bool((expected_cam > 0).any())
        assert torch.allclose(grid[i], expected_cam, rtol=1e-4, atol=1e-9)
        assert torch.allclose(itc[i], expected_itc, atol=1e-6)


def test_blip_map_follows_the_text(session, images, blip_dir):
    handle = session.apply(f"agla:blip={blip_dir},blip_layer={BLIP_BLOCK}")
    with torch.inference_mode():
        grid, itc = handle.impl.matcher.scores([images[0]] * 2, ["a red dog", "count the blue objects"])
    assert not torch.allclose(grid[0], grid[1], rtol=1e-3, atol=0)
    assert not torch.allclose(itc[0], itc[1])


def test_blip_matcher_builds_the_paper_local_view(session, images, prompts, blip_dir):
    inputs = session.prepare(images, prompts)
    base_logits = forward_logits(session, inputs)
    base_scores = _scores(session, images, prompts)
    handle = session.apply(f"agla:blip={blip_dir},blip_layer={BLIP_BLOCK}")  # auto -> blip
    matcher = handle.impl.matcher
    assert type(matcher).__name__ == "BlipMatcher" and matcher.block == BLIP_BLOCK
    if importlib.util.find_spec("torchvision") is None:  # BLIP's image processor needs no torchvision
        assert type(matcher.processor.image_processor).__name__ == "BlipImageProcessorPil"
    # BLIP reads the user prompt, cleaned as LAVIS's caption processor does, not the chat template.
    assert matcher.prompts(inputs["input_ids"]) == ["what is in the image?", "describe the image in detail, please",
                                                    "count the objects"]
    scores = _scores(session, images, prompts)
    assert not torch.allclose(scores, base_scores, atol=1e-3)
    # Keep fraction: the official 1 - ITC/2, and the mask keeps that share of the LVLM's pixels.
    with torch.inference_mode():
        _, itc = matcher.relevance(inputs, image_views(session, inputs))
    assert torch.allclose(handle.impl.last_keep, (1 - itc / 2).clamp(max=1 - 1e-5))
    kept = torch.stack(handle.impl.last_mask).float().mean((1, 2))
    pixels = inputs["pixel_values"][0, 0].numel()
    assert torch.allclose(kept, handle.impl.last_keep, atol=1.0 / pixels)  # int(keep * pixels) are kept
    assert bool((kept < 1).all())
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base_logits)
    assert torch.equal(_scores(session, images, prompts), base_scores)


def test_blip_local_view_differs_from_the_attention_one(session, images, prompts, blip_dir):
    inputs = session.prepare(images, prompts)
    masks = {}
    for spec in (f"agla:blip={blip_dir},blip_layer={BLIP_BLOCK},keep=0.6", "agla:matcher=attention,keep=0.6"):
        handle = session.apply(spec)
        with torch.inference_mode():
            handle.impl.local_view(inputs)
        masks[spec] = torch.stack(handle.impl.last_mask)
        handle.remove()
    first, second = masks.values()
    assert not torch.equal(first, second)


def test_blip_batch_of_different_prompts_equals_single_runs(session, images, prompts, blip_dir):
    session.apply(f"agla:blip={blip_dir},blip_layer={BLIP_BLOCK}")
    batched = [r.text for r in session.generate(images, prompts, max_new_tokens=6)]
    batch_scores = _scores(session, images, prompts)
    for i in range(3):
        assert session.generate([images[i]], [prompts[i]], max_new_tokens=6)[0].text == batched[i]
        single = _scores(session, [images[i]], [prompts[i]])[0]
        finite = torch.isfinite(single)
        assert torch.equal(finite, torch.isfinite(batch_scores[i]))
        assert torch.allclose(single[finite], batch_scores[i][finite], atol=1e-4)


def test_blip_matcher_reports_a_checkpoint_that_does_not_load(session, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # A hub id goes to from_pretrained; offline (and with an empty cache) it cannot resolve, without network waits.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [(f"agla:blip={tmp_path / 'missing'}", "does not exist; give a BLIP image-text matching checkpoint"),
             (f"agla:matcher=blip,blip={tmp_path}", "could not load a BLIP image-text matching model"),
             ("agla:blip=nobody/no-such-blip", "could not load a BLIP image-text matching model")]
    for spec, message in cases:
        with pytest.raises(MmkitError, match=message) as err:
            session.apply(spec)
        assert "\n" not in str(err.value)
    assert session.methods == []


def test_blip_layer_must_be_a_cross_attention_block(session, blip_dir):
    with pytest.raises(MmkitError, match="blip_layer=3 is not a cross-attention block"):
        session.apply(f"agla:blip={blip_dir},blip_layer=3")
    assert session.methods == []


def test_default_matcher_without_blip_is_the_lvlm_attention_with_a_warning(session, caplog):
    with caplog.at_level("WARNING", logger="mmkit.hallucination.agla"):
        handle = session.apply("agla")
    assert type(handle.impl.matcher).__name__ == "AttentionMatcher"
    assert any("instead of the paper's BLIP-ITM Grad-CAM" in r.getMessage() for r in caplog.records)
    handle.remove()
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmkit.hallucination.agla"):
        session.apply("agla:matcher=attention")  # asked for: no warning
    assert not caplog.records


def test_itm_first_token_follows_the_checkpoint(blip_dir):
    from transformers import BertTokenizer

    from mmkit.hallucination.agla_blip import itm_first_token

    with_enc = BertTokenizer(str(blip_dir / "vocab.txt"))
    assert itm_first_token(with_enc, len(with_enc)) == with_enc.convert_tokens_to_ids("[ENC]")
    words = [w for w in (blip_dir / "vocab.txt").read_text().split("\n") if w and w != "[ENC]"]
    plain = blip_dir.parent / "vocab_without_enc.txt"
    plain.write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(plain))
    # LAVIS's layout: [ENC] was the last row added to the text embedding, after [DEC].
    assert itm_first_token(tokenizer, len(tokenizer) + 1) == len(tokenizer)
    assert itm_first_token(tokenizer, len(tokenizer)) is None


def test_blip_reads_the_bare_question(session, images, blip_dir):
    """The official code adds its answer-format suffix to LLaVA's prompt only; BLIP gets the question."""
    handle = session.apply(f"agla:blip={blip_dir},blip_layer={BLIP_BLOCK}")
    prompts = ["Is there a dog in the image? Answer yes or no.",
               "Is there a cat? Please answer this question with one word.",
               "What is red?\nAnswer the question using a single word or phrase."]
    inputs = session.prepare(images, prompts)
    assert handle.impl.matcher.prompts(inputs["input_ids"]) == ["is there a dog in the image?", "is there a cat?",
                                                                "what is red?"]


def test_blip_caption_cleans_like_lavis():
    from mmkit.hallucination.agla_blip import blip_caption

    assert blip_caption('Is there a "dog" (or cat) in the image?  Answer: yes.') == \
        "is there a dog or cat in the image? answer yes"
    assert len(blip_caption(" ".join(["word"] * 80)).split(" ")) == 50
