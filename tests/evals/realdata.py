"""Fixtures in the official formats, written from scratch for the tests: COCO-named photo-like JPEGs, a POPE
question file, a COCO annotation directory (instances + captions) and a VQA file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mmkit.evals.objects import COCO_CATEGORIES

# Per image: (instance categories, reference captions).
COCO_IMAGES = {
    139: (["person", "dining table", "cup"], ["A man sits at a dining table with a mug of coffee.",
                                              "Two people eating at a table."]),
    285: (["bear"], ["A big brown bear sitting in the grass."]),
    632: (["bed", "book"], ["A bedroom with a bed and a potted plant by the window."]),
    724: (["stop sign"], ["A stop sign on a street corner."]),
    776: (["teddy bear"], ["Three teddy bears sitting together."]),
}


def coco_name(image_id: int, split: str = "val2014") -> str:
    return f"COCO_{split}_{image_id:012d}.jpg"


def photo_like(seed: int, size=(160, 120)) -> Image.Image:
    """A smooth sky-to-ground gradient with blobs and sensor noise, saved as a JPEG like a photo."""
    rng = np.random.default_rng(seed)
    w, h = size
    y = np.linspace(0, 1, h)[:, None, None]
    top, bottom = rng.uniform(60, 230, 3), rng.uniform(20, 200, 3)
    img = np.broadcast_to(top * (1 - y) + bottom * y, (h, w, 3)).copy()
    yy, xx = np.mgrid[:h, :w]
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 40)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + rng.uniform(0, 255, 3) * blob
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_coco(root: Path, split: str = "val2014") -> Path:
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    ids = {name: i + 1 for i, name in enumerate(COCO_CATEGORIES)}
    images, instances, captions = [], [], []
    for k, (image_id, (cats, caps)) in enumerate(sorted(COCO_IMAGES.items())):
        photo_like(image_id).save(root / split / coco_name(image_id, split), quality=90)
        images.append({"id": image_id, "file_name": coco_name(image_id, split), "width": 160, "height": 120})
        for cat in cats:
            instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": ids[cat],
                              "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0,
                              "segmentation": [[10, 10, 50, 10, 50, 40, 10, 40]]})
        for cap in caps:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": cap})
    cats = [{"id": i, "name": n, "supercategory": "thing"} for n, i in ids.items()]
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": images, "annotations": instances, "categories": cats}))
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images,
                                                                             "annotations": captions}))
    return root


def write_pope(path: Path, rows: list[tuple[int, str, str]]) -> Path:
    """POPE's question file: one JSON object per line (question_id, image, text, label)."""
    lines = [json.dumps({"question_id": i + 1, "image": coco_name(image_id), "text": f"Is there a {obj} in the image?",
                         "label": label}) for i, (image_id, obj, label) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


POPE_ROWS = [(139, "cup", "yes"), (139, "dog", "no"), (285, "bear", "yes"), (285, "car", "no"),
             (632, "book", "yes"), (632, "toilet", "no")]
