"""AGLA on LLaVA-NeXT, LLaVA-OneVision and Qwen-VL: the local view is masked in each family's own pixel layout.

The geometry checks are independent of `agla_views`: the test image carries its own coordinates (red = x, green =
y, blue = 255), so every pixel the processor produced (any anyres tile, any Qwen-VL patch row) says where in the
image it came from, and masked pixels (black) are told apart by their blue channel. Attention mass is put on one
known image token; the kept pixels must come from that token's image region (read from the processor's own output
for the token's patch) and cover it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmkit
from conftest import forward_logits, tiny_blip, tiny_clip
from mmkit.hallucination.agla_views import image_views

from families_lib import family_images

ANYRES = ("tiny-random-next", "tiny-random-onevision")
QWEN = ("tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl", "tiny-random-qwen3-vl")
PROMPTS = ["What is in the image?", "Is there a red cube?", "Describe the scene in detail, please."]


@pytest.fixture(scope="module", params=ANYRES + QWEN)
def family(request):
    session = mmkit.load(request.param, device="cpu")
    yield request.param, session
    session.close()


def coordinate_image(height: int, width: int) -> np.ndarray:
    """red = x, green = y (pixel centres, as a share of the side), blue = 255."""
    ys, xs = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    return np.stack([xs * 255, ys * 255, np.full_like(xs, 255)], axis=-1).round().astype("uint8")


def _unnormalise(session, pixels: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) processed pixels back to [0, 1]."""
    processor = session.processor.image_processor
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    return pixels.float() * std + mean


def _one_hot_attention(handle, session, token: int):
    """Make the attention matcher report all the prompt's attention on image token `token` of row 0."""

    def relevance(inputs, views):
        ids = inputs["input_ids"]
        mass = torch.zeros(ids.shape)
        mass[0, (ids[0] == session.adapter.image_token_id).nonzero()[token, 0]] = 1.0
        return views.token_grids(mass), None

    handle.impl.matcher.relevance = relevance


def _check_region(kept_xy: torch.Tensor, own_kept: torch.Tensor, region: tuple, margin: float):
    """kept_xy (N, 2) image positions (x, y) of every kept pixel; own_kept: bool over the token's own pixels."""
    x0, x1, y0, y1 = region
    assert kept_xy.shape[0] > 0
    assert bool((kept_xy[:, 0] >= x0 - margin * (x1 - x0)).all() and (kept_xy[:, 0] <= x1 + margin * (x1 - x0)).all())
    assert bool((kept_xy[:, 1] >= y0 - margin * (y1 - y0)).all() and (kept_xy[:, 1] <= y1 + margin * (y1 - y0)).all())
    assert own_kept.float().mean() >= 0.75, f"only {own_kept.float().mean():.2f} of the token's own pixels kept"


def _anyres_patch(session, token: int, image_size) -> tuple[int, int, int]:
    """(tile, patch row, patch col) of image token `token` of a 2 x 2-tile image, counted by hand: the base tile's
    2 x 2 patches come first, then the unpadded 4 x C high-resolution grid row by row, each row closed by a
    newline."""
    vision = session.model.config.vision_config
    side = vision.image_size // vision.patch_size
    assert side == 2
    if token < side * side:
        return 0, token // side, token % side
    # 336 x 336: 56 x 56 canvas, nothing unpadded; 504 x 336 (tall): 4 x 4 features, columns 1..2 kept.
    cols, first_col = {(336, 336): (4, 0), (504, 336): (2, 1)}[tuple(image_size)]
    row, col = divmod(token - side * side, cols + 1)
    assert col < cols, "that token is a row newline"
    feature_row, feature_col = row, col + first_col
    tile = 1 + (feature_row // side) * 2 + feature_col // side
    return tile, feature_row % side, feature_col % side


@pytest.mark.parametrize("name", ANYRES)
@pytest.mark.parametrize("shape, token, keep", [((336, 336), 9, 1 / 16), ((336, 336), 2, 1 / 4),
                                                ((504, 336), 7, 1 / 8), ((504, 336), 14, 1 / 8)])
def test_anyres_attention_on_one_token_keeps_its_image_region(name, shape, token, keep):
    session = mmkit.load(name, device="cpu")
    image = coordinate_image(*shape)
    inputs = session.prepare([image], ["Where is it?"])
    handle = session.apply(f"agla:matcher=attention,keep={keep}")
    _one_hot_attention(handle, session, token)
    with torch.inference_mode():
        local = handle.impl.local_view(inputs)["pixel_values"]
    patch = session.model.config.vision_config.patch_size
    tile, pr, pc = _anyres_patch(session, token, shape)
    original = _unnormalise(session, inputs["pixel_values"][0])  # (tiles, 3, t, t)
    own = original[tile, :, pr * patch: (pr + 1) * patch, pc * patch: (pc + 1) * patch]
    region = (own[0].min().item(), own[0].max().item(), own[1].min().item(), own[1].max().item())
    masked = _unnormalise(session, local[0])
    padding = original[:, 2] < 0.5
    assert bool(padding[1:].any()) == (shape != (336, 336))
    assert torch.equal(local[0].permute(0, 2, 3, 1)[padding], inputs["pixel_values"][0].permute(0, 2, 3, 1)[padding])
    kept = masked[:, 2] > 0.5  # (tiles, t, t): blue survives only where the pixel was kept
    assert bool(kept[0].any()) and bool(kept[1:].any()), "the base tile and the high-resolution tiles both keep"
    xy = masked.permute(0, 2, 3, 1)[kept][:, :2]
    own_kept = kept[tile, pr * patch: (pr + 1) * patch, pc * patch: (pc + 1) * patch]
    _check_region(xy, own_kept, region, margin=0.25)
    # Masked pixels are black; kept pixels are untouched.
    assert torch.equal(local[0].permute(0, 2, 3, 1)[kept], inputs["pixel_values"][0].permute(0, 2, 3, 1)[kept])
    assert torch.allclose(masked.permute(0, 2, 3, 1)[~kept & (original[:, 2] > 0.5)], torch.zeros(3), atol=1e-5)
    session.close()


@pytest.mark.parametrize("token, quadrant", [(4, (0.0, 0.5, 0.0, 0.5)), (8, (0.5, 1.0, 0.5, 1.0))])
def test_onevision_shrunken_grid_maps_to_its_image_region(token, quadrant):
    """OneVision resizes a high-resolution grid of more than `anyres_max_N` tiles' worth of tokens after the
    projector; with N = 1 the 4 x 4 grid of a square image becomes 2 x 2 (tokens: 4 base, then two rows of two
    plus a newline), each token a quadrant of the image."""
    session = mmkit.load("tiny-random-onevision", device="cpu")
    session.model.config.vision_aspect_ratio = "anyres_max_1"
    session.processor.vision_aspect_ratio = "anyres_max_1"
    inputs = session.prepare([coordinate_image(336, 336)], ["Where is it?"])
    assert int((inputs["input_ids"] == session.adapter.image_token_id).sum()) == 4 + 2 * 3
    handle = session.apply("agla:matcher=attention,keep=0.25")
    _one_hot_attention(handle, session, token)
    with torch.inference_mode():
        local = handle.impl.local_view(inputs)["pixel_values"]
    masked = _unnormalise(session, local[0])
    kept = masked[:, 2] > 0.5
    xy = masked.permute(0, 2, 3, 1)[kept][:, :2]
    x0, x1, y0, y1 = quadrant
    assert bool(((xy[:, 0] > x0) & (xy[:, 0] < x1) & (xy[:, 1] > y0) & (xy[:, 1] < y1)).all())
    assert kept[1:].float().mean() == pytest.approx(0.25, abs=0.01)  # the whole quadrant of the tiles
    session.close()


@pytest.mark.parametrize("name", QWEN)
@pytest.mark.parametrize("shape, token", [((336, 336), 5), ((504, 336), 7), ((120, 200), 9)])
def test_qwen_attention_on_one_token_keeps_its_image_region(name, shape, token):
    session = mmkit.load(name, device="cpu")
    inputs = session.prepare([coordinate_image(*shape)], ["Where is it?"])
    vision = session.model.config.vision_config
    merge, patch, temporal = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    t, h, w = inputs["image_grid_thw"][0].tolist()
    handle = session.apply(f"agla:matcher=attention,keep={merge * merge / (h * w)}")  # one token's share
    _one_hot_attention(handle, session, token)
    with torch.inference_mode():
        local = handle.impl.local_view(inputs)["pixel_values"]
    assert local.shape == inputs["pixel_values"].shape

    def pixels(rows):  # flattened patch rows (C, T, P, P) -> (rows * T * P * P, 3) unnormalised colours
        x = rows.view(-1, 3, temporal, patch, patch).permute(0, 2, 3, 4, 1).reshape(-1, 3, 1, 1)
        return _unnormalise(session, x)[:, :, 0, 0]

    # The processor orders rows by merged token: rows k * m^2 .. (k + 1) * m^2 - 1 belong to visual token k.
    per_token = merge * merge
    own = pixels(inputs["pixel_values"][token * per_token: (token + 1) * per_token])
    region = (own[:, 0].min().item(), own[:, 0].max().item(), own[:, 1].min().item(), own[:, 1].max().item())
    masked = pixels(local)
    kept = masked[:, 2] > 0.5
    own_kept = pixels(local[token * per_token: (token + 1) * per_token])[:, 2] > 0.5
    _check_region(masked[kept][:, :2], own_kept, region, margin=0.25)
    assert torch.allclose(masked[~kept], torch.zeros(3), atol=1e-5)
    # Both temporal copies of a still image carry the same mask.
    blue = local.view(-1, 3, temporal, patch, patch)[:, 2]
    assert torch.equal(blue[:, 0], blue[:, 1])
    session.close()


def test_changes_outputs_batches_like_single_rows_and_remove_restores(family):
    """Different prompts and image sizes (so different tile counts / grids) in one batch equal single runs."""
    name, session = family
    images = family_images()
    inputs = session.prepare(images, PROMPTS)
    base_logits = forward_logits(session, inputs)
    base = torch.tensor(session.answer_logprobs(images, PROMPTS).logprobs)
    handle = session.apply("agla:matcher=attention")
    try:
        scores = torch.tensor(session.answer_logprobs(images, PROMPTS).logprobs)
        assert not torch.allclose(scores, base, atol=1e-4)
        batch = [r.text for r in session.generate(images, PROMPTS, max_new_tokens=4)]
        for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
            assert session.generate([image], [prompt], max_new_tokens=4)[0].text == batch[i]
            single = session.answer_logprobs([image], [prompt]).logprobs[0]
            assert single == pytest.approx(scores[i].tolist(), abs=1e-4)
    finally:
        handle.remove()
    assert torch.equal(forward_logits(session, inputs), base_logits)


def test_views_rebuild_the_image_the_model_sees(family):
    """The canvas is the image at the model's finest resolution: its coordinate colours span the whole image in
    order, and an all-kept mask gives the pixel input back bit for bit."""
    name, session = family
    shape = (504, 336)
    inputs = session.prepare([coordinate_image(*shape)], ["Where is it?"])
    views = image_views(session, inputs)
    (canvas,) = views.canvases
    rgb = _unnormalise(session, canvas)
    assert bool((rgb[2] > 0.9).all()), "the canvas holds no padding"
    assert rgb[0].shape[0] > rgb[0].shape[1]  # tall image, tall canvas
    xs, ys = rgb[0].mean(0), rgb[1].mean(1)
    assert bool((xs[1:] > xs[:-1]).all()) and bool((ys[1:] > ys[:-1]).all())
    assert xs[0] < 0.1 and xs[-1] > 0.9 and ys[0] < 0.1 and ys[-1] > 0.9
    same = views.masked([torch.ones(canvas.shape[-2:], dtype=torch.bool)], [torch.zeros(3)])
    assert torch.equal(same["pixel_values"], inputs["pixel_values"])


def test_local_view_keeps_shapes_and_visual_token_counts(family):
    """Both views carry the same image sizes / grids, so they have the same image tokens in the same places."""
    name, session = family
    images = family_images()
    inputs = session.prepare(images, PROMPTS)
    handle = session.apply("agla:matcher=attention,keep=0.5,fill=mean")
    try:
        with torch.inference_mode():
            expanded = session.expand_branches(handle.impl, inputs)
        batch = inputs["input_ids"].shape[0]
        assert torch.equal(expanded["input_ids"][batch:], inputs["input_ids"])
        for key in ("image_sizes", "image_grid_thw"):
            if key in inputs:
                assert torch.equal(expanded[key], torch.cat([inputs[key], inputs[key]]))
        assert expanded["pixel_values"].shape[0] == 2 * inputs["pixel_values"].shape[0]
        for mask in handle.impl.last_mask:
            assert abs(mask.float().mean().item() - 0.5) < 0.01
        # fill=mean: every masked canvas pixel takes its image's mean colour.
        views = image_views(session, inputs)
        local = image_views(session, {**inputs, "pixel_values": expanded["pixel_values"][
            inputs["pixel_values"].shape[0]:]})
        for canvas, masked, keep in zip(views.canvases, local.canvases, handle.impl.last_mask):
            mean = canvas.float().mean((1, 2))
            assert torch.allclose(masked[:, ~keep].T, mean.expand(int((~keep).sum()), 3), atol=1e-6)
            assert torch.equal(masked[:, keep], canvas[:, keep])
    finally:
        handle.remove()


def test_alpha_zero_is_the_baseline(family):
    name, session = family
    images = family_images()
    base = session.answer_logprobs(images, PROMPTS).logprobs
    handle = session.apply("agla:alpha=0")
    assert session.answer_logprobs(images, PROMPTS).logprobs == base
    handle.remove()


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("blip")
    tiny_blip(path)
    return path


@pytest.mark.parametrize("name", ["tiny-random-qwen2-vl", "tiny-random-onevision"])
def test_blip_matcher_on_other_layouts(name, blip_dir):
    """The paper's matcher reads the image as the model sees it (not a tile, not patch rows), keeps 1 - ITC/2 of
    it, changes the answers, batches like single rows, and leaves the model as it was."""
    session = mmkit.load(name, device="cpu")
    images = family_images()
    inputs = session.prepare(images, PROMPTS)
    base_logits = forward_logits(session, inputs)
    base = torch.tensor(session.answer_logprobs(images, PROMPTS).logprobs)
    handle = session.apply(f"agla:blip={blip_dir},blip_layer=1")
    seen = []
    scores = handle.impl.matcher.scores
    handle.impl.matcher.scores = lambda images_, texts: (seen.append(images_), scores(images_, texts))[1]
    with_agla = torch.tensor(session.answer_logprobs(images, PROMPTS).logprobs)
    assert not torch.allclose(with_agla, base, atol=1e-4)
    shapes = [image.shape for image in seen[-1]]
    assert shapes[1][0] > shapes[1][1] and shapes[2][0] < shapes[2][1]  # tall and wide images stay so
    with torch.inference_mode():
        _, itc = handle.impl.matcher.relevance(inputs, image_views(session, inputs))
    assert torch.allclose(handle.impl.last_keep, (1 - itc / 2).clamp(max=1 - 1e-5))
    for mask, keep in zip(handle.impl.last_mask, handle.impl.last_keep):
        assert abs(mask.float().mean().item() - keep.item()) <= 1.0 / mask.numel()
    batch = [r.text for r in session.generate(images, PROMPTS, max_new_tokens=3)]
    for i in range(3):
        assert session.generate([images[i]], [PROMPTS[i]], max_new_tokens=3)[0].text == batch[i]
        single = session.answer_logprobs([images[i]], [PROMPTS[i]]).logprobs[0]
        assert single == pytest.approx(with_agla[i].tolist(), abs=1e-4)
    handle.remove()
    assert torch.equal(forward_logits(session, inputs), base_logits)
    session.close()


def test_clip_matcher_on_llava_next(tmp_path):
    """The CLIP matcher scores the stitched image too; its keep share follows 1 - ITC/2 on every row."""
    tiny_clip(tmp_path)
    session = mmkit.load("tiny-random-next", device="cpu")
    images = family_images()
    base = torch.tensor(session.answer_logprobs(images, PROMPTS).logprobs)
    handle = session.apply(f"agla:matcher=clip,clip_model={tmp_path}")
    inputs = session.prepare(images, PROMPTS)
    with torch.inference_mode():
        grid, itc = handle.impl.matcher.relevance(inputs, image_views(session, inputs))
    assert grid.shape == (3, 4, 4) and bool((grid > 0).any())
    scores = torch.tensor(session.answer_logprobs(images, PROMPTS).logprobs)
    assert not torch.allclose(scores, base, atol=1e-4)
    assert torch.allclose(handle.impl.last_keep, (1 - itc / 2).clamp(max=1 - 1e-5))
    handle.remove()
    session.close()


def test_several_images_in_one_prompt_are_refused_with_the_reason():
    session = mmkit.load("tiny-random-qwen2-vl", device="cpu")
    inputs = session.prepare(family_images()[:2], PROMPTS[:2])
    handle = session.apply("agla")
    broken = {**inputs, "input_ids": inputs["input_ids"][:1], "attention_mask": inputs["attention_mask"][:1]}
    with pytest.raises(ValueError, match="one image per prompt"):
        image_views(session, broken)
    handle.remove()
    session.close()
