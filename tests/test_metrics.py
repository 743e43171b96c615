"""Metric values against hand-computed numbers (mtbench.metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from mtbench.datasets import get_dataset
from mtbench.errors import MtbenchError
from mtbench.metrics import (
    DepthMetric,
    EdgeMetric,
    MultiTaskMetrics,
    NormalsMetric,
    SaliencyMetric,
    SegmentationMetric,
    build_metric,
    delta_m,
    primary_higher_is_better,
    primary_metrics,
)
from mtbench.tasks import TaskSpec, resolve_tasks


def logits_from_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B,H,W] labels -> [B,C,H,W] logits whose argmax is the label."""
    return 5.0 * torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


# ---------------------------------------------------------------- segmentation


def test_segmentation_miou_by_hand_with_ignore_and_absent_class():
    gt = torch.tensor([[[0, 0, 1], [1, 255, 0]]])
    pred_lbl = torch.tensor([[[0, 1, 1], [1, 0, 0]]])  # the ignored pixel's prediction must not count
    m = SegmentationMetric(3)
    m.update(logits_from_labels(pred_lbl, 3), gt)
    # confusion (rows gt, cols pred): gt0 -> p0:2, p1:1; gt1 -> p1:2; class 2 never seen nor predicted
    assert m.confusion.tolist() == [[2, 1, 0], [0, 2, 0], [0, 0, 0]]
    out = m.compute()
    # IoU0 = 2/(2+0+1), IoU1 = 2/(2+1+0), IoU2 = 0 (counts in mIoU, excluded from mIoU_present)
    assert out["mIoU"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)
    assert out["mIoU_present"] == pytest.approx(100 * 2 / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 4 / 5)
    iou = m.per_class_iou()
    assert iou["class_2"] == 0.0 and iou["class_0"] == pytest.approx(200 / 3)


def test_segmentation_accumulates_over_split_not_per_batch():
    gt_a = torch.zeros(1, 2, 3, dtype=torch.long)
    pred_a = torch.zeros(1, 2, 3, dtype=torch.long)
    pred_a[0, 0, 0] = 1  # one false positive for class 1
    gt_b = torch.ones(1, 2, 3, dtype=torch.long)
    pred_b = torch.ones(1, 2, 3, dtype=torch.long)

    two = SegmentationMetric(3)
    two.update(logits_from_labels(pred_a, 3), gt_a)
    two.update(logits_from_labels(pred_b, 3), gt_b)
    one = SegmentationMetric(3)
    one.update(logits_from_labels(torch.cat([pred_a, pred_b]), 3), torch.cat([gt_a, gt_b]))
    assert two.compute() == one.compute()

    # pooled: IoU0 = 5/6, IoU1 = 6/7, IoU2 = 0
    out = two.compute()
    assert out["mIoU_present"] == pytest.approx(100 * (5 / 6 + 6 / 7) / 2)
    assert out["mIoU"] == pytest.approx(100 * (5 / 6 + 6 / 7) / 3)
    # the average of per-batch values would be different: batch A (5/6 + 0)/2, batch B 1/1
    per_batch = [SegmentationMetric(3), SegmentationMetric(3)]
    per_batch[0].update(logits_from_labels(pred_a, 3), gt_a)
    per_batch[1].update(logits_from_labels(pred_b, 3), gt_b)
    avg = sum(p.compute()["mIoU_present"] for p in per_batch) / 2
    assert avg == pytest.approx(100 * ((5 / 6) / 2 + 1) / 2)
    assert abs(avg - out["mIoU_present"]) > 10


def test_segmentation_reset_and_empty_and_errors():
    m = SegmentationMetric(3)
    assert math.isnan(m.compute()["mIoU"])
    m.update(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 255))  # all ignored
    assert math.isnan(m.compute()["pixel_acc"])
    m.update(logits_from_labels(torch.zeros(1, 2, 2, dtype=torch.long), 3), torch.zeros(1, 1, 2, 2, dtype=torch.long))
    assert m.compute()["pixel_acc"] == 100.0
    m.reset()
    assert int(m.confusion.sum()) == 0
    with pytest.raises(MtbenchError, match="labels"):
        m.update(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 7))
    with pytest.raises(MtbenchError, match="channel"):
        m.update(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(MtbenchError, match="resolution"):
        m.update(torch.randn(1, 3, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long))


# ---------------------------------------------------------------- saliency

L = 10.0  # logit far from every threshold: sigmoid(10) ~ 0.99995, sigmoid(-10) ~ 0.00005


def _sal_batch():
    # image 1: gt [[1,1],[0,0]], pred [[1,0],[1,0]]: TP1 FP1 FN1 -> J 1/3, P 1/2, R 1/2
    # image 2: gt empty, pred empty -> J 1 (both empty), P 0, R 0
    # image 3: gt [[1,255],[0,0]], pred [[1,1],[0,0]], ignored pixel excluded: TP1 -> J 1, P 1, R 1
    gt = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 255.0], [0.0, 0.0]]])[:, None]
    pred = torch.tensor([[[L, -L], [L, -L]], [[-L, -L], [-L, -L]], [[L, L], [-L, -L]]])[:, None]
    return pred, gt


def test_saliency_miou_maxf_by_hand_at_one_threshold():
    pred, gt = _sal_batch()
    m = SaliencyMetric(thresholds=(0.5,))
    m.update(pred, gt)
    out = m.compute()
    assert out["mIoU"] == pytest.approx(100 * (1 / 3 + 1 + 1) / 3)
    p = r = (0.5 + 0 + 1) / 3
    assert out["maxF"] == pytest.approx(100 * 2 * p * r / (p + r))


def test_saliency_default_thresholds_and_per_image_accumulation():
    pred, gt = _sal_batch()
    m = build_metric(TaskSpec("sal", 1, 5.0))
    for i in range(3):  # one image per batch: same as all at once (averaged over images, not batches)
        m.update(pred[i : i + 1], gt[i : i + 1])
    out = m.compute()
    assert out["mIoU"] == pytest.approx(100 * 7 / 9)
    assert out["maxF"] == pytest.approx(50.0)
    m2 = SaliencyMetric()
    m2.update(pred[:2], gt[:2])
    m2.update(pred[2:], gt[2:])
    assert m2.compute() == pytest.approx(out)


def test_saliency_max_over_thresholds():
    # gt [1,1,0,0], probs [0.95, 0.6, 0.4, 0.1]
    probs = torch.tensor([0.95, 0.6, 0.4, 0.1])
    pred = torch.log(probs / (1 - probs)).reshape(1, 1, 2, 2)
    gt = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    # tau 0.3: pred [1,1,1,0] J 2/3 P 2/3 R 1 F 0.8; tau 0.5: exact, J 1 F 1; tau 0.7: [1,0,0,0] J 1/2 F 2/3
    # maxF_beta uses its own fixed thresholds 0.05..0.95: any tau in (0.4, 0.6] separates exactly -> 100
    m = SaliencyMetric(thresholds=(0.3, 0.7))
    m.update(pred, gt)
    assert m.compute() == pytest.approx({"mIoU": 100 * 2 / 3, "maxF": 80.0, "maxF_beta": 100.0})
    m = SaliencyMetric(thresholds=(0.3, 0.5, 0.7))
    m.update(pred, gt)
    assert m.compute() == pytest.approx({"mIoU": 100.0, "maxF": 100.0, "maxF_beta": 100.0})


def test_saliency_beta_maxf_pooled_by_hand():
    # image 1: probs [0.92, 0.37], gt [1, 1]; image 2: probs [0.63, 0.12], gt [0, 0] (2 positives in the split)
    # tau 0.05-0.10: all 4 predicted, TP 2: P 1/2, R 1 -> F = 1.3 * 0.5 / (0.15 + 1)   = 0.5652
    # tau 0.15-0.35: 0.92, 0.37, 0.63,  TP 2: P 2/3, R 1 -> F = 1.3 * 2/3 / (0.2 + 1)  = 0.7222
    # tau 0.40-0.60: 0.92, 0.63,        TP 1: P 1/2, R 1/2 -> F = 1.3 * 0.25 / 0.65    = 0.5
    # tau 0.65-0.90: 0.92,              TP 1: P 1, R 1/2 -> F = 1.3 * 0.5 / (0.3 + 0.5) = 0.8125  <- max
    # (with beta^2 = 1 the max would be 0.8 at tau 0.15: beta^2 = 0.3 weighs precision more)
    probs = torch.tensor([[0.92, 0.37], [0.63, 0.12]], dtype=torch.float64)
    pred = torch.log(probs / (1 - probs)).reshape(2, 1, 1, 2)
    gt = torch.tensor([[1.0, 1.0], [0.0, 0.0]]).reshape(2, 1, 1, 2)
    m = SaliencyMetric()
    m.update(pred[:1], gt[:1])
    m.update(pred[1:], gt[1:])  # pooled over the split: same as one batch
    assert m.compute()["maxF_beta"] == pytest.approx(81.25)
    m2 = SaliencyMetric()
    m2.update(pred, gt)
    assert m2.compute()["maxF_beta"] == pytest.approx(81.25)


def test_saliency_empty_mask_conventions():
    gt = torch.zeros(1, 1, 2, 2)
    m = SaliencyMetric(thresholds=(0.5,))
    m.update(torch.full((1, 1, 2, 2), -L), gt)  # both empty: J = 1, but P = R = 0
    assert m.compute() == pytest.approx({"mIoU": 100.0, "maxF": 0.0, "maxF_beta": 0.0})
    m.reset()
    m.update(torch.full((1, 1, 2, 2), L), gt)  # empty gt, full prediction: J = 0
    assert m.compute() == pytest.approx({"mIoU": 0.0, "maxF": 0.0, "maxF_beta": 0.0})
    m.reset()
    assert math.isnan(m.compute()["mIoU"])


# ---------------------------------------------------------------- normals


def test_normals_angles_by_hand():
    # 2x2 image: pixel errors 0 deg, 90 deg, 45 deg and one invalid pixel
    target = torch.tensor(
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [255.0, 255.0, 255.0]]
    ).T.reshape(1, 3, 2, 2)
    pred = torch.tensor([[0.0, 0.0, 5.0], [0.0, 2.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 2, 2)
    m = NormalsMetric()
    m.update(pred, target)
    out = m.compute()
    assert m.n == 3
    assert out["mErr"] == pytest.approx(45.0, abs=1e-4)
    assert out["rmse"] == pytest.approx(math.sqrt((0 + 90**2 + 45**2) / 3), abs=1e-4)
    assert out["rmse"] > out["mErr"]
    assert out["median"] == pytest.approx(45.0, abs=2e-3)
    for k in ("11.25", "22.5", "30"):
        assert out[k] == pytest.approx(100 / 3)


def test_normals_pooled_over_pixels_and_exact_cases():
    target = torch.zeros(1, 3, 1, 4)
    target[:, 2] = 1.0
    pred = target.clone()
    pred[0, :, 0, 0] = torch.tensor([0.0, 0.0, -1.0])  # 180 deg
    m = NormalsMetric()
    m.update(pred[..., :1], target[..., :1])  # batch 1: one pixel, 180 deg
    m.update(pred[..., 1:], target[..., 1:])  # batch 2: three pixels, 0 deg
    out = m.compute()
    assert out["mErr"] == pytest.approx(45.0, abs=1e-4)  # pooled (180+0+0+0)/4, not the batch mean 90
    assert out["rmse"] == pytest.approx(90.0, abs=1e-4)
    assert out["median"] == pytest.approx(0.0, abs=2e-3)
    assert out["11.25"] == pytest.approx(75.0)
    m.reset()
    m.update(torch.randn(1, 3, 2, 2), torch.full((1, 3, 2, 2), 255.0))
    assert math.isnan(m.compute()["mErr"])


# ---------------------------------------------------------------- depth


def test_depth_by_hand_with_invalid_pixels():
    target = torch.tensor([2.0, 255.0, 4.0, 1.0]).reshape(1, 1, 2, 2)
    pred = torch.tensor([1.0, 100.0, 4.0, 3.0]).reshape(1, 1, 2, 2)
    m = DepthMetric()
    m.update(pred, target)
    out = m.compute()
    assert out["rmse"] == pytest.approx(math.sqrt((1 + 0 + 4) / 3))
    assert out["abs_rel"] == pytest.approx((1 / 2 + 0 + 2 / 1) / 3)
    assert out["log_rmse"] == pytest.approx(math.sqrt((math.log(2) ** 2 + 0 + math.log(3) ** 2) / 3))


def test_depth_pooled_and_nonpositive_prediction():
    m = DepthMetric()
    m.update(torch.tensor([[[[3.0]]]]), torch.tensor([[[[1.0]]]]))  # err 2
    m.update(torch.tensor([[[[1.0, 1.0, 1.0]]]]), torch.tensor([[[[1.0, 1.0, 1.0]]]]))  # err 0
    assert m.compute()["rmse"] == pytest.approx(math.sqrt(4 / 4))  # pooled, not mean of per-batch (2+0)/2
    m.reset()
    m.update(torch.tensor([[[[-1.0]]]]), torch.tensor([[[[1.0]]]]))
    out = m.compute()
    # MTLoRA's DepthMeter clamps the prediction to 1e-9 before both errors: |1 - 1e-9|, not |1 - (-1)| = 2
    assert out["rmse"] == pytest.approx(1.0 - 1e-9, abs=1e-12)
    assert out["log_rmse"] == pytest.approx(abs(math.log(1e-9)))


def test_depth_clamp_by_hand_two_pixels():
    # valid pixels: gt 2 with pred -0.5 (-> 1e-9) and gt 4 with pred 3; the 255 pixel is ignored
    m = DepthMetric()
    m.update(torch.tensor([-0.5, 3.0, 7.0]).reshape(1, 1, 1, 3), torch.tensor([2.0, 4.0, 255.0]).reshape(1, 1, 1, 3))
    out = m.compute()
    assert out["rmse"] == pytest.approx(math.sqrt(((2 - 1e-9) ** 2 + 1) / 2))
    assert out["log_rmse"] == pytest.approx(math.sqrt(((math.log(2) - math.log(1e-9)) ** 2
                                                       + (math.log(4) - math.log(3)) ** 2) / 2))
    m.reset()
    assert math.isnan(m.compute()["rmse"])


# ---------------------------------------------------------------- edge


def test_edge_pixel_pooled_maxf_and_loss():
    m = EdgeMetric(thresholds=(0.5,))
    m.update(torch.tensor([L, L, -L, -L, L]).reshape(1, 1, 1, 5), torch.tensor([1.0, 0, 1, 0, 255]).reshape(1, 1, 1, 5))
    assert m.compute()["pixel_maxF"] == pytest.approx(50.0)  # TP1 FP1 FN1
    m.update(torch.tensor([L, L]).reshape(1, 1, 1, 2), torch.tensor([1.0, 1.0]).reshape(1, 1, 1, 2))
    out = m.compute()
    assert out["pixel_maxF"] == pytest.approx(75.0)  # pooled TP3 FP1 FN1
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected_loss = (0.95 * (sp(-L) + sp(L) + 2 * sp(-L)) + 0.05 * (sp(L) + sp(-L))) / 6
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-6)
    d = build_metric(TaskSpec("edge", 1, 50.0))
    d.update(torch.tensor([L, -L]).reshape(1, 1, 1, 2), torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2))
    assert d.compute()["pixel_maxF"] == pytest.approx(100.0)


# ---------------------------------------------------------------- multi-task wrapper


def test_multitask_metrics_update_compute_reset():
    tasks = resolve_tasks("pascal_context")
    mm = MultiTaskMetrics(tasks)
    b, h, w = 2, 4, 4
    preds = {t.name: torch.randn(b, t.out_channels, h, w) for t in tasks}
    batch = {
        "image": torch.zeros(b, 3, h, w),
        "semseg": torch.randint(0, 21, (b, h, w)),
        "human_parts": torch.randint(0, 7, (b, h, w)),
        "sal": (torch.rand(b, 1, h, w) > 0.5).float(),
        "normals": torch.nn.functional.normalize(torch.randn(b, 3, h, w), dim=1),
    }
    mm.update(preds, batch)
    res = mm.compute()
    assert set(res) == {"semseg", "human_parts", "sal", "normals"}
    prim = primary_metrics(res, tasks)
    assert prim["normals"] == res["normals"]["mErr"] and prim["sal"] == res["sal"]["mIoU"]
    mm.reset()
    assert math.isnan(mm.compute()["semseg"]["mIoU"])
    del batch["sal"]
    with pytest.raises(MtbenchError, match="sal"):
        mm.update(preds, batch)


# ---------------------------------------------------------------- delta_m


def test_delta_m_worked_example():
    st = get_dataset("pascal_context").references
    mt = {"semseg": 68.38, "human_parts": 59.58, "sal": 63.85, "normals": 16.76}
    hib = primary_higher_is_better(mt)
    assert hib == {"semseg": True, "human_parts": True, "sal": True, "normals": False}
    assert round(delta_m(mt, st, hib), 2) == 1.77


def test_delta_m_signs():
    hib = {"a": True, "b": False}
    assert delta_m({"a": 110.0}, {"a": 100.0}, hib) == pytest.approx(10.0)
    assert delta_m({"b": 90.0}, {"b": 100.0}, hib) == pytest.approx(10.0)  # lower error is an improvement
    assert delta_m({"b": 110.0}, {"b": 100.0}, hib) == pytest.approx(-10.0)
    assert delta_m({"a": 110.0, "b": 110.0}, {"a": 100.0, "b": 100.0}, hib) == pytest.approx(0.0)
    # equal to the reference: zero; T counts only the tasks of mt (extra references are ignored)
    assert delta_m({"a": 100.0}, {"a": 100.0, "b": 5.0}, hib) == 0.0


def test_delta_m_errors():
    hib = {"semseg": True, "depth": False}
    with pytest.raises(MtbenchError, match="depth"):
        delta_m({"semseg": 60.0, "depth": 0.6}, {"semseg": 67.21}, hib)
    with pytest.raises(MtbenchError, match="depth"):
        delta_m({"depth": 0.6}, {"depth": 0.0}, hib)
    with pytest.raises(MtbenchError, match="sal"):
        delta_m({"sal": 60.0}, {"sal": 62.35}, hib)
    with pytest.raises(MtbenchError):
        delta_m({}, {"semseg": 67.21}, hib)


def test_primary_metrics_missing_raises():
    with pytest.raises(MtbenchError, match="mErr"):
        primary_metrics({"normals": {"rmse": 20.0}}, ["normals"])
