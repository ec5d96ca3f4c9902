"""The random and pooling baselines against independent references: the seeded draw, window means computed by
hand, and reduced sequences built by hand."""

import pytest
import torch

from conftest import forward_logits
from mmkit.errors import MmkitError
from mmkit.pruning.pooling import pool_features, pooled_grid
from mmkit.pruning.random_prune import random_subset

N, SIDE = 64, 8


def _projected(session, inputs):
    with torch.inference_mode():
        feats = session.model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                                       vision_feature_select_strategy="default").pooler_output
    return torch.stack(list(feats)).reshape(inputs["pixel_values"].shape[0], N, -1)


def _hand_logits(session, inputs, image_rows):
    """Text + the given image rows (in the given order) in place of the image, positions 0..m-1, one row."""
    ids = inputs["input_ids"]
    with torch.inference_mode():
        embeds = session.model.model.get_input_embeddings()(ids)
        pos = (ids[0] == session.adapter.image_token_id).nonzero().flatten()
        start = int(pos[0])
        seq = torch.cat([embeds[0, :start], image_rows.to(embeds.dtype), embeds[0, start + N:]])[None]
        out = session.adapter.language_model(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None],
                                             use_cache=False)
        return session.model.lm_head(out.last_hidden_state)


def test_random_subset_is_seeded_uniform_and_sorted():
    a = random_subset(576, 64, seed=0)
    assert torch.equal(a, random_subset(576, 64, seed=0))
    assert not torch.equal(a, random_subset(576, 64, seed=1))
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 64
    # Uniform: over many seeds every position is drawn about k/n of the time.
    counts = torch.zeros(48)
    for seed in range(600):
        counts[random_subset(48, 12, seed)] += 1
    assert (counts / 600 - 0.25).abs().max() < 0.08


def test_random_keeps_the_drawn_tokens_of_every_image(session, images, prompts):
    inputs = session.prepare(images[:1], prompts[:1])
    feats = _projected(session, inputs)
    keep = random_subset(N, 10, seed=4)
    expected = _hand_logits(session, inputs, feats[0, keep])
    handle = session.apply("random:tokens=10,seed=4")
    try:
        assert torch.allclose(forward_logits(session, inputs), expected, atol=1e-5)
    finally:
        handle.remove()


@pytest.mark.parametrize("count,grid", [(64, (8, 8)), (128, (8, 16)), (192, (12, 16)), (144, (12, 12)), (16, (4, 4))])
def test_pooled_grid_is_closest_to_square(count, grid):
    assert pooled_grid(count, 24 if count > 16 else SIDE) == grid


def test_pooled_grid_refuses_counts_without_a_grid():
    with pytest.raises(ValueError, match="grid"):
        pooled_grid(61, 24)


def test_pooling_averages_equal_windows_by_hand():
    x = torch.randn(2, 36, 5)
    got = pool_features(x, 6, (2, 3))                   # 6 x 6 -> 2 x 3: windows of 3 rows x 2 columns
    grid = x.view(2, 6, 6, 5)
    for i in range(2):
        for r in range(2):
            for c in range(3):
                window = grid[i, 3 * r:3 * r + 3, 2 * c:2 * c + 2].reshape(-1, 5).mean(0)
                assert torch.allclose(got[i, r * 3 + c], window, atol=1e-6)


def test_pooling_feeds_the_window_means_to_the_llm(session, images, prompts):
    inputs = session.prepare(images[:1], prompts[:1])
    grid = _projected(session, inputs)[0].view(SIDE, SIDE, -1)
    means = torch.stack([grid[2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(4, -1).mean(0)
                         for r in range(4) for c in range(4)])
    expected = _hand_logits(session, inputs, means)
    handle = session.apply("pooling:tokens=16")
    try:
        assert torch.allclose(forward_logits(session, inputs), expected, atol=1e-5)
    finally:
        handle.remove()


def test_pooling_refuses_counts_without_a_grid(session):
    with pytest.raises(MmkitError, match="grid"):
        session.apply("pooling:tokens=13")


def test_pooling_uneven_windows_follow_adaptive_pooling():
    # 5 -> 2 per side: windows [0, 3) and [2, 5) (floor(i * 5 / 2) to ceil((i + 1) * 5 / 2)).
    x = torch.randn(1, 25, 3)
    got = pool_features(x, 5, (2, 2))
    grid = x.view(5, 5, 3)
    spans = [(0, 3), (2, 5)]
    for r, (r0, r1) in enumerate(spans):
        for c, (c0, c1) in enumerate(spans):
            assert torch.allclose(got[0, r * 2 + c], grid[r0:r1, c0:c1].reshape(-1, 3).mean(0), atol=1e-6)
