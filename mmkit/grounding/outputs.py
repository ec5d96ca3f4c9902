"""Grounding outputs: overlay and heat-map images, and COCO-format results with RLE masks (atomic writes)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

# Distinct overlay colours (RGB), cycled per detection.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))
MASK_ALPHA = 0.45
HEAT_ALPHA = 0.55


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of a bool (H, W) mask: column-major run lengths starting with a background run."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of `rle_encode`."""
    h, w = rle["size"]
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for run in rle["counts"]:
        flat[pos:pos + run] = value
        pos += run
        value = not value
    return flat.reshape((w, h)).T


def coco_results(result, file_name: str, image_id: int = 1) -> dict[str, Any]:
    """A COCO-style dict (images, categories, annotations with score and RLE segmentation) for one image."""
    labels = sorted({d.label for d in result.detections})
    cat_id = {label: i + 1 for i, label in enumerate(labels)}
    w, h = result.size
    annotations = []
    for k, d in enumerate(result.detections):
        x0, y0, x1, y1 = d.box
        annotations.append({
            "id": k + 1, "image_id": image_id, "category_id": cat_id[d.label], "label": d.label,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(d.mask.sum()), "score": round(float(d.score), 6),
            "segmentation": rle_encode(d.mask), "iscrowd": 0,
            "points": [[round(x, 2), round(y, 2)] for x, y in d.points], "point_labels": list(d.point_labels),
        })
    return {
        "images": [{"id": image_id, "file_name": file_name, "width": w, "height": h}],
        "categories": [{"id": cat_id[label], "name": label} for label in labels],
        "annotations": annotations,
        "answers": list(result.answers),
        "stats": dict(result.stats),
    }


def overlay_image(image, result):
    """The image with every detection's mask tinted, its box drawn and its label and score written."""
    from PIL import Image, ImageDraw

    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    for k, d in enumerate(result.detections):
        colour = np.array(PALETTE[k % len(PALETTE)], dtype=np.float32)
        base[d.mask] = (1 - MASK_ALPHA) * base[d.mask] + MASK_ALPHA * colour
    out = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for k, d in enumerate(result.detections):
        colour = PALETTE[k % len(PALETTE)]
        draw.rectangle([d.box[0], d.box[1], d.box[2] - 1, d.box[3] - 1], outline=colour, width=2)
        text = f"{d.label} {d.score:.2f}"
        tx, ty = d.box[0] + 2, max(0, d.box[1] - 12)
        bbox = draw.textbbox((tx, ty), text)
        draw.rectangle(bbox, fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=colour)
        for (x, y), lab in zip(d.points, d.point_labels):
            r = 3
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 255, 0) if lab == 1 else (255, 0, 0),
                         outline=(0, 0, 0))
    return out


def heatmap_image(image, attn: np.ndarray):
    """The image blended with a colour-mapped (bilinearly upsampled) attention map."""
    from matplotlib import colormaps
    from PIL import Image

    w, h = image.size
    norm = np.asarray(attn, dtype=np.float32)
    lo, hi = float(norm.min()), float(norm.max())
    norm = (norm - lo) / (hi - lo) if hi > lo else np.zeros_like(norm)
    small = Image.fromarray((norm * 255).astype(np.uint8))
    up = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    heat = colormaps["jet"](up)[..., :3] * 255
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip((1 - HEAT_ALPHA) * base + HEAT_ALPHA * heat, 0, 255).astype(np.uint8))


def atomic_save_png(img, path: str | os.PathLike) -> None:
    """Save a PIL image as PNG via a temporary file and a rename."""
    from mmkit.atomic import atomic_path

    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def safe_name(label: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_") or "object"


def write_outputs(image, result, out_dir: str | os.PathLike, stem: str = "image") -> dict[str, str]:
    """Write `{stem}_overlay.png`, `{stem}_attn_{label}.png` per mapped label and `{stem}_coco.json` into out_dir.
    Returns {kind: path}."""
    from mmkit.atomic import atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    overlay = out / f"{stem}_overlay.png"
    atomic_save_png(overlay_image(image, result), overlay)
    paths["overlay"] = str(overlay)
    for label, attn in result.maps.items():
        p = out / f"{stem}_attn_{safe_name(label)}.png"
        atomic_save_png(heatmap_image(image, attn), p)
        paths[f"attn_{label}"] = str(p)
    coco = out / f"{stem}_coco.json"
    atomic_write_json(coco, coco_results(result, file_name=stem))
    paths["coco"] = str(coco)
    return paths
