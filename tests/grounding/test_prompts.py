"""Prompt sampling from maps (regions, maxima, minima), NMS and RLE."""

import numpy as np
import pytest

from mmkit.grounding.outputs import rle_decode, rle_encode
from mmkit.grounding.prompts import (connected_components, mask_to_box, nms, prompts_from_map, regions,
                                     resample_prompt)


def test_connected_components_are_four_connected():
    mask = np.array([[1, 1, 0, 0],
                     [0, 1, 0, 1],
                     [0, 0, 0, 1],
                     [1, 0, 0, 0]], dtype=bool)
    labels, n = connected_components(mask)
    assert n == 3
    assert labels[0, 0] == labels[0, 1] == labels[1, 1]
    assert labels[1, 3] == labels[2, 3] != labels[0, 0]
    diagonal = np.array([[1, 0], [0, 1]], dtype=bool)
    assert connected_components(diagonal)[1] == 2


def test_largest_region_first_and_points_at_extrema():
    attn = np.zeros((8, 8))
    attn[1:4, 1:4] = 0.8      # large region
    attn[2, 2] = 1.0          # its maximum
    attn[6, 6] = 0.9          # small, strong region
    attn[7, 0] = -1.0         # the minimum
    comps = regions(attn, 0.6)
    assert comps[0].sum() == 9 and comps[1].sum() == 1
    (p,) = prompts_from_map(attn, (80, 80), threshold=0.6, num_positive=1, num_negative=1)
    assert p.labels == [1, 0]
    assert p.points[0] == (25.0, 25.0)   # cell (2, 2) centre at 10 px per cell
    assert p.points[1] == (5.0, 75.0)    # cell (7, 0)
    two = prompts_from_map(attn, (80, 80), threshold=0.6, instances=2)
    assert len(two) == 2 and two[1].points[0] == (65.0, 65.0)
    assert prompts_from_map(np.ones((4, 4)), (8, 8)) == []


def test_several_positive_points_keep_their_distance():
    attn = np.zeros((10, 10))
    attn[2:8, 2:8] = np.linspace(0.6, 1.0, 36).reshape(6, 6)
    (p,) = prompts_from_map(attn, (10, 10), threshold=0.5, num_positive=3, num_negative=0, min_point_distance=2)
    pos = [pt for pt, lab in zip(p.points, p.labels) if lab == 1]
    assert len(pos) == 3
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.hypot(pos[i][0] - pos[j][0], pos[i][1] - pos[j][1]) >= 2


def test_resample_inside_mask():
    attn = np.arange(16, dtype=float).reshape(4, 4)
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :2] = True
    p = resample_prompt(attn, mask, (4, 4))
    assert p.points[0] == (1.5, 0.5) and p.labels == [1, 0]   # max inside the mask: cell (0, 1)
    assert p.points[1] == (2.5, 0.5)                           # min outside: cell (0, 2)
    assert resample_prompt(attn, np.zeros((4, 4), dtype=bool), (4, 4)) is None


def test_nms_per_label():
    boxes = [(0, 0, 10, 10), (1, 1, 10, 10), (0, 0, 10, 10), (20, 20, 30, 30)]
    scores = [0.9, 0.8, 0.7, 0.6]
    assert nms(boxes, scores, iou_threshold=0.5) == [0, 3]
    assert nms(boxes, scores, ["a", "a", "b", "a"], iou_threshold=0.5) == [0, 2, 3]
    with pytest.raises(ValueError):
        nms(boxes, scores[:2])


def test_mask_box_and_rle_round_trip():
    rng = np.random.default_rng(0)
    mask = rng.random((7, 5)) > 0.5
    assert np.array_equal(rle_decode(rle_encode(mask)), mask)
    starts_on = np.ones((3, 3), dtype=bool)
    assert rle_encode(starts_on)["counts"] == [0, 9]
    m = np.zeros((6, 6), dtype=bool)
    m[1:3, 2:5] = True
    assert mask_to_box(m) == (2, 1, 5, 3)
    assert mask_to_box(np.zeros((3, 3), dtype=bool)) is None
