"""The `ground` bench: VL-SAM on reference-world scenes, scored against the exact object masks.

Per question (scene, present category): the union of the predicted masks with that label against the union of
the category's visible masks (`ground_truth`), giving mask mIoU; per scene: every detection against every true
instance of the asked categories, giving COCO-style box AP@0.5. Cost: LVLM and SAM calls per image.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal, Sequence

import numpy as np

from mmkit.errors import MmkitError

logger = logging.getLogger(__name__)

MODES = ("describe", "query")
_COST_KEYS = ("lvlm_calls", "lvlm_generate_calls", "lvlm_forward_calls", "lvlm_sequences", "sam_calls",
              "sam_image_calls", "sam_decode_calls", "sam_prompts", "seconds")


def run_ground_bench(session, questions: Sequence, world_seed: int, sam=None, config=None,
                     mode: Literal["describe", "query"] = "describe", batch_images: int = 4,
                     progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run VL-SAM over grounding questions and score it.

    Args:
        session: mmkit Session of the LVLM.
        questions: `ground_questions(...)` items (kind "ground"); grouped by scene, order kept.
        world_seed: world the questions come from.
        sam: SamBackend, checkpoint dir / hub id, or None (shipped small SAM).
        config: VLSAMConfig (None: the preset `vlsam.auto_preset` picks for the session).
        mode: "describe": the LVLM lists the objects and every listed one is grounded (open-ended; hallucinated
            or missed objects cost AP); "query": each asked category is grounded from "Where is the {x}?".
        batch_images: scenes per pipeline call.

    Returns:
        (records, metrics): one JSON-able record per question (`ground_scene_records`) and `ground_metrics` of
        them, plus the wall time.
    """
    from mmkit.grounding.vlsam import default_sam

    check_ground_args(questions, mode, batch_images)
    sam = default_sam(sam, session.device)
    chunks = scene_chunks(questions, batch_images)
    records: list[dict[str, Any]] = []
    start_time = time.perf_counter()
    for done, chunk in enumerate(chunks, 1):
        records += ground_scene_records(session, sam, chunk, world_seed, config=config, mode=mode)
        if progress:
            print(f"ground bench: {done}/{len(chunks)} scene batches", file=sys.stderr)
    metrics = ground_metrics(records)
    metrics["mode"] = mode
    metrics["wall_seconds"] = time.perf_counter() - start_time
    return records, metrics


def check_ground_args(questions: Sequence, mode: str, batch_images: int) -> None:
    if mode not in MODES:
        raise MmkitError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if batch_images < 1:
        raise MmkitError(f"batch_images must be >= 1, got {batch_images}")
    if not questions:
        raise MmkitError("no grounding questions given")
    if any(q.kind != "ground" for q in questions):
        raise MmkitError("the ground bench scores grounding questions only (kind 'ground')")


def scene_chunks(questions: Sequence, batch_images: int) -> list[list]:
    """Questions grouped into batches of `batch_images` scenes (question order kept): one pipeline call each."""
    by_scene: dict[int, list] = {}
    for q in questions:
        by_scene.setdefault(q.scene_index, []).append(q)
    ids = list(by_scene)
    return [[q for i in ids[b0:b0 + batch_images] for q in by_scene[i]] for b0 in range(0, len(ids), batch_images)]


def ground_scene_records(session, sam, questions: Sequence, world_seed: int, config=None,
                         mode: Literal["describe", "query"] = "describe") -> list[dict[str, Any]]:
    """Ground the scenes of `questions` in one pipeline call; one JSON-able record per question.

    Each record also carries its scene's detections, true boxes of the asked categories, first-point hits and
    pipeline cost, so that `ground_metrics` needs nothing but the records (a resumed run scores what it stored).
    """
    from mmkit.evals.metrics import mask_iou
    from mmkit.grounding.vlsam import ground
    from mmkit.world.questions import ground_truth
    from mmkit.world.scenes import generate_scene

    by_scene: dict[int, list] = {}
    for q in questions:
        by_scene.setdefault(q.scene_index, []).append(q)
    ids = list(by_scene)
    scenes = [generate_scene(world_seed, i) for i in ids]
    if mode == "describe":
        results = ground(session, sam, [s.image for s in scenes], config=config)
        per_scene = {i: [r] for i, r in zip(ids, results)}
    else:
        pairs = [(s, q) for i, s in zip(ids, scenes) for q in by_scene[i]]
        results = ground(session, sam, [s.image for s, _ in pairs], query=[q.target for _, q in pairs],
                         config=config)
        per_scene = {i: [] for i in ids}
        for (s, _), r in zip(pairs, results):
            per_scene[s.index].append(r)
    records: list[dict[str, Any]] = []
    for i, scene in zip(ids, scenes):
        dets = [d for r in per_scene[i] for d in r.detections]
        cost = {k: sum(r.stats[k] for r in per_scene[i]) for k in _COST_KEYS}
        asked = sorted({q.target for q in by_scene[i]})
        # Diagnostic: does a detection's first positive point land on a true instance of its label? Separates
        # map errors (point off the object) from SAM errors (point on it, mask wrong).
        hits = []
        for d in dets:
            if d.label in scene.categories() and 1 in d.point_labels:
                x, y = d.points[d.point_labels.index(1)]
                truth, _ = ground_truth(scene, d.label)
                yy, xx = min(int(y), truth.shape[0] - 1), min(int(x), truth.shape[1] - 1)
                hits.append(bool(truth[yy, xx]))
        scene_fields = {
            "scene_detections": [[list(map(float, d.box)), round(float(d.score), 5), d.label] for d in dets],
            "scene_truths": [[list(map(float, o.box)), o.category] for o in scene.objects if o.category in asked],
            "scene_point_hits": hits,
            **{f"image_{k}": v for k, v in cost.items()},
        }
        for q in by_scene[i]:
            truth, _ = ground_truth(scene, q.target)
            mine = [d for d in dets if d.label == q.target]
            pred = np.any(np.stack([d.mask for d in mine]), 0) if mine else None
            records.append({
                "qid": q.qid, "scene_index": i, "target": q.target, "prompt": q.prompt,
                "answers": [a for r in per_scene[i] for a in r.answers],
                "boxes": [list(d.box) for d in mine], "scores": [round(d.score, 5) for d in mine],
                "iou": mask_iou(np.zeros_like(truth) if pred is None else pred, truth),
                "labels_found": sorted({d.label for d in dets}),
                **scene_fields,
            })
    return records


def ground_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Bench metrics from per-question records (order-independent).

    miou (mean mask IoU per question), iou@0.5, answered (share of questions whose category got a mask), box_ap50
    (COCO-style over the scenes), n, images, point_on_object (share of detections of a present label whose first
    positive point lies on a true instance) and mean per-image cost (LVLM / SAM calls, sequences, prompts, seconds).
    """
    from mmkit.evals.metrics import AP_IOU_THRESHOLD, box_ap50

    if not records:
        raise MmkitError("no grounding records to score")
    records = sorted(records, key=lambda r: r["qid"])
    scenes: dict[int, dict[str, Any]] = {}
    for r in records:
        scenes.setdefault(r["scene_index"], r)
    ious = [r["iou"] for r in records]
    hits = [h for r in scenes.values() for h in r["scene_point_hits"]]
    metrics: dict[str, Any] = {
        "miou": float(np.mean(ious)),
        f"iou@{AP_IOU_THRESHOLD:g}": float(np.mean([iou >= AP_IOU_THRESHOLD for iou in ious])),
        "answered": sum(bool(r["boxes"]) for r in records) / len(records),
        "n": len(records),
        "box_ap50": box_ap50(
            [[(tuple(box), score, label) for box, score, label in r["scene_detections"]] for r in scenes.values()],
            [[(tuple(box), label) for box, label in r["scene_truths"]] for r in scenes.values()]),
        "images": len(scenes),
        "point_on_object": float(np.mean(hits)) if hits else float("nan"),
    }
    for k in _COST_KEYS:
        metrics[f"{k}_per_image"] = float(np.mean([r[f"image_{k}"] for r in scenes.values()]))
    return metrics


def oracle_point_ap(sam, world_seed: int = 1, n_scenes: int = 50, seed: int = 0,
                    batch_images: int = 10, crop_fraction: float | None = None) -> dict[str, float]:
    """The SAM's cap on the bench: box AP@0.5 and instance mIoU when every true object gets a random interior
    point and its true label (perfect listing and maps), decoded with one mask-prompt refinement round.

    With `crop_fraction` (VL-SAM's multi-scale views), an object lying inside one of the four corner crops of that
    side (2 px from its inner edges) is decoded on that crop, as `sam_view=found` does for objects a crop finds;
    the others on the full image."""
    from mmkit.evals.metrics import box_ap50, mask_iou
    from mmkit.grounding.prompts import mask_to_box
    from mmkit.grounding.sam_train import sample_points
    from mmkit.grounding.vlsam import corner_crops, paste_view_mask
    from mmkit.world.scenes import generate_scene

    rng = np.random.default_rng(seed)
    preds, truths, ious = [], [], []
    on_crops = 0
    for b0 in range(0, n_scenes, batch_images):
        scenes = [generate_scene(world_seed, i) for i in range(b0, min(n_scenes, b0 + batch_images))]
        w, h = scenes[0].image.size
        crops = [] if crop_fraction is None else corner_crops((w, h), crop_fraction)
        emb = sam.embed([s.image for s in scenes] + [s.image.crop(c) for s in scenes for c in crops])
        idx, pts, labs, meta = [], [], [], []
        for i, s in enumerate(scenes):
            for o in s.objects:
                p, lab = sample_points(o.mask, rng, 1, 0)
                x0, y0, x1, y1 = o.box
                held = [k for k, (cx0, cy0, cx1, cy1) in enumerate(crops)
                        if (cx0 == 0 or x0 >= cx0 + 2) and (cy0 == 0 or y0 >= cy0 + 2)
                        and (cx1 == w or x1 <= cx1 - 2) and (cy1 == h or y1 <= cy1 - 2)
                        and x0 >= cx0 and y0 >= cy0 and x1 <= cx1 and y1 <= cy1]
                box = crops[held[0]] if held else (0, 0, w, h)
                idx.append(len(scenes) + len(crops) * i + held[0] if held else i)
                on_crops += bool(held)
                pts.append([(x - box[0], y - box[1]) for x, y in p])
                labs.append(lab)
                meta.append((i, o, box))
        pred = sam.predict(emb, idx, pts, labs)
        pred = sam.predict(emb, idx, pts, labs, mask_inputs=pred.low_res_logits)
        per: list[list] = [[] for _ in scenes]
        for m, score, (i, o, view_box) in zip(pred.masks, pred.scores, meta):
            full = paste_view_mask(m, view_box, (w, h))
            box = mask_to_box(full)
            if box is not None:
                per[i].append((box, float(score), o.category))
            ious.append(mask_iou(full, o.mask))
        preds += per
        truths += [[(o.box, o.category) for o in s.objects] for s in scenes]
    return {"oracle_box_ap50": box_ap50(preds, truths), "oracle_instance_miou": float(np.mean(ious)),
            "objects": len(ious), "objects_on_crops": on_crops}
