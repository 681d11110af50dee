"""Hand-computed metric cases: the paper's four scores, ignored pixels, absent classes, exclusions, P/R/F1."""
import json
import math

import pytest
import torch

from fcnseg.evaluation.metrics import ConfusionMatrix, absent_classes, format_table, json_safe


def cm_from(target, pred, k=3, ignore_index=255):
    cm = ConfusionMatrix(k, ignore_index=ignore_index)
    cm.update(target=torch.tensor(target), pred=torch.tensor(pred))
    return cm


def test_rows_are_ground_truth_and_ignored_pixels_are_skipped():
    # target 0 predicted 1 twice; target 1 predicted 1 once; two ignored pixels predicted anything
    cm = cm_from([0, 0, 1, 255, 255], [1, 1, 1, 0, 2])
    assert cm.mat.tolist() == [[0, 2, 0], [0, 1, 0], [0, 0, 0]]
    # swapping the roles gives the transpose: the names say which is which
    swapped = cm_from([1, 1, 1], [0, 0, 1])
    assert swapped.mat.tolist() == [[0, 0, 0], [2, 1, 0], [0, 0, 0]]


def test_paper_formulas_on_a_hand_matrix():
    # n[i][j]: ground truth i predicted j
    n = [[5, 1, 0],
         [2, 3, 1],
         [0, 0, 4]]
    cm = ConfusionMatrix(3)
    cm.mat = torch.tensor(n)
    s = cm.compute()
    t = [6, 6, 4]  # pixels per ground-truth class
    col = [7, 4, 5]  # pixels per predicted class
    iu = [5 / (6 + 7 - 5), 3 / (6 + 4 - 3), 4 / (4 + 5 - 4)]
    assert s["pixel_accuracy"] == pytest.approx(12 / 16)
    assert s["mean_accuracy"] == pytest.approx((5 / 6 + 3 / 6 + 4 / 4) / 3)
    assert s["mean_iou"] == pytest.approx(sum(iu) / 3)
    # fw IU = (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)
    assert s["fw_iou"] == pytest.approx((6 * iu[0] + 6 * iu[1] + 4 * iu[2]) / 16)
    prec = [5 / 7, 3 / 4, 4 / 5]
    rec = [5 / 6, 3 / 6, 4 / 4]
    f1 = [2 * p * r / (p + r) for p, r in zip(prec, rec)]
    assert s["precision_macro"] == pytest.approx(sum(prec) / 3)
    assert s["recall_macro"] == pytest.approx(sum(rec) / 3)
    assert s["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert s["f1_weighted"] == pytest.approx(sum(ti * f for ti, f in zip(t, f1)) / 16)
    assert s["recall_weighted"] == pytest.approx(s["pixel_accuracy"])
    assert [r["gt_pixels"] for r in s["per_class"]] == t
    assert [r["pred_pixels"] for r in s["per_class"]] == col
    assert [r["iou"] for r in s["per_class"]] == pytest.approx(iu)
    assert s["confusion_matrix"] == n


def test_class_absent_from_ground_truth_and_prediction_does_not_poison_means():
    # class 2 never occurs and is never predicted
    cm = cm_from([0, 0, 1, 1], [0, 1, 1, 1])
    s = cm.compute()
    assert math.isnan(s["per_class"][2]["iou"]) and math.isnan(s["per_class"][2]["accuracy"])
    assert s["mean_iou"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # over the two defined classes
    assert s["mean_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert absent_classes(cm) == [2]


def test_class_absent_from_ground_truth_but_predicted_counts_as_iou_zero():
    # class 2 has no ground truth but is predicted once: a false alarm, IoU 0, no accuracy
    cm = cm_from([0, 0, 1, 1], [0, 2, 1, 1])
    s = cm.compute()
    assert s["per_class"][2]["iou"] == 0.0
    assert math.isnan(s["per_class"][2]["accuracy"])
    assert s["mean_iou"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert s["mean_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    # a present class that is never predicted has precision 0, not undefined
    cm = cm_from([0, 0, 1, 1], [0, 0, 0, 0])
    assert cm.compute()["per_class"][1]["precision"] == 0.0


def test_exclude_leaves_classes_out_of_the_means_only():
    cm = cm_from([0, 0, 1, 1], [0, 2, 1, 1])
    s = cm.compute(exclude=[2])
    assert s["mean_iou"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["per_class"][2]["excluded"] is True
    assert s["pixel_accuracy"] == pytest.approx(3 / 4)  # pixel-weighted scores are untouched
    with pytest.raises(ValueError):
        cm.compute(exclude=[5])


def test_batches_accumulate_and_merge():
    a = cm_from([[0, 1], [2, 255]], [[0, 1], [1, 0]])
    b = cm_from([2, 2], [2, 2])
    a.merge(b)
    assert a.mat.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 2]]
    a.reset()
    assert int(a.mat.sum()) == 0


def test_out_of_range_labels():
    cm = ConfusionMatrix(3)
    cm.update(target=torch.tensor([7, 0]), pred=torch.tensor([0, 0]))  # targets outside [0, K) are not scored
    assert int(cm.mat.sum()) == 1
    with pytest.raises(ValueError):
        cm.update(target=torch.tensor([0]), pred=torch.tensor([3]))
    with pytest.raises(ValueError):
        cm.update(target=torch.tensor([0, 1]), pred=torch.tensor([0]))


def test_empty_matrix_is_nan_and_json_safe():
    s = ConfusionMatrix(2).compute(class_names=["a", "b"])
    assert math.isnan(s["pixel_accuracy"]) and math.isnan(s["mean_iou"])
    text = json.dumps(json_safe(s))
    assert "NaN" not in text and json.loads(text)["mean_iou"] is None
    assert "mean IU" in format_table(s)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int32, torch.int64])
@pytest.mark.parametrize("ignore_index", [255, 0, -1])
def test_counts_equal_a_pixel_by_pixel_reference(target_dtype, ignore_index):
    # the int32 shortcut and the general path against a plain loop: ignored, out-of-range and negative targets
    gen = torch.Generator().manual_seed(0)
    k = 5
    target = torch.randint(0, k + 2, (4, 9, 11), generator=gen)
    target[0, 0, :4] = 255
    if target_dtype is not torch.uint8:
        target[1, 1, :3] = -1
    pred = torch.randint(0, k, target.shape, generator=gen)
    expected = torch.zeros(k, k, dtype=torch.int64)
    for t, p in zip(target.reshape(-1).tolist(), pred.reshape(-1).tolist()):
        if 0 <= t < k and t != ignore_index:
            expected[t, p] += 1
    target = target.to(target_dtype)
    kept = target.clone()
    cm = ConfusionMatrix(k, ignore_index=ignore_index)
    cm.update(target=target, pred=pred)
    assert torch.equal(cm.mat, expected)
    assert torch.equal(target, kept)  # the caller's tensor is not written to
    cm.update(target=target, pred=pred.to(torch.uint8))  # class ids as a small type count the same
    assert torch.equal(cm.mat, 2 * expected)
