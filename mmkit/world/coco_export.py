"""The reference world in the formats of real benchmarks: a COCO-layout directory and POPE question files.

    DIR/val/world{S}_{index:06d}.png          images (lossless, so pixels equal the generated scenes)
    DIR/annotations/instances_val.json        COCO instances: boxes [x, y, w, h], masks as uncompressed RLE
                                              (column-major, as COCO), area, and each object's colour
    DIR/annotations/captions_val.json         one reference caption per image (`reference_caption`)
    DIR/pope/world_pope_{split}.json          POPE question files (JSON lines: question_id, image, text, label)
                                              for the random, popular and adversarial splits
    DIR/vqa.jsonl                             the colour / count / spatial questions as generic VQA rows
    DIR/pope/parquet/test-*.parquet           (with parquet=True) the three splits in lmms-eval's POPE layout

The questions are those of `mmkit eval`'s built-in benches on the same world seed and scenes, in the same order, so
the file readers can be checked against the built-in benches. The directory is written beside its target and
renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mmkit.errors import MmkitError
# The COCO RLE codec the grounding outputs already write; one implementation for both.
from mmkit.grounding.outputs import rle_decode, rle_encode  # noqa: F401 - rle_decode re-exported for readers

SPLIT = "val"
POPE_FILE = "world_pope_{split}.json"


def image_name(world_seed: int, index: int) -> str:
    return f"world{world_seed}_{index:06d}.png"


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _write_world(root: Path, world_seed: int, n_images: int, parquet: bool) -> dict[str, int]:
    from mmkit.world.questions import POPE_SPLITS, pope_questions, reference_caption, vqa_questions
    from mmkit.world.scenes import CATEGORIES, generate_scene

    (root / SPLIT).mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "pope").mkdir()
    cat_ids = {c: i + 1 for i, c in enumerate(CATEGORIES)}
    images, annotations, captions = [], [], []
    for index in range(n_images):
        scene = generate_scene(world_seed, index)
        name = image_name(world_seed, index)
        scene.image.save(root / SPLIT / name, format="PNG")
        image_id = index + 1
        images.append({"id": image_id, "file_name": name, "width": scene.image.size[0],
                       "height": scene.image.size[1]})
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[obj.category],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": obj.area, "iscrowd": 0,
                                "segmentation": rle_encode(obj.mask), "colour": obj.colour})
        captions.append({"id": index + 1, "image_id": image_id, "caption": reference_caption(scene)})
    info = {"description": f"mmkit reference world, world seed {world_seed}, scenes 0-{n_images - 1}",
            "version": "1.0", "mmkit_world_seed": world_seed}
    categories = [{"id": i, "name": c, "supercategory": "object"} for c, i in cat_ids.items()]
    (root / "annotations" / f"instances_{SPLIT}.json").write_text(json.dumps(
        {"info": info, "images": images, "annotations": annotations, "categories": categories}))
    (root / "annotations" / f"captions_{SPLIT}.json").write_text(json.dumps(
        {"info": info, "images": images, "annotations": captions}))

    counts = {"images": n_images}
    parquet_rows = []
    for split in POPE_SPLITS:
        rows = []
        for q in pope_questions(world_seed, n_images, split):
            rows.append({"question_id": len(rows) + 1, "image": image_name(world_seed, q.scene_index),
                         "text": q.prompt, "label": q.answer})
            parquet_rows.append((q, split, len(parquet_rows) + 1))
        (root / "pope" / POPE_FILE.format(split=split)).write_text(_jsonl(rows))
        counts[f"pope_{split}"] = len(rows)
    vqa = [{"question_id": q.qid, "image": image_name(world_seed, q.scene_index), "question": q.prompt,
            "answer": q.answer, "type": q.kind} for q in vqa_questions(world_seed, n_images)]
    (root / "vqa.jsonl").write_text(_jsonl(vqa))
    counts["vqa"] = len(vqa)
    if parquet:
        _write_pope_parquet(root / "pope" / "parquet" / "test-00000-of-00001.parquet", root / SPLIT, parquet_rows)
    return counts


def _write_pope_parquet(path: Path, images: Path, rows) -> None:
    """lmms-eval's POPE layout: id, question_id, question, answer, image_source, image {bytes, path}, category."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MmkitError("--parquet needs pyarrow: pip install 'mmkit-vlm[parquet]'") from None
    path.parent.mkdir(parents=True)
    cache: dict[str, bytes] = {}
    columns: dict[str, list] = {k: [] for k in ("id", "question_id", "question", "answer", "image_source", "image",
                                                 "category")}
    for q, split, number in rows:
        name = image_name(q.world_seed, q.scene_index)
        if name not in cache:
            cache[name] = (images / name).read_bytes()
        columns["id"].append(str(number - 1))
        columns["question_id"].append(str(number))
        columns["question"].append(q.prompt)
        columns["answer"].append(q.answer)
        columns["image_source"].append(Path(name).stem)
        columns["image"].append({"bytes": cache[name], "path": None})
        columns["category"].append(split)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    # The feature metadata HF `datasets` writes, so `datasets` (and so lmms-eval) decodes `image` as a PIL image.
    features = {k: {"_type": "Image"} if k == "image" else {"dtype": "string", "_type": "Value"} for k in columns}
    schema = pa.schema([(k, image_type if k == "image" else pa.string()) for k in columns],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=256)


def export_world(out: str | os.PathLike, world_seed: int = 1, n_images: int = 500, parquet: bool = False,
                 overwrite: bool = False) -> dict[str, int]:
    """Write scenes 0 .. n_images-1 of `world_seed` to `out` (see the module docstring); returns the counts
    written. `out` must not exist or be empty unless `overwrite`."""
    if n_images < 1:
        raise MmkitError(f"--images must be >= 1, got {n_images}")
    from mmkit.atomic import atomic_directory

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MmkitError(f"{out} is a file; --out must be a directory to create")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MmkitError(f"{out} exists and is not empty; pick another --out or pass --overwrite")
    with atomic_directory(out) as tmp:
        return _write_world(tmp, world_seed, n_images, parquet)
