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
        (records, metrics): one JSON-able record per question; metrics with miou, iou@0.5, answered, box_ap50,
        n, images, point_on_object (share of detections of a present label whose first positive point lies on
        a true instance: the map's share of the error), and mean per-image cost (LVLM / SAM calls, sequences,
        prompts, seconds).
    """
    from mmkit.evals.metrics import grounding_metrics, mask_iou
    from mmkit.grounding.vlsam import default_sam, ground
    from mmkit.world.questions import ground_truth
    from mmkit.world.scenes import generate_scene

    if mode not in MODES:
        raise MmkitError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if batch_images < 1:
        raise MmkitError(f"batch_images must be >= 1, got {batch_images}")
    questions = list(questions)
    if not questions:
        raise MmkitError("no grounding questions given")
    if any(q.kind != "ground" for q in questions):
        raise MmkitError("run_ground_bench scores grounding questions only (kind 'ground')")
    if sam is None or isinstance(sam, str):
        sam = default_sam(sam, session.device)

    by_scene: dict[int, list] = {}
    for q in questions:
        by_scene.setdefault(q.scene_index, []).append(q)
    scene_ids = list(by_scene)
    records: list[dict[str, Any]] = []
    pred_masks, gt_masks, box_preds, box_truths, costs = [], [], [], [], []
    point_hits: list[bool] = []
    start_time = time.perf_counter()
    for b0 in range(0, len(scene_ids), batch_images):
        ids = scene_ids[b0:b0 + batch_images]
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
        for i, scene in zip(ids, scenes):
            dets = [d for r in per_scene[i] for d in r.detections]
            cost = {k: sum(r.stats[k] for r in per_scene[i]) for k in _COST_KEYS}
            costs.append(cost)
            asked = sorted({q.target for q in by_scene[i]})
            box_preds.append([(d.box, d.score, d.label) for d in dets])
            box_truths.append([(o.box, o.category) for o in scene.objects if o.category in asked])
            # Diagnostic: does a detection's first positive point land on a true instance of its label? Separates
            # map errors (point off the object) from SAM errors (point on it, mask wrong).
            for d in dets:
                if d.label in scene.categories() and 1 in d.point_labels:
                    x, y = d.points[d.point_labels.index(1)]
                    truth, _ = ground_truth(scene, d.label)
                    yy, xx = min(int(y), truth.shape[0] - 1), min(int(x), truth.shape[1] - 1)
                    point_hits.append(bool(truth[yy, xx]))
            for q in by_scene[i]:
                truth, _ = ground_truth(scene, q.target)
                mine = [d for d in dets if d.label == q.target]
                pred = np.any(np.stack([d.mask for d in mine]), 0) if mine else None
                pred_masks.append(pred)
                gt_masks.append(truth)
                records.append({
                    "qid": q.qid, "scene_index": i, "target": q.target, "prompt": q.prompt,
                    "answers": [a for r in per_scene[i] for a in r.answers],
                    "boxes": [list(d.box) for d in mine], "scores": [round(d.score, 5) for d in mine],
                    "iou": mask_iou(np.zeros_like(truth) if pred is None else pred, truth),
                    "labels_found": sorted({d.label for d in dets}),
                    **{f"image_{k}": v for k, v in cost.items()},
                })
        if progress:
            print(f"ground bench: {min(b0 + batch_images, len(scene_ids))}/{len(scene_ids)} scenes", file=sys.stderr)
    metrics = grounding_metrics(pred_masks, gt_masks, box_preds, box_truths)
    metrics["images"] = len(scene_ids)
    metrics["point_on_object"] = float(np.mean(point_hits)) if point_hits else float("nan")
    metrics["mode"] = mode
    for k in _COST_KEYS:
        metrics[f"{k}_per_image"] = float(np.mean([c[k] for c in costs]))
    metrics["wall_seconds"] = time.perf_counter() - start_time
    return records, metrics


def oracle_point_ap(sam, world_seed: int = 1, n_scenes: int = 50, seed: int = 0,
                    batch_images: int = 10) -> dict[str, float]:
    """The SAM's cap on the bench: box AP@0.5 and instance mIoU when every true object gets a random interior
    point and its true label (perfect listing and maps), decoded with one mask-prompt refinement round."""
    from mmkit.evals.metrics import box_ap50, mask_iou
    from mmkit.grounding.prompts import mask_to_box
    from mmkit.grounding.sam_train import sample_points
    from mmkit.world.scenes import generate_scene

    rng = np.random.default_rng(seed)
    preds, truths, ious = [], [], []
    for b0 in range(0, n_scenes, batch_images):
        scenes = [generate_scene(world_seed, i) for i in range(b0, min(n_scenes, b0 + batch_images))]
        emb = sam.embed([s.image for s in scenes])
        idx, pts, labs, meta = [], [], [], []
        for i, s in enumerate(scenes):
            for o in s.objects:
                p, lab = sample_points(o.mask, rng, 1, 0)
                idx.append(i)
                pts.append(p)
                labs.append(lab)
                meta.append((i, o))
        pred = sam.predict(emb, idx, pts, labs)
        pred = sam.predict(emb, idx, pts, labs, mask_inputs=pred.low_res_logits)
        per: list[list] = [[] for _ in scenes]
        for m, score, (i, o) in zip(pred.masks, pred.scores, meta):
            box = mask_to_box(m)
            if box is not None:
                per[i].append((box, float(score), o.category))
            ious.append(mask_iou(m, o.mask))
        preds += per
        truths += [[(o.box, o.category) for o in s.objects] for s in scenes]
    return {"oracle_box_ap50": box_ap50(preds, truths), "oracle_instance_miou": float(np.mean(ious)),
            "objects": len(ious)}
