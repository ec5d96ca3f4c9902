"""VL-SAM on the anyres (LLaVA-NeXT, OneVision) and native-resolution (Qwen-VL) families: the token -> pixel
geometry checked against the pixels each token actually sees, end-to-end grounding with the shipped SAM on images
of different sizes, batch = single runs, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import mmkit
from mmkit.cli import main
from mmkit.grounding.attention_maps import build_inputs
from mmkit.grounding.geometry import row_geometries
from mmkit.grounding.vlsam import preset_config

FAMILY_MODELS = ("tiny-random-next", "tiny-random-onevision", "tiny-random-qwen2-vl", "tiny-random-qwen2.5-vl",
                 "tiny-random-qwen3-vl")
ANYRES = ("tiny-random-next", "tiny-random-onevision")
# (height, width): square, tall and wide, and a small one; on the anyres models these give 2 x 2, 2 x 1 and 1 x 2
# high-resolution tiles.
SIZES = ((336, 336), (504, 336), (120, 200))


@pytest.fixture(scope="module", params=FAMILY_MODELS)
def family_session(request):
    session = mmkit.load(request.param, device="cpu")
    yield request.param, session
    session.close()


def _scene(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 96, dtype=np.uint8)
    image += (rng.random((height, width, 3)) * 16).astype(np.uint8)
    return image


def _embedding_change(session, image: np.ndarray, box) -> torch.Tensor:
    """Per image token (prompt order), how much its language-model input embedding moves when the pixels in `box`
    turn white: the tokens that see those pixels move most. Read from the model's own input embeddings, so it is
    independent of the geometry under test."""
    x0, y0, x1, y1 = box
    changed = image.copy()
    changed[y0:y1, x0:x1] = 255
    embeddings = []
    for picture in (image, changed):
        inputs = session.prepare([picture], ["Where is it?"])
        with torch.inference_mode():
            out = session.model(**inputs, output_hidden_states=True, use_cache=False)
        mask = session.adapter.image_mask(inputs["input_ids"])[0]
        embeddings.append(out.hidden_states[0][0][mask].float())
    return (embeddings[1] - embeddings[0]).norm(dim=-1)


def _peak_rect(attn: torch.Tensor, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The pixel rectangle of the map's peak cell, with the cell -> pixel convention of the point prompts."""
    height, width = size
    gh, gw = attn.shape
    y, x = divmod(int(attn.flatten().argmax()), gw)
    return x * width / gw, y * height / gh, (x + 1) * width / gw, (y + 1) * height / gh


@pytest.fixture(scope="module", params=("tiny-random", *FAMILY_MODELS))
def local_session(request):
    """A model whose vision tower does not mix patches (the output projection of every vision attention is zeroed),
    so a pixel change reaches exactly the tokens whose patches hold those pixels."""
    session = mmkit.load(request.param, device="cpu")
    silenced = 0
    with torch.no_grad():
        for name, module in session.adapter.vision_tower.named_modules():
            if name.endswith(("self_attn.out_proj", "attn.proj")):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
                silenced += 1
    assert silenced >= 2
    yield request.param, session
    session.close()


@pytest.mark.parametrize("size", SIZES)
def test_one_token_of_mass_peaks_where_that_token_looks(local_session, size):
    """Put all the attention on the one token that sees a small white square (found from the model's embeddings),
    map it, and check that the map's peak cell covers the square's centre; for anyres, on each grid separately and
    on the averaged map."""
    name, session = local_session
    height, width = size
    image = _scene(height, width)
    # The region the model sees: LLaVA-1.5's processor keeps only the central square, the others the whole image.
    seen_h, seen_w = (min(size),) * 2 if name == "tiny-random" else size
    top, left = (height - seen_h) // 2, (width - seen_w) // 2
    modes = ("base", "high", "mean") if name in ANYRES else ("mean",)
    # Centres away from every cell border of grids up to 5 cells a side (borders at k/2, k/3, k/4, k/5) and of
    # LLaVA-1.5's 8 x 8 grid.
    for fy, fx in ((0.1, 0.45), (0.9, 0.55), (0.55, 0.1), (0.45, 0.9)):
        side = max(4, min(height, width) // 16)
        cy, cx = top + int(fy * seen_h), left + int(fx * seen_w)
        box = (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)
        change = _embedding_change(session, image, box)
        inputs = session.prepare([image], ["Where is it?"])
        for mode in modes:
            geometry = row_geometries(session, inputs, mode, [(width, height)])[0]
            grid_tokens = torch.cat([g.flatten() for g in geometry.grids[-1:]])  # the finest grid in this mode
            token = int(grid_tokens[change[grid_tokens].argmax()])
            values = torch.zeros(geometry.n_tokens)
            values[token] = 1.0
            attn = geometry.to_map(values)
            x0, y0, x1, y1 = _peak_rect(attn, size)
            assert x0 <= cx < x1 and y0 <= cy < y1, (name, size, mode, (cx, cy), (x0, y0, x1, y1), attn)


def test_anyres_geometry_has_several_tiles_and_drops_newlines():
    session = mmkit.load("tiny-random-next", device="cpu")
    images = [_scene(h, w) for h, w in SIZES]
    inputs = session.prepare(images, ["a", "b", "c"])
    geometries = row_geometries(session, inputs, "mean")
    counts = session.adapter.image_mask(inputs["input_ids"]).sum(1).tolist()
    for geometry, count, (h, w) in zip(geometries, counts, SIZES):
        base, high = geometry.grids
        assert base.shape == (2, 2)
        gh, gw = high.shape
        assert gh * gw > base.numel()                                  # several high-resolution tiles
        assert (gw > gh) == (w > h) and (gh > gw) == (h > w)           # the grid follows the aspect ratio
        used = torch.cat([base.flatten(), high.flatten()])
        assert len(set(used.tolist())) == used.numel()
        assert count - used.numel() == gh                              # one newline per row, never in a grid
    # The averaged map: each grid as a distribution over the image, resized to the finest grid, then the mean.
    geometry = geometries[0]
    values = torch.rand(geometry.n_tokens)
    base = values[geometry.grids[0]]
    high = values[geometry.grids[1]]
    up = torch.nn.functional.interpolate(base[None, None], size=high.shape, mode="bilinear")[0, 0]
    torch.testing.assert_close(geometry.to_map(values), 0.5 * (up / up.sum() + high / high.sum()))


def _check_result(result, size):
    width, height = size
    assert result.size == size
    assert result.maps, "no attention map was made"
    for attn in result.maps.values():
        assert attn.ndim == 2 and np.isfinite(attn).all() and attn.min() >= 0
    for det in result.detections:
        assert det.mask.shape == (height, width) and det.mask.dtype == bool and det.mask.any()
        x0, y0, x1, y1 = det.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert 0.0 <= det.score <= 1.0
    assert result.stats["lvlm_sequences"] > 0


@pytest.mark.parametrize("rollout", ["text", "full"])
def test_ground_runs_and_batch_equals_single_runs(family_session, rollout):
    name, session = family_session
    images = [Image.fromarray(_scene(h, w, seed=i)) for i, (h, w) in enumerate(SIZES)]
    config = preset_config("paper", rollout=rollout, multi_scale=False, describe_prompts=("Describe the image.",),
                           max_new_tokens=8)
    batch = session.ground(images, query="cube", config=config)   # the shipped small SAM
    assert len(batch) == len(images)
    for image, got in zip(images, batch):
        _check_result(got, image.size)
        alone = session.ground([image], query="cube", config=config)[0]
        assert alone.maps.keys() == got.maps.keys()
        for label in got.maps:
            assert alone.maps[label].shape == got.maps[label].shape
            np.testing.assert_allclose(alone.maps[label], got.maps[label], atol=1e-5, rtol=1e-4)
        assert [(d.label, d.box) for d in alone.detections] == [(d.label, d.box) for d in got.detections]
        np.testing.assert_allclose([d.score for d in alone.detections], [d.score for d in got.detections],
                                   atol=1e-4)


def test_full_rollout_captures_every_row_of_a_qwen_prompt():
    """The full rollout reads every token's row, image tokens included; on Qwen-VL that includes the vision
    markers, which are not image tokens."""
    session = mmkit.load("tiny-random-qwen2.5-vl", device="cpu")
    inputs, _ = build_inputs(session, [_scene(120, 200)], ["Where is the cube?"], [""])
    ids = inputs["input_ids"][0]
    image = session.adapter.image_mask(inputs["input_ids"])[0]
    tokenizer = session.processor.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    first, last = image.nonzero().flatten()[[0, -1]].tolist()
    assert int(ids[first - 1]) == start and int(ids[last + 1]) == end
    assert not image[ids == start].any() and not image[ids == end].any()
    assert row_geometries(session, inputs)[0].shape == (3, 5)


def test_cli_grounds_on_a_qwen_model(tmp_path):
    image = tmp_path / "scene.png"
    Image.fromarray(_scene(120, 200)).save(image)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["ground", "--model", "tiny-random-qwen2.5-vl", "--image", str(image),
                                       "--query", "cube", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert "scene_overlay.png" in names and "scene_coco.json" in names
    assert any(n.startswith("scene_attn_") for n in names)
    import json

    coco = json.loads((out / "scene_coco.json").read_text())
    assert coco["images"][0]["width"] == 200 and coco["images"][0]["height"] == 120


@pytest.mark.parametrize("spec", ["fastv:layer=2,keep=0.25", "visionzip:dominant=2,contextual=1"])
def test_ground_runs_with_a_pruning_method(family_session, spec):
    """LLM-side (FastV) and vision-side (VisionZip) reduction: the rows are read through the probe in prompt
    positions, so every map still covers the whole image, with each image's own shape."""
    name, session = family_session
    images = [Image.fromarray(_scene(h, w, seed=i)) for i, (h, w) in enumerate(SIZES)]
    config = preset_config("paper", multi_scale=False, describe_prompts=("Describe the image.",), max_new_tokens=8)
    plain = session.ground(images, query="cube", config=config)
    handle = session.apply(spec)
    try:
        pruned = session.ground(images, query="cube", config=config)
    finally:
        handle.remove()
    for image, a, b in zip(images, plain, pruned):
        _check_result(b, image.size)
        assert [m.shape for m in a.maps.values()] == [m.shape for m in b.maps.values()]
    assert any(not np.allclose(a.maps[k], b.maps[k]) for a, b in zip(plain, pruned) for k in a.maps)
