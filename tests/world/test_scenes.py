"""Scenes of the reference world: determinism, truth consistency, statistics and speed."""

import time

import numpy as np
import pytest

from mmkit.world.scenes import (
    CATEGORIES,
    COLOURS,
    GROUPS,
    MIN_VISIBLE_PIXELS,
    Scene,
    category_frequencies,
    cooccurrence,
    generate_scene,
    iter_scenes,
)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return list(iter_scenes(3, 60))


def test_vocabulary_sizes():
    assert len(CATEGORIES) >= 16 and len(set(CATEGORIES)) == len(CATEGORIES)
    assert all(c.isalpha() and c.islower() for c in CATEGORIES)
    assert len(COLOURS) >= 8
    rgb = np.array(list(COLOURS.values()), dtype=float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)
    assert dist[~np.eye(len(rgb), dtype=bool)].min() > 60


def test_determinism():
    a, b = generate_scene(5, 17), generate_scene(5, 17)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.objects == b.objects
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    other_seed, other_index = generate_scene(6, 17), generate_scene(5, 18)
    assert not np.array_equal(np.asarray(a.image), np.asarray(other_seed.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(other_index.image))
    assert [s.index for s in iter_scenes(5, 3, start=16)] == [16, 17, 18]
    assert np.array_equal(np.asarray(next(iter_scenes(5, 1, start=17)).image), np.asarray(a.image))


def test_truth_consistency(scenes):
    for scene in scenes:
        img = np.asarray(scene.image).astype(float)
        assert scene.image.mode == "RGB" and scene.image.size == (336, 336)
        assert 1 <= len(scene.objects) <= 6
        union = np.zeros((336, 336), dtype=int)
        for obj in scene.objects:
            assert obj.category in CATEGORIES and obj.colour in COLOURS
            assert obj.mask.dtype == bool and obj.mask.shape == (336, 336)
            assert obj.area == obj.mask.sum() >= MIN_VISIBLE_PIXELS
            x0, y0, x1, y1 = obj.box
            ys, xs = np.nonzero(obj.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            union += obj.mask
            # Most visible pixels carry the object's colour (interior; the rim is darker).
            dist = np.linalg.norm(img[obj.mask] - np.array(COLOURS[obj.colour]), axis=-1)
            assert np.median(dist) < 35, (scene.index, obj.category, obj.colour)
        assert union.max() <= 1  # visible masks are disjoint


def test_patch_labels(scenes):
    scene = max(scenes, key=lambda s: max(o.area for o in s.objects))
    labels = scene.patch_labels(24)
    assert labels["category"].shape == labels["colour"].shape == (24, 24)
    big = max(scene.objects, key=lambda o: o.area)
    cells = labels["category"] == 1 + CATEGORIES.index(big.category)
    assert cells.sum() >= big.area / (14 * 14) * 0.5
    assert ((labels["category"] == 0) == (labels["colour"] == 0)).all()
    with pytest.raises(ValueError):
        scene.patch_labels(25)


def test_statistics_skew_and_cooccurrence():
    freq = category_frequencies()
    assert set(freq) == set(CATEGORIES)
    assert max(freq.values()) > 6 * min(freq.values())  # Zipf-like skew
    co = cooccurrence()
    for a, b in GROUPS:
        assert co[a][b] > 0.6 and co[b][a] > 0.6
        assert co[a][b] > 2 * freq[b]


def test_measured_statistics_match_world(scenes):
    # Measured on real scenes (after placement), the groups hold as the world says.
    many = list(iter_scenes(11, 400))
    present = [s.categories() for s in many]
    for a, b in GROUPS[:4]:
        with_a = [p for p in present if a in p]
        assert len(with_a) > 15
        rate = sum(b in p for p in with_a) / len(with_a)
        assert rate > 0.55, (a, b, rate)
    counts = {c: sum(c in p for p in present) for c in CATEGORIES}
    assert max(counts.values()) > 5 * max(1, min(counts.values()))


def test_speed():
    generate_scene(0, 0)
    t = time.perf_counter()
    for i in range(50):
        generate_scene(1, i)
    per_scene = (time.perf_counter() - t) / 50
    assert per_scene < 0.05  # generous; typically a few ms


def test_bad_input():
    with pytest.raises(ValueError):
        generate_scene(-1, 0)
    with pytest.raises(ValueError):
        generate_scene(0, 0, size=10)


def test_background_never_looks_like_an_object_colour(scenes):
    palette = np.array(list(COLOURS.values()), dtype=float)
    for scene in scenes[:20]:
        img = np.asarray(scene.image).astype(float)
        background = ~np.any([o.mask for o in scene.objects], axis=0)
        pixels = img[background][::7]
        dist = np.linalg.norm(pixels[:, None] - palette[None], axis=-1).min(axis=1)
        assert dist.min() > 40, scene.index
