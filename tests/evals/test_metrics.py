import math

import numpy as np
import pytest

from mmkit.evals.metrics import (box_ap50, box_iou, chair_metrics, grounding_metrics, mask_iou, mean_std,
                                 normalize_answer, parse_boxes, parse_yes_no, pope_metrics, vqa_correct, vqa_metrics)


@pytest.mark.parametrize("text, parsed", [
    ("Yes.", "yes"), ("yes", "yes"), ("  Yes, there is a cup.", "yes"), ("no, there is none", "no"), ("NO", "no"),
    ("No.", "no"), ("I think yes", "yes"), ("There is no cup in the image.", "no"), ("There isn't a cup.", "no"),
    ("There is not.", "no"), ("Yes, there is no other cup.", "yes"),  # the first word wins
    ("A cup. No.", None),  # only the first sentence counts
    ("a cup", None), ("", None), ("...", None), (None, None),
])
def test_parse_yes_no(text, parsed):
    assert parse_yes_no(text) == parsed


def test_pope_metrics_2x2_confusion_by_hand():
    # Confusion (pred rows x label cols): yes/yes = 3 (TP), yes/no = 1 (FP), no/yes = 2 (FN), no/no = 4 (TN).
    preds = ["yes"] * 3 + ["yes"] + ["no"] * 2 + ["no"] * 4
    labels = ["yes"] * 3 + ["no"] + ["yes"] * 2 + ["no"] * 4
    m = pope_metrics(preds, labels)
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 / 3)  # 2 * 0.75 * 0.6 / 1.35
    assert m["yes_ratio"] == pytest.approx(4 / 10)
    assert m["unparsed"] == 0.0


def test_pope_unparseable_is_wrong_and_not_yes():
    m = pope_metrics(["yes", None, None, "no"], ["yes", "yes", "no", "no"])
    # tp=1, fp=0, fn=1 (the None on a yes question); correct = 2 (both Nones wrong).
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(0.25) and m["unparsed"] == pytest.approx(0.5)


def test_pope_rejects_bad_input():
    with pytest.raises(ValueError, match="parse_yes_no"):
        pope_metrics(["Yes."], ["yes"])
    with pytest.raises(ValueError, match="labels"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="lengths"):
        pope_metrics(["yes"], ["yes", "no"])
    with pytest.raises(ValueError, match="no samples"):
        pope_metrics([], [])


def test_chair_metrics_by_hand():
    mentions = [["cup", "key", "cup"], ["tree", "tree"], [], ["fish", "star"]]
    truths = [{"cup"}, {"tree", "house"}, {"fish"}, {"cup"}]
    m = chair_metrics(mentions, truths, [4, 6, 2, 8])
    # Mentioned (duplicates once): {cup, key}, {tree}, {}, {fish, star} -> 5 mentions, 3 hallucinated (key, fish,
    # star); captions with a hallucination: 1st and 4th of 4. Present objects 5, covered 2 (cup, tree).
    assert m["chair_s"] == pytest.approx(2 / 4)
    assert m["chair_i"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(2 / 5)
    assert m["f1"] == pytest.approx(2 * 0.4 * 0.4 / 0.8)
    assert m["mean_length"] == pytest.approx(5.0)
    assert m["n"] == 4


def test_chair_rejects_flat_mentions():
    with pytest.raises(ValueError, match="one list"):
        chair_metrics(["cup", "key"], [{"cup"}, {"key"}], [1, 1])


@pytest.mark.parametrize("pred, answer, ok", [
    ("two", "2", True), ("Two.", "2", True), ("2 cups", "2", True), ("3 cups", "2", False), ("twelve", "12", True),
    ("None", "0", True), ("No cups.", "0", True), ("Red.", "red", True), ("the red one", "red", True),
    ("blue", "red", False), ("No, it is not", "no", True), ("yes", "no", False), ("Yes it is left", "yes", True),
    ("not left", "left", False), ("", "red", False), ("It is red", "red", False),
])
def test_vqa_correct(pred, answer, ok):
    assert vqa_correct(pred, answer) is ok


def test_vqa_metrics_per_kind():
    m = vqa_metrics(["count", "count", "color", "spatial", "spatial"],
                    ["two", "3 cups", "Red.", "No, it is not", "no"], ["2", "2", "red", "no", "yes"])
    assert m["accuracy/count"] == pytest.approx(0.5)
    assert m["accuracy/color"] == 1.0
    assert m["accuracy/spatial"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["n"] == 5
    assert normalize_answer("The Two, cups!") == "2 cups"


def test_mask_and_box_iou():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        mask_iou(a, np.zeros((3, 3)))
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(2 / 6)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    with pytest.raises(ValueError):
        box_iou((2, 0, 1, 1), (0, 0, 1, 1))


TRUTHS = [[((0, 0, 10, 10), "cup")], [((5, 5, 15, 15), "cup")]]


def test_ap_perfect_is_one():
    perfect = [[((0, 0, 10, 10), 0.9, "cup")], [((5, 5, 15, 15), 0.8, "cup")]]
    assert box_ap50(perfect, TRUTHS) == pytest.approx(1.0)


def test_ap_one_false_positive_ranked_first():
    # One ground truth, an FP (score 0.9) above the TP (0.5): precision 1/2 at recall 1 -> envelope 1/2 at all
    # 101 recall points.
    preds = [[((50, 50, 60, 60), 0.9, "cup"), ((0, 0, 10, 10), 0.5, "cup")]]
    assert box_ap50(preds, [[((0, 0, 10, 10), "cup")]]) == pytest.approx(0.5)
    # Two ground truths, FP first: precisions 0, 1/2, 2/3 at recalls 0, 1/2, 1 -> envelope 2/3 everywhere.
    with_fp = [[((0, 0, 10, 10), 0.5, "cup"), ((50, 50, 60, 60), 0.95, "cup")], [((5, 5, 15, 15), 0.4, "cup")]]
    assert box_ap50(with_fp, TRUTHS) == pytest.approx(2 / 3)


def test_ap_missed_ground_truth_and_classes():
    # One of two cups found: precision 1 up to recall 0.5 -> 51 of the 101 recall points.
    half = [[((0, 0, 10, 10), 0.9, "cup")], []]
    assert box_ap50(half, TRUTHS) == pytest.approx(51 / 101)
    # Mean over classes present in the truth: cup 1.0, key 0.0 (no detection); a "dog" detection with no dog
    # in the truth is ignored.
    truths = [[((0, 0, 10, 10), "cup"), ((20, 20, 30, 30), "key")]]
    preds = [[((0, 0, 10, 10), 0.9, "cup"), ((20, 20, 30, 30), 0.8, "dog")]]
    assert box_ap50(preds, truths) == pytest.approx(0.5)
    assert math.isnan(box_ap50([[]], [[]]))


def test_ap_matches_best_unmatched_truth_like_coco():
    # Two overlapping truths; the top detection takes B (its best), the second detection's best is also B
    # (already taken) but it overlaps A with IoU 0.6 >= 0.5, so COCO counts it as a TP too.
    a, b = (0, 0, 10, 10), (2, 0, 12, 10)
    det1, det2 = (2, 0, 12, 10), (2.5, 0, 12.5, 10)
    assert box_iou(det2, b) > box_iou(det2, a) >= 0.5
    preds = [[(det1, 0.9, "cup"), (det2, 0.8, "cup")]]
    assert box_ap50(preds, [[(a, "cup"), (b, "cup")]]) == pytest.approx(1.0)
    # A duplicate of the same box with nothing left to match is a false positive.
    dup = [[((0, 0, 10, 10), 0.9, "cup"), ((0, 0, 10, 10), 0.8, "cup")]]
    assert box_ap50(dup, [[((0, 0, 10, 10), "cup")]]) == pytest.approx(1.0)  # the FP comes after recall 1
    dup_first = [[((0, 0, 10, 10), 0.5, "cup"), ((0, 0, 10, 10), 0.8, "cup"), ((50, 50, 60, 60), 0.9, "cup")]]
    assert box_ap50(dup_first, [[((0, 0, 10, 10), "cup")]]) == pytest.approx(0.5)


def test_grounding_metrics():
    gt = np.zeros((4, 4), bool)
    gt[:2] = True
    half = np.zeros((4, 4), bool)
    half[:1] = True
    m = grounding_metrics([gt, half, None], [gt, gt, gt])
    assert m["miou"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["iou@0.5"] == pytest.approx(2 / 3)
    assert m["answered"] == pytest.approx(2 / 3) and m["n"] == 3
    assert "box_ap50" not in m
    with_boxes = grounding_metrics([gt], [gt], [[((0, 0, 10, 10), 0.9, "cup")]], [[((0, 0, 10, 10), "cup")]])
    assert with_boxes["box_ap50"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both"):
        grounding_metrics([gt], [gt], box_predictions=[[]])


def test_parse_boxes():
    assert parse_boxes("[1, 2, 30, 40]; [5.5, 6, 7, 8] and [9, 9, 1, 1]") == [(1, 2, 30, 40), (5.5, 6, 7, 8)]
    assert parse_boxes("no box") == []


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0)
    assert mean_std(np.array([2.0, 4.0, 6.0])) == (4.0, pytest.approx(2.0))
    with pytest.raises(ValueError):
        mean_std([])
