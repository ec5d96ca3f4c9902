"""DivPrune against independent references: the paper's greedy written out with explicit loops, the brute-force
max-min optimum on tiny sizes, and the reduced sequence built by hand from the model's own projected features."""

import itertools

import pytest
import torch

import mmkit

from conftest import forward_logits
from mmkit.pruning.divprune import DivPruneConfig, maxmin_select

N = 64


def _reference_greedy(x: torch.Tensor, k: int) -> list[int]:
    """The released algorithm, step by step: D = 1 - cos; first pick = the token whose nearest other token is
    farthest; then the candidate whose min distance to the picked rows (recomputed each step) is largest."""
    n = x.shape[0]
    unit = [v / v.norm() for v in x.double()]
    dist = [[1.0 - float(unit[i] @ unit[j]) for j in range(n)] for i in range(n)]
    nearest = [min(dist[i][j] for j in range(n) if j != i) for i in range(n)]
    picks = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picks) < k:
        rest = [i for i in range(n) if i not in picks]
        picks.append(max(rest, key=lambda i: (min(dist[i][p] for p in picks), -i)))
    return picks


def _min_pairwise(x: torch.Tensor, subset) -> float:
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    return min(1.0 - float(unit[a] @ unit[b]) for a, b in itertools.combinations(subset, 2))


@pytest.mark.parametrize("seed", range(4))
def test_greedy_matches_the_step_by_step_reference(seed):
    x = torch.randn(3, 20, 8, generator=torch.Generator().manual_seed(seed))
    got = maxmin_select(x, 7)
    for i in range(3):
        assert got[i].tolist() == _reference_greedy(x[i], 7)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_is_within_the_factor_two_of_the_brute_force_max_min(seed):
    # Greedy farthest-point selection is a 2-approximation of max-min diversity (for a metric; cosine distance
    # on unit vectors, 1 - cos, is half the squared chord, so the check uses the chord length, a metric).
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(seed))
    k = 4
    chord = lambda subset: (2 * _min_pairwise(x, subset)) ** 0.5  # noqa: E731
    best = max(chord(s) for s in itertools.combinations(range(12), k))
    greedy = chord(maxmin_select(x[None], k)[0].tolist())
    assert greedy >= best / 2 - 1e-9
    assert greedy <= best + 1e-9


def test_reduced_prefill_matches_a_hand_built_sequence(session, images, prompts):
    """Pick with the reference greedy on the model's projected features, build the shorter sequence by hand
    (text + picked image rows in image order, positions 0..m-1) and compare the logits."""
    inputs = session.prepare(images[:1], prompts[:1])
    model = session.model
    ids = inputs["input_ids"]
    with torch.inference_mode():
        embeds = model.model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output[0]
        picks = sorted(_reference_greedy(feats.reshape(N, -1), 10))
        image_pos = (ids[0] == session.adapter.image_token_id).nonzero().flatten()
        embeds[0, image_pos] = feats.reshape(N, -1).to(embeds.dtype)
        start = int(image_pos[0])
        keep = list(range(start)) + [start + j for j in picks] + list(range(start + N, ids.shape[1]))
        out = session.adapter.language_model(inputs_embeds=embeds[:, keep],
                                             position_ids=torch.arange(len(keep))[None], use_cache=False)
        expected = model.lm_head(out.last_hidden_state)
    handle = session.apply("divprune:tokens=10")
    try:
        got = forward_logits(session, inputs)
    finally:
        handle.remove()
    assert torch.allclose(got, expected, atol=1e-5)


def test_defaults_are_the_papers():
    config = DivPruneConfig()
    assert config.keep == 0.098 and round(config.keep * 576) == 56
    assert config.positions == "auto"  # the paper's renumbering where positions are 1-D


def test_auto_positions_renumber_on_llava_and_keep_qwen_3d_positions():
    from mmkit.pruning.selection import resolve_positions

    llava = mmkit.load("tiny-random", device="cpu")
    qwen = mmkit.load("tiny-random-qwen2-vl", device="cpu")
    try:
        assert resolve_positions(llava, "auto") == "contiguous"
        assert resolve_positions(qwen, "auto") == "original"
        with pytest.raises(mmkit.MmkitError, match="3-D rotary positions"):
            qwen.apply("divprune:positions=contiguous")
    finally:
        llava.close()
        qwen.close()
