import math

import numpy as np
import pytest

from mmkit.evals.flops import kv_cache_bytes, layer_flops, prefill_tflops
from mmkit.evals.metrics import (box_ap50, box_iou, chair_metrics, mask_iou, mean_std, parse_yes_no, pope_metrics,
                                 vqa_metrics)


@pytest.mark.parametrize("text, parsed", [("Yes.", "yes"), ("no, there is none", "no"), ("NO", "no"),
                                          ("I think yes", "yes"), ("a cup", None), ("", None)])
def test_parse_yes_no(text, parsed):
    assert parse_yes_no(text) == parsed


def test_pope_metrics_by_hand():
    preds = ["yes", "yes", "no", None, "yes", "no"]
    labels = ["yes", "no", "yes", "yes", "yes", "no"]
    m = pope_metrics(preds, labels)
    # tp=2 (0, 4), fp=1 (1), fn=2 (2, 3), correct=3 (0, 4, 5)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["yes_ratio"] == pytest.approx(3 / 6)


def test_chair_metrics_by_hand():
    m = chair_metrics([["cup", "key"], ["tree", "tree"], []], [{"cup"}, {"tree", "house"}, {"fish"}], [4, 6, 2])
    assert m["chair_s"] == pytest.approx(1 / 3)
    assert m["chair_i"] == pytest.approx(1 / 3)     # key out of {cup, key, tree}
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["mean_length"] == pytest.approx(4.0)


def test_vqa_normalisation_and_per_kind():
    m = vqa_metrics(["count", "count", "color", "spatial"], ["two", "3 cups", "Red.", "No, it is not"],
                    ["2", "2", "red", "no"])
    assert m["accuracy/count"] == pytest.approx(0.5)
    assert m["accuracy/color"] == 1.0 and m["accuracy/spatial"] == 1.0
    assert m["accuracy"] == pytest.approx(0.75)


def test_iou_and_ap():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert box_iou((0, 0, 2, 2), (1, 0, 3, 2)) == pytest.approx(2 / 6)
    truths = [[((0, 0, 10, 10), "cup")], [((5, 5, 15, 15), "cup")]]
    perfect = [[((0, 0, 10, 10), 0.9, "cup")], [((5, 5, 15, 15), 0.8, "cup")]]
    assert box_ap50(perfect, truths) == pytest.approx(1.0)
    # A false positive ranked first: precision 1/2 at recall 0.5 and 2/3 at recall 1 -> envelope 2/3 everywhere.
    with_fp = [[((0, 0, 10, 10), 0.5, "cup"), ((50, 50, 60, 60), 0.95, "cup")], [((5, 5, 15, 15), 0.4, "cup")]]
    assert box_ap50(with_fp, truths) == pytest.approx(2 / 3, abs=1e-6)


def test_flops_match_fastv_reference_numbers():
    d, m, n, layers = 4096, 11008, 651, 32
    assert prefill_tflops([n] * layers, d, m, ffn_mats=2) == pytest.approx(3.39, abs=0.01)
    assert prefill_tflops([n] * layers, d, m, ffn_mats=3) == pytest.approx(4.33, abs=0.01)
    pruned = [n] * 2 + [n - 288] * 30
    ratio = prefill_tflops(pruned, d, m, ffn_mats=2) / prefill_tflops([n] * layers, d, m, ffn_mats=2)
    assert ratio == pytest.approx(0.578, abs=0.005)
    assert layer_flops(1, 1, 1, ffn_mats=2) == 4 + 2 + 2
    assert kv_cache_bytes([10, 5], num_kv_heads=2, head_dim=4, bytes_per_el=2) == 2 * 15 * 2 * 4 * 2


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, 0.0)
