"""Metrics of the reference-world benches: POPE, CHAIR, VQA and grounding. Pure Python/NumPy."""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
# "no", "a" and "an" are left alone: they are yes/no answers and articles far more often than counts.
NUMBER_WORDS = {"zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def parse_yes_no(text: str | None) -> str | None:
    """'yes' / 'no' from an answer, LLaVA-POPE style: the first word decides; None if it is neither."""
    if not text:
        return None
    words = _WORD.findall(text.lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    # Answers like "There is no cup." or "I think yes": fall back to the first yes/no in the first sentence.
    first = _WORD.findall(re.split(r"[.!?\n]", text.lower(), maxsplit=1)[0])
    for word in first:
        if word in ("yes", "no"):
            return word
    return None


def _safe_div(a: float, b: float) -> float:
    return a / b if b else 0.0


def pope_metrics(preds: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class. An unparseable answer is
    wrong and counts as not-yes."""
    if len(preds) != len(labels):
        raise ValueError("preds and labels differ in length")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p != "yes" and y == "yes" for p, y in zip(preds, labels))
    correct = sum(p == y for p, y in zip(preds, labels))
    n = len(labels)
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    return {
        "accuracy": _safe_div(correct, n),
        "precision": precision,
        "recall": recall,
        "f1": _safe_div(2 * precision * recall, precision + recall),
        "yes_ratio": _safe_div(sum(p == "yes" for p in preds), n),
        "unparsed": _safe_div(sum(p is None for p in preds), n),
        "n": n,
    }


def chair_metrics(mentions: Sequence[Sequence[str]], truths: Sequence[set[str]], lengths: Sequence[int]) -> dict:
    """CHAIR_S (captions with a hallucinated object), CHAIR_I (hallucinated / all mentioned objects), recall of the
    present objects, F1 of (1 - CHAIR_I, recall) and mean caption length in words. Each object counts once per
    caption."""
    n = len(mentions)
    hallucinated_caps = 0
    mentioned_total = hallucinated_total = covered = present = 0
    for said, truth in zip(mentions, truths):
        said = set(said)
        bad = said - set(truth)
        hallucinated_caps += bool(bad)
        mentioned_total += len(said)
        hallucinated_total += len(bad)
        covered += len(said & set(truth))
        present += len(truth)
    chair_i = _safe_div(hallucinated_total, mentioned_total)
    recall = _safe_div(covered, present)
    return {
        "chair_s": _safe_div(hallucinated_caps, n),
        "chair_i": chair_i,
        "recall": recall,
        "f1": _safe_div(2 * (1 - chair_i) * recall, (1 - chair_i) + recall),
        "mean_length": _safe_div(sum(lengths), n),
        "n": n,
    }


def normalize_answer(text: str) -> str:
    """Lower-case words with number words as digits; the first word for yes/no answers."""
    return " ".join(NUMBER_WORDS.get(w, w) for w in _WORD.findall((text or "").lower()))


def vqa_correct(pred: str, answer: str) -> bool:
    p, a = normalize_answer(pred), normalize_answer(answer)
    if not p:
        return False
    if a in ("yes", "no"):
        return p.split()[0] == a
    return p == a or p.split()[0] == a or a in p.split()[:2]


def vqa_metrics(kinds: Sequence[str], preds: Sequence[str], answers: Sequence[str]) -> dict:
    """Exact-match accuracy after normalisation, overall and per question kind ("accuracy/color", ...)."""
    out: dict = {}
    correct = [vqa_correct(p, a) for p, a in zip(preds, answers)]
    out["accuracy"] = _safe_div(sum(correct), len(correct))
    for kind in sorted(set(kinds)):
        hits = [c for c, k in zip(correct, kinds) if k == kind]
        out[f"accuracy/{kind}"] = _safe_div(sum(hits), len(hits))
    out["n"] = len(correct)
    return out


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def box_ap50(predictions: Sequence[Sequence[tuple]], truths: Sequence[Sequence[tuple]]) -> float:
    """COCO-style AP at IoU 0.5 (101-point interpolation), averaged over the classes present in the truth.

    predictions[i]: [(box, score, label), ...] of image i; truths[i]: [(box, label), ...].
    """
    classes = sorted({label for image in truths for _, label in image})
    if not classes:
        return float("nan")
    aps = []
    for cls in classes:
        dets = [(score, i, box) for i, image in enumerate(predictions) for box, score, label in image if label == cls]
        dets.sort(key=lambda d: -d[0])
        gts = {i: [box for box, label in image if label == cls] for i, image in enumerate(truths)}
        n_gt = sum(len(v) for v in gts.values())
        used = {i: [False] * len(v) for i, v in gts.items()}
        tp, fp = [], []
        for _, i, box in dets:
            ious = [box_iou(box, g) for g in gts.get(i, [])]
            best = int(np.argmax(ious)) if ious else -1
            if best >= 0 and ious[best] >= 0.5 and not used[i][best]:
                used[i][best] = True
                tp.append(1)
                fp.append(0)
            else:
                tp.append(0)
                fp.append(1)
        tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
        recall = tp_c / max(n_gt, 1)
        precision = tp_c / np.maximum(tp_c + fp_c, 1e-12)
        # Precision envelope, then sample at 101 recall points.
        for k in range(len(precision) - 2, -1, -1):
            precision[k] = max(precision[k], precision[k + 1])
        ap = 0.0
        for r in np.linspace(0, 1, 101):
            idx = np.searchsorted(recall, r, side="left")
            ap += precision[idx] if idx < len(precision) else 0.0
        aps.append(ap / 101)
    return float(np.mean(aps))


def grounding_metrics(mask_pairs: Sequence[tuple[np.ndarray, np.ndarray]], predictions: Sequence[Sequence[tuple]],
                      truths: Sequence[Sequence[tuple]]) -> dict:
    """Mask mIoU over (predicted, true) mask pairs (an unanswered query pairs an empty mask) and box AP@0.5."""
    ious = [mask_iou(p, g) for p, g in mask_pairs]
    return {"miou": float(np.mean(ious)) if ious else float("nan"), "box_ap50": box_ap50(predictions, truths),
            "n": len(mask_pairs)}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
