"""`mmkit.pruning.show_kept`: the patches each decoder layer read, recovered from hooks, against what the methods
are known to keep."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mmkit.cli import main
from mmkit.pruning.divprune import maxmin_select
from mmkit.pruning.show_kept import KEPT, MERGED, draw_kept, kept_patches

N = 64


def test_without_methods_every_layer_reads_every_patch(session, images):
    kept = kept_patches(session, images[0], "What is in the image?")
    assert kept.grid == 8 and len(kept.layers) == 4
    assert all(bool((s == KEPT).all()) for s in kept.layers)


def test_pre_llm_selection_is_recovered_exactly(session, images):
    inputs = session.prepare(images[:1], ["What is in the image?"])
    with torch.inference_mode():
        feats = session.model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                                       vision_feature_select_strategy="default").pooler_output[0]
    expected = set(maxmin_select(feats.reshape(1, N, -1), 10)[0].tolist())
    session.apply("divprune:tokens=10")
    kept = kept_patches(session, images[0], "What is in the image?")
    for status in kept.layers:
        assert set((status == KEPT).nonzero().flatten().tolist()) == expected
        assert int((status == MERGED).sum()) == 0


def test_in_llm_drops_show_per_layer(session, images):
    session.apply("fastv:layer=2,keep=0.25")
    hooks = len(session.adapter.language_model._forward_pre_hooks)
    kept = kept_patches(session, images[0], "What is in the image?")
    assert kept.kept_counts() == [64, 64, 16, 16]
    assert torch.equal(kept.layers[2], kept.layers[3])
    assert len(session.adapter.language_model._forward_pre_hooks) == hooks


def test_pooling_shows_merged_tokens(session, images):
    session.apply("pooling:tokens=16")
    kept = kept_patches(session, images[0], "What is in the image?")
    assert kept.kept_counts() == [0, 0, 0, 0]
    assert all(bool((s == MERGED).all()) for s in kept.layers)


def test_drawing_writes_one_panel_per_layer(session, images, tmp_path):
    session.apply("random:tokens=16")
    draw_kept(session, images[0], "Count the objects.", tmp_path / "kept.png")
    picture = Image.open(tmp_path / "kept.png")
    assert picture.size[0] > 3 * picture.size[1]  # four panels in a row
    with pytest.raises(ValueError, match="must end in .png"):
        draw_kept(session, images[0], "Count the objects.", tmp_path / "kept.jpg")
    assert not (tmp_path / "kept.jpg").exists()


def test_cli_show_kept(tmp_path, images):
    image = tmp_path / "scene.png"
    Image.fromarray(images[0]).save(image)
    out = tmp_path / "kept.png"
    result = CliRunner().invoke(main, ["generate", "--model", "tiny-random", "--image", str(image), "--prompt",
                                       "What is in the image?", "--method", "divprune:tokens=16",
                                       "--max-new-tokens", "2", "--json", "--show-kept", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["show_kept"]["patches_kept_per_layer"] == [16] * 4
    assert out.is_file()
    bad = CliRunner().invoke(main, ["generate", "--model", "tiny-random", "--image", str(image), "--prompt", "x",
                                    "--show-kept", str(tmp_path / "missing" / "k.png")])
    assert bad.exit_code == 2 and "--show-kept" in bad.output
