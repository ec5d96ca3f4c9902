"""Metrics of the benches: POPE, CHAIR, short-answer VQA and grounding (mask IoU, box AP@0.5). Pure Python/NumPy.

Conventions shared by every function here: inputs are parallel sequences (one entry per sample) and a length
mismatch or an empty input raises ValueError; a ratio whose denominator is zero (e.g. precision with no "yes"
answers) is 0.0, as in scikit-learn's ``zero_division=0``.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np

Box = Sequence[float]  # (x0, y0, x1, y1), x1 >= x0 and y1 >= y0

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"[.!?\n]")
# "n't" -> " not", so "There isn't a cup." parses as a negative answer.
_CONTRACTION = re.compile(r"n['\u2019]t\b")
_NEGATIONS = frozenset({"no", "not", "none", "nope"})
# "a"/"an" are articles far more often than counts, so they are dropped rather than read as "1".
_ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {"zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
                "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17",
                "eighteen": "18", "nineteen": "19", "twenty": "20"}
AP_IOU_THRESHOLD = 0.5
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's recThrs


def _check_lengths(**seqs: Sequence) -> int:
    lengths = {name: len(seq) for name, seq in seqs.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have one entry per sample; got lengths {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"no samples to score (empty {', '.join(lengths)})")
    return n


def _safe_div(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(p: float, r: float) -> float:
    return _safe_div(2 * p * r, p + r)


# ---------------------------------------------------------------------------------------------------------------
# POPE


def parse_yes_no(text: str | None) -> str | None:
    """Read a yes/no answer as LLaVA's POPE script does: only the first sentence counts.

    The first word decides when it is "yes" or "no" ("Yes.", "no, there is none", "NO"). Otherwise the first
    sentence is scanned in order and the first "yes" or negation ("no", "not", "none", "n't") decides, so "There
    is no cup." and "There isn't one." are "no", "I think yes" is "yes". Unlike LLaVA, which calls anything
    without a negation "yes", an answer with neither (e.g. "a cup", "") is None: the metrics count it as wrong.
    """
    if text is None:
        return None
    low = _CONTRACTION.sub(" not", text.lower().strip())
    words = _WORD.findall(_SENTENCE_END.split(low, maxsplit=1)[0])
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    for word in words:
        if word == "yes":
            return "yes"
        if word in _NEGATIONS:
            return "no"
    return None


def pope_metrics(preds: Sequence[str | None], labels: Sequence[str]) -> dict:
    """POPE scores with "yes" as the positive class.

    Args:
        preds: parsed answers, "yes", "no" or None (unparseable; see `parse_yes_no`).
        labels: "yes" / "no" ground truth.

    Returns:
        accuracy, precision, recall, f1, yes_ratio (share of "yes" answers), unparsed (share of None), n.
        An unparseable answer is wrong and counts as not-yes (a false negative on a "yes" question).
    """
    n = _check_lengths(preds=preds, labels=labels)
    bad_pred = next((p for p in preds if p not in ("yes", "no", None)), "ok")
    if bad_pred != "ok":
        raise ValueError(f"preds must be 'yes', 'no' or None, got {bad_pred!r}; parse answers with parse_yes_no")
    bad_label = next((y for y in labels if y not in ("yes", "no")), None)
    if bad_label is not None:
        raise ValueError(f"labels must be 'yes' or 'no', got {bad_label!r}")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(preds, labels))
    fp = sum(p == "yes" and y == "no" for p, y in zip(preds, labels))
    fn = sum(p != "yes" and y == "yes" for p, y in zip(preds, labels))
    correct = sum(p == y for p, y in zip(preds, labels))
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    return {
        "accuracy": correct / n,
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "yes_ratio": sum(p == "yes" for p in preds) / n,
        "unparsed": sum(p is None for p in preds) / n,
        "n": n,
    }


# ---------------------------------------------------------------------------------------------------------------
# CHAIR


def chair_metrics(mentions: Sequence[Sequence[str]], truths: Sequence[Iterable[str]], lengths: Sequence[int]) -> dict:
    """CHAIR scores of captions (Rohrbach et al. 2018).

    Args:
        mentions: per caption, the object categories its text mentions (after synonym mapping). A category
            mentioned twice in one caption counts once.
        truths: per caption, the categories present in the image.
        lengths: per caption, its length in words.

    Returns:
        chair_s (captions with >= 1 hallucinated object / captions), chair_i (hallucinated / mentioned objects),
        recall (mentioned present objects / present objects), f1 of (1 - chair_i, recall), mean_length, n.
    """
    n = _check_lengths(mentions=mentions, truths=truths, lengths=lengths)
    if isinstance(next(iter(mentions)), str):
        raise ValueError("mentions must hold one list of categories per caption, not a flat list of strings")
    hallucinated_caps = mentioned = hallucinated = covered = present = 0
    for said, truth in zip(mentions, truths):
        said, truth = set(said), set(truth)
        bad = said - truth
        hallucinated_caps += bool(bad)
        mentioned += len(said)
        hallucinated += len(bad)
        covered += len(said & truth)
        present += len(truth)
    chair_i = _safe_div(hallucinated, mentioned)
    recall = _safe_div(covered, present)
    return {
        "chair_s": hallucinated_caps / n,
        "chair_i": chair_i,
        "recall": recall,
        "f1": _f1(1.0 - chair_i, recall),
        "mean_length": sum(lengths) / n,
        "n": n,
    }


# ---------------------------------------------------------------------------------------------------------------
# Short-answer VQA


def normalize_answer(text: str | None) -> str:
    """Lower-case words without punctuation or articles, number words as digits: "Two cups." -> "2 cups"."""
    words = _WORD.findall(_CONTRACTION.sub(" not", (text or "").lower()))
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_correct(pred: str | None, answer: str) -> bool:
    """Whether a free-form short answer matches the reference after `normalize_answer`.

    yes/no references compare the first word only ("Yes, it is." is right for "yes"). Other references must
    match exactly or be the leading words of the prediction ("2 cups" for "2", "red." for "red"); for a
    numeric reference a leading "no" means zero ("No cups." is right for "0").
    """
    p, a = normalize_answer(pred).split(), normalize_answer(answer).split()
    if not p or not a:
        return False
    if a[0] in ("yes", "no") and len(a) == 1:
        return p[0] == a[0]
    if len(a) == 1 and a[0].isdigit() and p[0] == "no":
        p[0] = "0"
    return p[:len(a)] == a


def vqa_metrics(kinds: Sequence[str], preds: Sequence[str | None], answers: Sequence[str]) -> dict:
    """Accuracy overall and per question kind ("accuracy/color", ...), matching answers with `vqa_correct`."""
    n = _check_lengths(kinds=kinds, preds=preds, answers=answers)
    correct = [vqa_correct(p, a) for p, a in zip(preds, answers)]
    out: dict = {"accuracy": sum(correct) / n}
    for kind in sorted(set(kinds)):
        hits = [c for c, k in zip(correct, kinds) if k == kind]
        out[f"accuracy/{kind}"] = sum(hits) / len(hits)
    out["n"] = n
    return out


# ---------------------------------------------------------------------------------------------------------------
# Grounding


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape; two empty masks agree perfectly (1.0)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: pred {pred.shape} vs gt {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


def _check_box(box: Box) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"a box is (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {box!r} has x1 < x0 or y1 < y0; boxes are (x0, y0, x1, y1)")
    return x0, y0, x1, y1


def box_iou(a: Box, b: Box) -> float:
    """IoU of two (x0, y0, x1, y1) boxes in continuous coordinates (area = width * height)."""
    ax0, ay0, ax1, ay1 = _check_box(a)
    bx0, by0, bx1, by1 = _check_box(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def _class_ap(dets: list[tuple[float, int, Box]], gts: dict[int, list[Box]], iou_threshold: float) -> float:
    n_gt = sum(len(v) for v in gts.values())
    if not dets:
        return 0.0
    # Stable sort by score, like COCO's mergesort: ties keep image order.
    dets = sorted(dets, key=lambda d: -d[0])
    matched = {i: [False] * len(boxes) for i, boxes in gts.items()}
    tp = np.zeros(len(dets))
    for k, (_, image, box) in enumerate(dets):
        # As in COCO: the best-overlapping ground truth not yet matched, if its IoU reaches the threshold.
        best, best_iou = -1, iou_threshold
        for j, gt_box in enumerate(gts.get(image, [])):
            if matched[image][j]:
                continue
            iou = box_iou(box, gt_box)
            if iou >= best_iou:
                best, best_iou = j, iou
        if best >= 0:
            matched[image][best] = True
            tp[k] = 1.0
    tp_c = np.cumsum(tp)
    recall = tp_c / n_gt
    precision = tp_c / np.arange(1, len(dets) + 1)
    # Precision envelope (max precision at any recall >= r), sampled at 101 recall points; unreached points are 0.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, _RECALL_POINTS, side="left")
    reached = idx < len(precision)
    sampled = np.zeros(len(_RECALL_POINTS))
    sampled[reached] = precision[idx[reached]]
    return float(np.mean(sampled))


def box_ap50(predictions: Sequence[Sequence[tuple[Box, float, str]]],
             truths: Sequence[Sequence[tuple[Box, str]]], iou_threshold: float = AP_IOU_THRESHOLD) -> float:
    """COCO-style box AP at IoU 0.5 over a set of images.

    Per class: detections of all images ranked by score, each matched greedily to the best unmatched ground truth
    of its image with IoU >= 0.5, precision made monotone and sampled at 101 recall points (COCO's
    interpolation). The result is the mean over the classes that have ground truth; detections of other classes
    are ignored, as in COCO. No per-image detection cap (COCO keeps 100) and no crowd regions.

    Args:
        predictions: per image, [(box, score, label), ...].
        truths: per image, [(box, label), ...].

    Returns:
        AP in [0, 1], or NaN when no image has ground truth.
    """
    if len(predictions) != len(truths):
        raise ValueError(f"predictions and truths must have one entry per image; got {len(predictions)} and "
                         f"{len(truths)}")
    classes = sorted({label for image in truths for _, label in image}, key=str)
    if not classes:
        return float("nan")
    aps = []
    for cls in classes:
        dets = [(float(score), i, box) for i, image in enumerate(predictions) for box, score, label in image
                if label == cls]
        gts = {i: [box for box, label in image if label == cls] for i, image in enumerate(truths)}
        aps.append(_class_ap(dets, gts, iou_threshold))
    return float(np.mean(aps))


def grounding_metrics(pred_masks: Sequence[np.ndarray | None], gt_masks: Sequence[np.ndarray],
                      box_predictions: Sequence[Sequence[tuple[Box, float, str]]] | None = None,
                      box_truths: Sequence[Sequence[tuple[Box, str]]] | None = None,
                      iou_threshold: float = AP_IOU_THRESHOLD) -> dict:
    """Grounding scores: mask IoU per query and, when boxes are given, box AP@0.5 over the images.

    Args:
        pred_masks: per query, the predicted boolean mask, or None when the model gave none (IoU 0, or 1 when
            the true mask is empty too).
        gt_masks: per query, the true boolean mask (same shape as the prediction).
        box_predictions, box_truths: per image, scored detections and true boxes (see `box_ap50`); give both or
            neither.

    Returns:
        miou (mean IoU), iou@0.5 (share of queries with IoU >= 0.5), answered (share with a mask), n, and
        box_ap50 when boxes were given.
    """
    n = _check_lengths(pred_masks=pred_masks, gt_masks=gt_masks)
    if (box_predictions is None) != (box_truths is None):
        raise ValueError("give both box_predictions and box_truths, or neither")
    ious = [mask_iou(np.zeros_like(g, dtype=bool) if p is None else p, g) for p, g in zip(pred_masks, gt_masks)]
    out = {
        "miou": float(np.mean(ious)),
        f"iou@{iou_threshold:g}": float(np.mean([iou >= iou_threshold for iou in ious])),
        "answered": sum(p is not None for p in pred_masks) / n,
        "n": n,
    }
    if box_predictions is not None:
        out["box_ap50"] = box_ap50(box_predictions, box_truths, iou_threshold)
    return out


_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def parse_boxes(text: str | None) -> list[tuple[float, float, float, float]]:
    """All "[x0, y0, x1, y1]" boxes in a text answer, in order; malformed ones (x1 < x0 or y1 < y0) are skipped."""
    boxes = []
    for match in _BOX.finditer(text or ""):
        x0, y0, x1, y1 = (float(v) for v in match.groups())
        if x1 >= x0 and y1 >= y0:
            boxes.append((x0, y0, x1, y1))
    return boxes


# ---------------------------------------------------------------------------------------------------------------
# Across runs


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, as for seeds of a run; 0.0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
