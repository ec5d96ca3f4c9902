"""Attention flow on hand-made matrices: head weights, column regularisation, residual rollout, object maps."""

import pytest
import torch

from mmkit.errors import MmkitError
from mmkit.grounding.flow import aggregate_heads, column_regularize, head_weights, object_maps, rollout
from mmkit.grounding.geometry import square_geometry


def test_head_weights_prefer_peaked_heads():
    # Head 0 puts 0.9 on one image key, head 1 spreads evenly over the 4 image keys.
    probs = torch.zeros(2, 1, 6)
    probs[0, 0, 2] = 0.9
    probs[0, 0, 0] = 0.1
    probs[1, 0, 1:5] = 0.25
    image_cols = torch.tensor([1, 2, 3, 4])
    w = head_weights(probs, image_cols)
    assert torch.allclose(w, torch.tensor([0.9, 0.25]))
    agg = aggregate_heads(probs, w)
    assert torch.allclose(agg, (probs[0] * 0.9 + probs[1] * 0.25) / 2)
    assert torch.allclose(aggregate_heads(probs, None), probs.mean(0))


def test_column_regularisation_scales_early_columns_down():
    attn = torch.ones(1, 4)
    counts = torch.tensor([4, 3, 2, 1])  # causal: column j is visible to the 4 - j later queries
    out = column_regularize(attn, counts, n_tokens=4)
    assert torch.allclose(out, torch.tensor([[0.25, 0.5, 0.75, 1.0]]))


def test_rollout_single_layer_is_half_the_direct_attention():
    # Captured rows at positions 3 and 4; image tokens at 0..2. Row 0 reads image token 1 only.
    attn = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0],
                         [0.0, 0.0, 0.0, 1.0, 0.0]])
    flow = rollout([attn], torch.tensor([3, 4]), torch.tensor([0, 1, 2]))
    assert torch.allclose(flow[0], torch.tensor([0.0, 0.5, 0.0]))
    # Row 1 attends only to text row 0, which holds no image flow yet at this layer.
    assert torch.allclose(flow[1], torch.zeros(3))


def test_rollout_passes_flow_through_text_rows_across_layers():
    layer = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 1.0, 0.0]])
    flow = rollout([layer, layer], torch.tensor([3, 4]), torch.tensor([0, 1, 2]))
    # Layer 1: F = [[0, .5, 0], [0, 0, 0]]. Layer 2: row0 = .5*F0 + .5*e1 = .75 on token 1; row1 = .5*F0 + .5*F1.
    assert torch.allclose(flow[0], torch.tensor([0.0, 0.75, 0.0]))
    assert torch.allclose(flow[1], torch.tensor([0.0, 0.25, 0.0]))


def test_rollout_renormalises_away_sink_mass():
    # 0.8 of the attention goes to a sink at position 5 outside the sub-system.
    attn = torch.tensor([[0.0, 0.2, 0.0, 0.0, 0.0, 0.8]])
    with_norm = rollout([attn], torch.tensor([3]), torch.tensor([0, 1, 2]))
    without = rollout([attn], torch.tensor([3]), torch.tensor([0, 1, 2]), renormalize=False)
    assert torch.allclose(with_norm, torch.tensor([[0.0, 0.5, 0.0]]))
    assert torch.allclose(without, torch.tensor([[0.0, 0.1, 0.0]]))


def test_object_maps_put_the_peak_on_the_attended_token():
    heads, grid = 2, 3
    n_img = grid * grid
    seq = 1 + n_img + 3  # one prefix token, 9 image tokens, 3 text rows
    image_cols = torch.arange(1, 1 + n_img)
    rows = torch.tensor([10, 11, 12])
    probs = torch.full((heads, 3, seq), 0.01)
    probs[:, 2, 1 + 5] = 1.0  # the object row (index 2) attends image token 5 -> grid cell (1, 2)
    counts = torch.arange(seq, 0, -1)
    for cr in (True, False):
        (m,) = object_maps([probs, probs], rows, torch.ones(3, dtype=torch.bool), image_cols, counts, [[2]],
                           column_reg=cr)
        assert m.shape == (grid, grid)
        assert divmod(int(m.argmax()), grid) == (1, 2)
    (first_only,) = object_maps([probs, torch.zeros_like(probs)], rows, torch.ones(3, dtype=torch.bool),
                                image_cols, counts, [[2]], layers=(0,))
    assert divmod(int(first_only.argmax()), grid) == (1, 2)
    with pytest.raises(ValueError, match="out of range"):
        object_maps([probs], rows, torch.ones(3, dtype=torch.bool), image_cols, counts, [[2]], layers=(5,))


def test_square_geometry_rejects_non_square_layouts():
    assert square_geometry(576).shape == (24, 24)
    with pytest.raises(MmkitError, match="square grid"):
        square_geometry(10)
