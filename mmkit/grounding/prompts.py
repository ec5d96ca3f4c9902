"""From an attention map to SAM point prompts, and non-maximum suppression of the resulting detections.

A map is normalised to [0, 1] and thresholded; the connected regions above the threshold are object candidates
(the largest one for a single object, the strongest few when the answer counts several). Positive points sit at
the region's maxima, negative points at the map's minima outside it, in image pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class PointPrompt:
    """Points (x, y) in image pixels with labels (1 positive, 0 negative), the candidate region on the map grid,
    and the map's peak inside the region (its strength, for scoring)."""

    points: list[tuple[float, float]]
    labels: list[int]
    region: np.ndarray
    peak: float


def normalize_map(attn: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant map becomes all zeros."""
    attn = np.asarray(attn, dtype=np.float64)
    lo, hi = float(attn.min()), float(attn.max())
    return (attn - lo) / (hi - lo) if hi > lo else np.zeros_like(attn)


def upsample_map(attn: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling of a small map (points then land between token centres)."""
    if factor <= 1:
        return np.asarray(attn, dtype=np.float64)
    import torch

    t = torch.as_tensor(np.asarray(attn, dtype=np.float32))[None, None]
    up = torch.nn.functional.interpolate(t, scale_factor=factor, mode="bilinear", align_corners=False)
    return up[0, 0].double().numpy()


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a 2-D bool mask: (labels with 0 = background and 1..n, n)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
    return labels, n


def regions(attn: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Connected regions of the normalised map at or above `threshold`, largest first (ties: higher peak)."""
    norm = normalize_map(attn)
    labels, n = connected_components(norm >= threshold)
    comps = [labels == i for i in range(1, n + 1)]
    return sorted(comps, key=lambda m: (-int(m.sum()), -float(norm[m].max())))


def _cell_to_pixel(y: int, x: int, grid: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float]:
    gh, gw = grid
    w, h = image_size
    return ((x + 0.5) * w / gw, (y + 0.5) * h / gh)


def _extrema(values: np.ndarray, allowed: np.ndarray, k: int, largest: bool, min_dist: float) -> list[tuple[int, int]]:
    """Up to k cells of `allowed`, best first, at least `min_dist` cells apart."""
    ys, xs = np.nonzero(allowed)
    if len(ys) == 0 or k <= 0:
        return []
    order = np.argsort(-values[ys, xs] if largest else values[ys, xs], kind="stable")
    picked: list[tuple[int, int]] = []
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        if all((y - py) ** 2 + (x - px) ** 2 >= min_dist ** 2 for py, px in picked):
            picked.append((y, x))
            if len(picked) == k:
                break
    return picked


def _centroid_cell(norm: np.ndarray, region: np.ndarray) -> tuple[int, int]:
    """The region cell nearest to the region's attention-weighted centroid (a point well inside the object,
    where a maximum often sits on an edge)."""
    ys, xs = np.nonzero(region)
    w = norm[ys, xs] + 1e-12
    cy, cx = float((ys * w).sum() / w.sum()), float((xs * w).sum() / w.sum())
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(ys[k]), int(xs[k])


def _positives(norm: np.ndarray, region: np.ndarray, k: int, min_dist: float, point_at: str) -> list[tuple[int, int]]:
    if point_at == "max":
        return _extrema(norm, region, k, largest=True, min_dist=min_dist)
    first = _centroid_cell(norm, region)
    rest = [c for c in _extrema(norm, region, k + 1, largest=True, min_dist=min_dist)
            if (c[0] - first[0]) ** 2 + (c[1] - first[1]) ** 2 >= min_dist ** 2]
    return [first] + rest[: k - 1]


def prompts_from_map(attn: np.ndarray, image_size: tuple[int, int], threshold: float = 0.5,
                     num_positive: int = 1, num_negative: int = 1, instances: int = 1,
                     min_point_distance: float = 2.0, min_instance_peak: float = 0.5,
                     point_at: str = "max") -> list[PointPrompt]:
    """Point prompts for the objects of one map.

    Args:
        attn: (h, w) attention map (any scale).
        image_size: (width, height) of the image the map covers, for pixel coordinates.
        threshold: fraction of the normalised map's range that a region must reach.
        num_positive: positive points per region, at its maxima (at least `min_point_distance` cells apart).
        num_negative: negative points, at the map's minima outside every selected region.
        instances: how many regions to prompt (the largest first; further ones only when their peak reaches
            `min_instance_peak` of the map's range, so noise does not become an object).
        point_at: "max" puts the first positive point at the region's maximum (VL-SAM); "centroid" at the
            region cell nearest its attention-weighted centroid (further positives at the maxima).

    Returns:
        One PointPrompt per selected region (empty when the map is flat).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if point_at not in ("max", "centroid"):
        raise ValueError(f"point_at must be 'max' or 'centroid', got {point_at!r}")
    norm = normalize_map(attn)
    if not norm.any():
        return []
    comps = regions(norm, threshold)
    chosen = comps[:1] + [c for c in comps[1:] if norm[c].max() >= min_instance_peak][: max(0, instances - 1)]
    outside = ~np.any(np.stack(chosen), 0)
    grid = norm.shape
    negatives = [_cell_to_pixel(y, x, grid, image_size)
                 for y, x in _extrema(norm, outside, num_negative, largest=False, min_dist=min_point_distance)]
    out = []
    for region in chosen:
        pos = [_cell_to_pixel(y, x, grid, image_size)
               for y, x in _positives(norm, region, num_positive, min_point_distance, point_at)]
        out.append(PointPrompt(pos + negatives, [1] * len(pos) + [0] * len(negatives), region,
                               float(norm[region].max())))
    return out


def resample_prompt(attn: np.ndarray, mask_on_grid: np.ndarray, image_size: tuple[int, int], num_positive: int = 1,
                    num_negative: int = 1, min_point_distance: float = 2.0,
                    point_at: str = "max") -> PointPrompt | None:
    """VL-SAM's second refinement: restrict the map to a predicted mask and resample the points there (positives
    at the maxima inside the mask, negatives at the minima outside). None when the mask misses the grid."""
    norm = normalize_map(attn)
    inside = np.asarray(mask_on_grid, dtype=bool)
    if not inside.any():
        return None
    grid = norm.shape
    pos = [_cell_to_pixel(y, x, grid, image_size)
           for y, x in _positives(norm, inside, num_positive, min_point_distance, point_at)]
    neg = [_cell_to_pixel(y, x, grid, image_size)
           for y, x in _extrema(norm, ~inside, num_negative, largest=False, min_dist=min_point_distance)]
    return PointPrompt(pos + neg, [1] * len(pos) + [0] * len(neg), inside, float(norm[inside].max()))


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight (x0, y0, x1, y1) box of a bool mask (x1/y1 exclusive), None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(boxes: Sequence[Sequence[float]], scores: Sequence[float], labels: Sequence[str] | None = None,
        iou_threshold: float = 0.5) -> list[int]:
    """Greedy non-maximum suppression, per label when labels are given: indices kept, best score first."""
    if len(boxes) != len(scores) or (labels is not None and len(labels) != len(boxes)):
        raise ValueError("boxes, scores (and labels) must have the same length")
    order = sorted(range(len(boxes)), key=lambda i: -float(scores[i]))
    kept: list[int] = []
    for i in order:
        if all((labels is not None and labels[i] != labels[j]) or _box_iou(boxes[i], boxes[j]) <= iou_threshold
               for j in kept):
            kept.append(i)
    return kept


def mask_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a 2-D bool mask, fast on image-sized masks: runs of each row are joined to the
    overlapping runs of the row above with union-find. Returns (labels with 0 = background and 1..n, n), numbered
    in raster order of each component's first pixel."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    runs = []  # (row, start, end) with end exclusive
    for y in range(h):
        starts = np.flatnonzero(edges[y] == 1)
        ends = np.flatnonzero(edges[y] == -1)
        runs.extend((y, int(s), int(e)) for s, e in zip(starts, ends))
    parent = list(range(len(runs)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    prev: list[int] = []  # run indices of the row above
    row_start = 0
    for k, (y, s, e) in enumerate(runs):
        if k == row_start or runs[k - 1][0] != y:
            prev = [j for j in range(row_start, k) if runs[j][0] == y - 1] if k else []
            row_start = k
        for j in prev:
            if runs[j][1] < e and s < runs[j][2]:  # column intervals overlap: 4-connected
                ra, rb = find(j), find(k)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    labels = np.zeros((h, w), dtype=np.int32)
    ids: dict[int, int] = {}
    for k, (y, s, e) in enumerate(runs):
        root = find(k)
        if root not in ids:
            ids[root] = len(ids) + 1
        labels[y, s:e] = ids[root]
    return labels, len(ids)


def keep_prompted_component(mask: np.ndarray, points: Sequence[tuple[float, float]],
                            point_labels: Sequence[int]) -> np.ndarray:
    """One object per mask: when a mask falls apart into several connected pieces (two objects, or an object
    plus stray pixels), keep the piece the prompt points at, so its box cannot stretch across objects.

    The kept piece holds the first positive point (in pixel (x, y)); when that point lies off the mask, the
    piece holding most positive points, then the one nearest the first positive point."""
    labels, n = mask_components(mask)
    if n <= 1:
        return np.asarray(mask, dtype=bool)
    h, w = labels.shape
    pos = [(min(h - 1, max(0, int(y))), min(w - 1, max(0, int(x))))
           for (x, y), lab in zip(points, point_labels) if lab == 1]
    if not pos:
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        return labels == int(np.argmax(sizes)) + 1
    first = labels[pos[0]]
    if first == 0:
        hits = np.bincount([labels[p] for p in pos], minlength=n + 1)[1:]
        if hits.max() > 0:
            first = int(np.argmax(hits)) + 1
        else:
            ys, xs = np.nonzero(labels)
            k = int(np.argmin((ys - pos[0][0]) ** 2 + (xs - pos[0][1]) ** 2))
            first = labels[ys[k], xs[k]]
    return labels == first


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.count_nonzero(a & b)
    union = np.count_nonzero(a | b)
    return inter / union if union else 0.0


def one_label_per_object(masks: Sequence[np.ndarray], scores: Sequence[float], labels: Sequence[str],
                         iou_threshold: float = 0.5,
                         priority: Sequence[float] | None = None) -> list[tuple[int, str]]:
    """Suppression across labels: detections whose masks overlap (mask IoU above `iou_threshold`) are one
    object, which gets one label, the label with the largest summed score among them (every view, question
    and prompt that found it votes with its score), and is kept once, as the best-scoring detection of that
    label. Equal votes go to the label of the detection with the highest `priority` (VL-SAM: the area of the
    view that labelled it, so the full image outranks a crop). Returns (kept index, label) pairs, best score
    first."""
    priority = [0.0] * len(masks) if priority is None else list(priority)
    if not len(masks) == len(scores) == len(labels) == len(priority):
        raise ValueError("masks, scores, labels (and priority) must have the same length")
    order = sorted(range(len(masks)), key=lambda i: -float(scores[i]))
    taken = [False] * len(masks)
    kept: list[tuple[int, str]] = []
    for i in order:
        if taken[i]:
            continue
        group = [j for j in order if not taken[j] and (j == i or mask_iou(masks[i], masks[j]) > iou_threshold)]
        for j in group:
            taken[j] = True
        votes: dict[str, float] = {}
        for j in group:
            votes[labels[j]] = votes.get(labels[j], 0.0) + float(scores[j])
        rank = {lab: max(priority[j] for j in group if labels[j] == lab) for lab in votes}
        label = max(votes, key=lambda lab: (round(votes[lab], 9), rank[lab], lab == labels[i]))
        best = next(j for j in group if labels[j] == label)  # group is in score order
        kept.append((best, label))
    return kept
