"""VL-SAM merge rules on constructed cases: one object per mask (connected pieces), one label per object
(suppression across labels with score votes), labels only from the view that holds the object."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmkit.grounding.prompts import (connected_components, keep_prompted_component, mask_components, mask_to_box,
                                     one_label_per_object)
from mmkit.grounding.sam_backend import SamCallStats, SamPrediction
from mmkit.grounding.vlsam import VLSAMConfig, _found_in_view, ground


def _blob(shape, box):
    m = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_fast_components_match_the_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(100):
        m = rng.random((int(rng.integers(1, 24)), int(rng.integers(1, 24)))) < rng.random()
        fast, n_fast = mask_components(m)
        slow, n_slow = connected_components(m)
        assert n_fast == n_slow
        for i in range(1, n_fast + 1):  # the same partition of the pixels
            assert len(np.unique(slow[fast == i])) == 1
        assert (fast > 0).sum() == m.sum()


def test_a_mask_over_two_objects_keeps_the_prompted_one():
    square, house = _blob((100, 100), (10, 60, 30, 80)), _blob((100, 100), (60, 5, 95, 40))
    both = square | house
    assert mask_to_box(both) == (10, 5, 95, 80)            # the box that would stretch from square to house
    kept = keep_prompted_component(both, [(20.0, 70.0), (50.0, 50.0)], [1, 0])
    assert np.array_equal(kept, square) and mask_to_box(kept) == (10, 60, 30, 80)
    # The first positive point on the house wins even when another positive point lies on the square.
    assert np.array_equal(keep_prompted_component(both, [(70.0, 20.0), (20.0, 70.0)], [1, 1]), house)
    # A point off the mask: the piece holding most positive points, else the piece nearest the first point.
    assert np.array_equal(keep_prompted_component(both, [(50.0, 95.0), (80.0, 30.0)], [1, 1]), house)
    assert np.array_equal(keep_prompted_component(both, [(5.0, 95.0)], [1]), square)
    # One piece: unchanged.
    assert np.array_equal(keep_prompted_component(house, [(0.0, 0.0)], [1]), house)


def test_one_object_gets_one_label_by_summed_scores():
    shape = (64, 64)
    tree, tree_b = _blob(shape, (10, 10, 30, 40)), _blob(shape, (11, 10, 30, 41))   # the same tree twice
    star = _blob(shape, (40, 40, 60, 60))
    masks = [tree, tree_b, tree, star]
    scores = [0.6, 0.5, 0.3, 0.4]
    labels = ["cup", "tree", "tree", "star"]      # one crop calls the tree a cup, two views say tree
    kept = one_label_per_object(masks, scores, labels, 0.5)
    assert kept == [(1, "tree"), (3, "star")]     # tree votes 0.8 > cup 0.6; the best tree detection is kept
    # Equal votes: the label of the larger view (the full image over a crop) wins.
    assert one_label_per_object([tree, tree_b], [0.5, 0.5], ["star", "tree"], priority=[0.25, 1.0]) == \
        [(1, "tree")]
    # Different objects with different labels are never merged.
    assert one_label_per_object([tree, star], [0.9, 0.1], ["tree", "star"]) == [(0, "tree"), (1, "star")]
    with pytest.raises(ValueError):
        one_label_per_object([tree], [0.1, 0.2], ["tree"])


def test_found_in_view():
    house = _blob((100, 100), (40, 10, 90, 45))
    assert _found_in_view(house, (0, 0, 100, 100), 0.9)            # the full view holds everything
    assert not _found_in_view(house, (0, 0, 50, 50), 0.9)          # a corner crop shows a fifth of the house
    assert _found_in_view(house, (0, 0, 50, 50), 0.0)
    assert _found_in_view(house, (40, 0, 100, 50), 0.9)
    with pytest.raises(ValueError, match="view_containment"):
        VLSAMConfig(view_containment=1.5)
    with pytest.raises(ValueError, match="label_merge_iou"):
        VLSAMConfig(label_merge_iou=0.0)


class _OracleSam:
    """A constructed SAM: every prompt is answered with the mask of the scene object under its first positive
    point (the union of all objects when the point is on the background, like a SAM that bleeds across)."""

    def __init__(self, objects):
        self.objects = objects
        self.stats = SamCallStats()

    def embed(self, images):
        return SimpleNamespace(n=len(images))

    def predict(self, emb, image_index, points, labels, mask_inputs=None):
        masks = []
        for pts, labs in zip(points, labels):
            x, y = next(p for p, lab in zip(pts, labs) if lab == 1)
            hit = [m for m in self.objects if m[min(int(y), 111), min(int(x), 111)]]
            masks.append(hit[0] if hit else np.any(np.stack(self.objects), 0))
        n = len(masks)
        return SamPrediction(masks, np.full(n, 0.9), torch.zeros(n, 1, 4, 4))


def test_crop_labels_and_double_labels_on_a_constructed_scene(session, images, monkeypatch):
    """A house spanning the top of the image and a tree at the bottom left. The full view's answer names both;
    every crop answers "a cup". The crops' cup maps point at the house or the tree, which neither crop holds
    whole (house) or which the full view labels otherwise (tree): no cup may survive, each object once."""
    house, tree = _blob((112, 112), (20, 5, 100, 45)), _blob((112, 112), (8, 70, 40, 108))
    full = (0, 0, 112, 112)

    def generate(imgs, prompts, **kw):
        return [SimpleNamespace(text="A cyan house and a red tree." if im.size == (112, 112) else "A cup.")
                for im in imgs]

    def fake_maps(session_, views, rows, cfg, counter):
        out = []
        for r in rows:
            box = views[r.view].box
            entries = []
            for label in r.labels:
                grid = np.zeros((8, 8))
                # The map peaks over the house in views that show its top, over the tree otherwise.
                target = house if box[1] == 0 else tree
                x0, y0, x1, y1 = mask_to_box(target[box[1]:box[3], box[0]:box[2]]) or (0, 0, 1, 1)
                sx, sy = 8 / (box[2] - box[0]), 8 / (box[3] - box[1])
                if label == "tree" and box == full:
                    x0, y0, x1, y1 = mask_to_box(tree)
                grid[int(y0 * sy):max(int(y0 * sy) + 1, int(y1 * sy)), int(x0 * sx):max(int(x0 * sx) + 1,
                                                                                         int(x1 * sx))] = 1.0
                entries.append((label, grid, 1))
            out.append(entries)
        return out

    import mmkit.grounding.vlsam as vlsam

    monkeypatch.setattr(session, "generate", generate)
    monkeypatch.setattr(vlsam, "_map_rows", fake_maps)
    sam = _OracleSam([house, tree])
    # The oracle SAM answers in full-image pixels, so every prompt is decoded on the full image here
    # (crop decoding has its own test below).
    cfg = VLSAMConfig(multi_scale=True, refine_steps=0, max_new_tokens=4, sam_view="full")
    (r,) = ground(session, sam, images[:1], config=cfg)
    labels = sorted(d.label for d in r.detections)
    assert labels == ["house", "tree"], [(d.label, d.box, d.score) for d in r.detections]
    # Without the rules the crops' "cup" survives and the tree is boxed under two labels.
    old = VLSAMConfig(multi_scale=True, refine_steps=0, max_new_tokens=4, nms_across_labels=False,
                      view_containment=0.0, split_components=False, sam_view="full")
    (r_old,) = ground(session, sam, images[:1], config=old)
    assert "cup" in {d.label for d in r_old.detections}


class _LowResSam:
    """A constructed SAM that sees whatever image it embeds on a 16 x 16 grid: a prompt's mask is every grid
    cell of the colour under its first positive point, upsampled to the image. On a half-size crop the cells are
    half as large, so a small object's mask fits it better, as with a real SAM's fixed input size."""

    def __init__(self):
        self.stats = SamCallStats()

    def embed(self, images):
        self.stats.image_calls += 1
        return [np.asarray(im) for im in images]

    def predict(self, emb, image_index, points, labels, mask_inputs=None):
        masks = []
        for idx, pts, labs in zip(image_index, points, labels):
            arr = emb[idx]
            h, w = arr.shape[:2]
            cy, cx = ((np.arange(16) + 0.5) * h / 16).astype(int), ((np.arange(16) + 0.5) * w / 16).astype(int)
            cells = arr[cy][:, cx]
            x, y = next(p for p, lab in zip(pts, labs) if lab == 1)
            target = cells[min(15, int(y * 16 / h)), min(15, int(x * 16 / w))]
            grid = (cells == target).all(-1)
            masks.append(grid[(np.arange(h) * 16 // h)][:, (np.arange(w) * 16 // w)])
        self.stats.decode_calls += 1
        n = len(masks)
        return SamPrediction(masks, np.full(n, 0.9), torch.zeros(n, 1, 4, 4))


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_crops_decode_their_prompts_and_cut_objects_fall_back_to_the_full_image(session, monkeypatch):
    """A small red square inside the top-left crop, a small green star inside the top-right crop, a blue bar
    across the bottom crops' shared edge. Only the top-left crop names the square; only the full view names the
    star; the bottom crops name the bar they show in part. `found` decodes the square on its crop (a finer mask)
    and the star on the full image, and the bar, cut by the crops that name it, keeps its full-image mask."""
    from PIL import Image

    import mmkit.grounding.vlsam as vlsam

    img = np.zeros((112, 112, 3), dtype=np.uint8)
    objects = {"square": ((10, 10, 24, 24), (255, 0, 0)), "star": ((66, 10, 80, 24), (0, 255, 0)),
               "bar": ((40, 80, 76, 100), (0, 0, 255))}
    for (x0, y0, x1, y1), colour in objects.values():
        img[y0:y1, x0:x1] = colour
    truth = {name: _blob((112, 112), box) for name, (box, _) in objects.items()}
    image = Image.fromarray(img)

    def generate(imgs, prompts, **kw):
        answers = []
        for im in imgs:
            if im.size == (112, 112):
                answers.append("A green star and a blue bar.")   # the full view misses the small square
            else:
                # A crop names the square and the bar when it shows them (the bar only in part), never the star.
                arr = np.asarray(im)
                named = [name for name, channel in (("a red square", 0), ("a blue bar", 2))
                         if arr[..., channel].max() > 0]
                answers.append((" and ".join(named).capitalize() + ".") if named else "Nothing.")
        return [SimpleNamespace(text=t) for t in answers]

    def fake_maps(session_, views, rows, cfg, counter):
        out = []
        for r in rows:
            x0, y0, x1, y1 = views[r.view].box
            entries = []
            for label in r.labels:
                # The map covers the visible part of the object: grid cells whose centre lies on it.
                visible = truth[label][y0:y1, x0:x1]
                cy = ((np.arange(28) + 0.5) * (y1 - y0) / 28).astype(int)
                cx = ((np.arange(28) + 0.5) * (x1 - x0) / 28).astype(int)
                entries.append((label, visible[cy][:, cx].astype(float), 1))
            out.append(entries)
        return out

    monkeypatch.setattr(session, "generate", generate)
    monkeypatch.setattr(vlsam, "_map_rows", fake_maps)
    found = {}
    for mode in ("full", "found"):
        cfg = VLSAMConfig(multi_scale=True, refine_steps=0, max_new_tokens=4, sam_view=mode)
        (r,) = ground(session, _LowResSam(), [image], config=cfg)
        found[mode] = {d.label: d for d in r.detections}
        assert sorted(d.label for d in r.detections) == ["bar", "square", "star"], mode
        # The bar crosses the bottom crops' inner edge: its mask is the full image's, never a cut piece.
        assert found[mode]["bar"].box[0] < 50 and found[mode]["bar"].box[2] > 62, (mode, found[mode]["bar"].box)
    iou = {mode: {k: _iou(d.mask, truth[k]) for k, d in dets.items()} for mode, dets in found.items()}
    assert iou["found"]["square"] > iou["full"]["square"] + 0.1, iou
    assert iou["found"]["star"] == pytest.approx(iou["full"]["star"]), iou   # no crop named the star
    assert iou["found"]["bar"] == pytest.approx(iou["full"]["bar"]), iou
    with pytest.raises(ValueError, match="sam_view"):
        VLSAMConfig(sam_view="crop")
