"""Value checks of the per-task losses against hand-computed numbers (mtbench.losses)."""

from __future__ import annotations

import math

import pytest
import torch

from mtbench.errors import MtbenchError
from mtbench.losses import (
    BalancedBCELoss,
    DepthL1Loss,
    MultiTaskLoss,
    NormalsL1Loss,
    SegmentationCELoss,
    build_loss,
)
from mtbench.tasks import TaskSpec, resolve_tasks


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def spec(name: str, channels: int = 1, weight: float = 1.0) -> TaskSpec:
    return TaskSpec(name, channels, weight)


# ---------------------------------------------------------------- cross-entropy


def test_ce_ignores_255_and_matches_hand_value():
    # three pixels in a 1x3 image, 2 classes: A logits (0,0) label 0 -> ln2; B (ln3,0) label 1 -> ln4; C ignored
    pred = torch.tensor([[0.0, math.log(3.0), 50.0], [0.0, 0.0, -50.0]]).reshape(1, 2, 1, 3).requires_grad_()
    target = torch.tensor([[[0, 1, 255]]])
    loss = SegmentationCELoss()(pred, target)
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[..., 2] == 0)  # the ignored pixel gets no gradient


def test_ce_accepts_channel_dim_target():
    pred = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    a = SegmentationCELoss()(pred, target)
    b = SegmentationCELoss()(pred, target[:, None])
    assert a.item() == pytest.approx(b.item())
    assert a.item() == pytest.approx(torch.nn.functional.cross_entropy(pred, target).item(), rel=1e-6)


def test_ce_all_ignore_gives_zero_with_graph():
    pred = torch.randn(2, 4, 3, 3, requires_grad=True)
    target = torch.full((2, 3, 3), 255)
    loss = SegmentationCELoss()(pred, target)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.isfinite(pred.grad).all() and torch.all(pred.grad == 0)


def test_ce_shape_mismatch_raises():
    with pytest.raises(MtbenchError, match="semseg"):
        SegmentationCELoss()(torch.randn(1, 3, 4, 4), torch.zeros(1, 5, 5, dtype=torch.long))


# ---------------------------------------------------------------- balanced BCE

X = [2.0, -1.0, 0.0, 3.0, 100.0]  # logits; the last pixel is ignored
Y = [1.0, 0.0, 0.0, 0.0, 255.0]


def _bce_inputs():
    pred = torch.tensor(X).reshape(1, 1, 1, 5).requires_grad_()
    target = torch.tensor(Y).reshape(1, 1, 1, 5)
    return pred, target


def test_sal_balanced_bce_hed_weights_by_hand():
    pred, target = _bce_inputs()
    # valid pixels: 1 positive, 3 negatives -> w_pos = 3/4, w_neg = 1/4; mean over the 4 valid pixels
    w = 0.75
    expected = (w * softplus(-2.0) + (1 - w) * (softplus(-1.0) + softplus(0.0) + softplus(3.0))) / 4
    loss = BalancedBCELoss(pos_weight=None)(pred, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[0, 0, 0, 4] == 0


def test_edge_balanced_bce_pos_weight_095_by_hand():
    pred, target = _bce_inputs()
    w = 0.95
    expected = (w * softplus(-2.0) + (1 - w) * (softplus(-1.0) + softplus(0.0) + softplus(3.0))) / 4
    loss = build_loss(spec("edge"))(pred, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_balanced_bce_target_without_channel_dim():
    pred, target = _bce_inputs()
    a = build_loss(spec("sal"))(pred, target)
    b = build_loss(spec("sal"))(pred, target[:, 0])
    assert a.item() == pytest.approx(b.item())


def test_balanced_bce_all_ignore_and_extreme_logits_are_finite():
    pred = torch.full((2, 1, 3, 3), 1e4, requires_grad=True)
    target = torch.full((2, 1, 3, 3), 255.0)
    for name in ("sal", "edge"):
        loss = build_loss(spec(name))(pred, target)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.isfinite(pred.grad).all()
    # extreme logits with valid labels stay finite too
    pred = torch.tensor([1e4, -1e4, 1e4, -1e4]).reshape(1, 1, 2, 2).requires_grad_()
    target = torch.tensor([0.0, 1.0, 1.0, 0.0]).reshape(1, 1, 2, 2)
    loss = build_loss(spec("sal"))(pred, target)
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_balanced_bce_rejects_bad_pos_weight():
    with pytest.raises(MtbenchError):
        BalancedBCELoss(pos_weight=1.5)


# ---------------------------------------------------------------- normals


def test_normals_l1_zero_when_pred_proportional_to_target():
    target = torch.nn.functional.normalize(torch.randn(2, 3, 4, 4), dim=1)
    target[0, :, 0, 0] = 255.0
    pred = 3.7 * target
    pred[0, :, 0, 0] = torch.tensor([1.0, -2.0, 3.0])  # invalid pixel: anything goes
    loss = NormalsL1Loss()(pred, target)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_normals_l1_by_hand_with_invalid_pixel():
    # pixel 0: pred (0,2,0) -> (0,1,0) vs target (1,0,0): |0-1| + |1-0| + 0 = 2
    # pixel 1: pred (0,0,5) -> (0,0,1) vs target (0,0,1): 0
    # pixel 2: invalid (255) -> excluded; mean over 2 valid pixels * 3 channels = 6 elements
    pred = torch.tensor([[0.0, 0.0, 9.0], [2.0, 0.0, 9.0], [0.0, 5.0, 9.0]]).reshape(1, 3, 1, 3)
    target = torch.tensor([[1.0, 0.0, 255.0], [0.0, 0.0, 255.0], [0.0, 1.0, 255.0]]).reshape(1, 3, 1, 3)
    pred.requires_grad_()
    loss = build_loss(spec("normals", 3))(pred, target)
    assert loss.item() == pytest.approx(2.0 / 6.0, rel=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[..., 2] == 0)


def test_normals_all_invalid_and_zero_prediction_are_finite():
    pred = torch.zeros(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 3, 2, 2), 255.0)
    loss = NormalsL1Loss()(pred, target)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    # a zero prediction on valid pixels: finite loss and gradient
    pred = torch.zeros(1, 3, 2, 2, requires_grad=True)
    target = torch.zeros(1, 3, 2, 2)
    target[:, 2] = 1.0
    loss = NormalsL1Loss()(pred, target)
    assert loss.item() == pytest.approx(1.0 / 3.0, rel=1e-5)
    loss.backward()
    assert torch.isfinite(pred.grad).all()


# ---------------------------------------------------------------- depth


def test_depth_l1_by_hand():
    pred = torch.tensor([1.0, 2.0, 3.0, -4.0]).reshape(1, 1, 2, 2).requires_grad_()
    target = torch.tensor([2.0, 255.0, 5.0, 1.0]).reshape(1, 1, 2, 2)
    loss = DepthL1Loss()(pred, target)
    assert loss.item() == pytest.approx((1.0 + 2.0 + 5.0) / 3.0, rel=1e-6)
    loss.backward()
    assert pred.grad[0, 0, 0, 1] == 0
    assert torch.isfinite(pred.grad).all()


def test_depth_all_invalid_gives_zero():
    pred = torch.randn(1, 1, 3, 3, requires_grad=True)
    loss = DepthL1Loss()(pred, torch.full((1, 1, 3, 3), 255.0))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(pred.grad == 0)


# ---------------------------------------------------------------- factory and multi-task sum


def test_build_loss_unknown_task():
    with pytest.raises(MtbenchError, match="flow"):
        build_loss(spec("flow"))


def _random_batch(tasks, b=2, h=6, w=5):
    g = torch.Generator().manual_seed(0)
    preds, batch = {}, {}
    for t in tasks:
        preds[t.name] = torch.randn(b, t.out_channels, h, w, generator=g, requires_grad=True)
        if t.name in ("semseg", "human_parts"):
            y = torch.randint(0, t.out_channels, (b, h, w), generator=g)
            y[0, 0, :] = 255
        elif t.name in ("sal", "edge"):
            y = (torch.rand(b, 1, h, w, generator=g) > 0.7).float()
            y[0, 0, 0, :] = 255
        elif t.name == "normals":
            y = torch.nn.functional.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
            y[0, :, 0, :] = 255
        else:  # depth
            y = torch.rand(b, 1, h, w, generator=g) * 10
            y[0, 0, 0, :] = 255
        batch[t.name] = y
    return preds, batch


def test_multitask_loss_is_weighted_sum_and_grads_finite():
    tasks = resolve_tasks("pascal_context")  # semseg, human_parts, sal, normals with weights 1, 2, 5, 10
    mtl = MultiTaskLoss(tasks)
    preds, batch = _random_batch(tasks)
    batch["image"] = torch.zeros(2, 3, 6, 5)
    total, parts = mtl(preds, batch)
    assert set(parts) == {t.name for t in tasks}
    assert all(isinstance(v, float) for v in parts.values())
    # by hand, not through the task specs' factories: which loss each task gets (saliency's BCE is balanced by its
    # own positives, the edge weight is for edges only), MTLoRA's weights, and parts unweighted
    by_hand = {"semseg": SegmentationCELoss(), "human_parts": SegmentationCELoss(),
               "sal": BalancedBCELoss(pos_weight=None), "normals": NormalsL1Loss()}
    unweighted = {n: fn(preds[n], batch[n]).item() for n, fn in by_hand.items()}
    assert parts == pytest.approx(unweighted, rel=1e-6)
    weights = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0}
    assert total.item() == pytest.approx(sum(weights[n] * unweighted[n] for n in weights), rel=1e-6)
    total.backward()
    for t in tasks:
        assert torch.isfinite(preds[t.name].grad).all()


def test_multitask_loss_all_tasks_including_depth_edge():
    tasks = [spec("semseg", 4), spec("human_parts", 3, 2.0), spec("sal", 1, 5.0), spec("normals", 3, 10.0),
             spec("depth", 1), spec("edge", 1, 50.0)]
    preds, batch = _random_batch(tasks)
    total, parts = MultiTaskLoss(tasks)(preds, batch)
    assert math.isfinite(total.item()) and set(parts) == {t.name for t in tasks}


def test_multitask_loss_missing_task_raises():
    tasks = resolve_tasks("pascal_context")
    preds, batch = _random_batch(tasks)
    del preds["sal"]
    with pytest.raises(MtbenchError, match="sal"):
        MultiTaskLoss(tasks)(preds, batch)
