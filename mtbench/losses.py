"""Per-task training losses and their weighted multi-task sum.

The losses are those of MTLoRA's official code (github.com/scale-lab/MTLoRA, ``mtl_loss_schemes.py::get_loss``,
which inherits them from Vandenhende et al., TPAMI 2021 and ASTMT, Maninis et al., CVPR 2019); see also
``/work/shared/reference/mtlora.md`` §1 ("losses"). Written from the definitions, not copied:

============  ==========================================================================================
task          loss
============  ==========================================================================================
semseg        cross-entropy over logits, ignore label 255, mean over valid pixels
human_parts   same as semseg
sal           balanced BCE on logits, HED weighting (positives weighted by the fraction of negatives)
edge          balanced BCE on logits, fixed positive weight 0.95 (negatives 0.05)
normals       L1 between the L2-normalised prediction and the target, mean over valid elements
depth         L1 over valid pixels
============  ==========================================================================================

Differences from the official code, all deliberate:

* Every loss is *zero-safe*: a batch without any valid pixel gives an exact ``0`` that still carries a grad graph
  (the official ``NLLLoss``/``L1Loss`` means return NaN there).
* Pixels labelled 255 are excluded from the balanced BCE (the official ``MultiTaskLoss`` never passes the
  ``void_pixels`` argument, so an ignore label would be counted as a positive; PASCAL saliency has no ignore pixels,
  so on that data the two agree), and the mean is taken over valid pixels instead of all pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtbench.errors import MtbenchError
from mtbench.tasks import IGNORE_INDEX, TaskSpec

__all__ = [
    "SegmentationCELoss",
    "BalancedBCELoss",
    "NormalsL1Loss",
    "DepthL1Loss",
    "build_loss",
    "MultiTaskLoss",
    "EDGE_POS_WEIGHT",
]

#: Weight of the positive (boundary) class in the edge loss (MTLoRA ``get_loss``: ``edge_w`` default 0.95).
EDGE_POS_WEIGHT = 0.95


def _check_spatial(task: str, pred: Tensor, target: Tensor) -> None:
    if pred.dim() != 4:
        raise MtbenchError(f"{task}: prediction must be [B,C,H,W], got shape {tuple(pred.shape)}")
    if target.shape[0] != pred.shape[0] or target.shape[-2:] != pred.shape[-2:]:
        raise MtbenchError(
            f"{task}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in batch or H,W"
        )


def _as_single_channel(task: str, target: Tensor) -> Tensor:
    """``[B,H,W]`` or ``[B,1,H,W]`` -> ``[B,1,H,W]``."""
    if target.dim() == 3:
        return target.unsqueeze(1)
    if target.dim() == 4 and target.shape[1] == 1:
        return target
    raise MtbenchError(f"{task}: target must be [B,1,H,W] or [B,H,W], got shape {tuple(target.shape)}")


class SegmentationCELoss(nn.Module):
    """Pixel-wise cross-entropy with an ignore label, for ``semseg`` and ``human_parts``.

    ``L = sum_{valid p} CE(pred_p, target_p) / max(N_valid, 1)``: the mean over pixels whose label is not
    ``ignore_index``; a batch with no valid pixel gives exactly 0 (graph kept, no NaN).

    Source: MTLoRA ``mtl_loss_schemes.py::SoftMaxwithLoss`` (LogSoftmax + NLLLoss, ignore 255).

    Args:
        task: task name used in error messages.
        ignore_index: label value excluded from the loss.
    """

    def __init__(self, task: str = "semseg", ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.task = task
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Loss of logits ``pred`` [B,C,H,W] against class indices ``target`` [B,H,W] (or [B,1,H,W]).

        Returns:
            scalar tensor (nats per valid pixel).

        Raises:
            MtbenchError: shapes do not match.
        """
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if target.dim() != 3:
            raise MtbenchError(f"{self.task}: target must be [B,H,W], got shape {tuple(target.shape)}")
        _check_spatial(self.task, pred, target)
        target = target.long()
        per_pixel = F.cross_entropy(pred.float(), target, ignore_index=self.ignore_index, reduction="none")
        n_valid = (target != self.ignore_index).sum()
        return per_pixel.sum() / n_valid.clamp(min=1)


class BalancedBCELoss(nn.Module):
    """Class-balanced binary cross-entropy on logits with an ignore label, for ``sal`` and ``edge``.

    With ``y`` the binarised target (``target >= 0.5``), ``x`` the logit and ``V`` the valid pixels
    (``target != ignore_index``)::

        L = (1/|V|) * sum_{p in V} [ w * y_p * (-log sigmoid(x_p)) + (1 - w) * (1 - y_p) * (-log(1 - sigmoid(x_p))) ]

    * ``pos_weight=None`` (saliency; HED weighting, Xie & Tu, ICCV 2015): ``w = N_neg / N_valid`` computed on the
      valid pixels of the whole batch, i.e. the positive class is weighted by the fraction of negatives and the
      negative class by the fraction of positives.
    * ``pos_weight=0.95`` (edge): positives weighted 0.95, negatives 0.05.

    No valid pixel gives exactly 0 (graph kept). ``w`` is computed from labels only and carries no gradient.

    Source: MTLoRA ``mtl_loss_schemes.py::BalancedCrossEntropyLoss`` (``size_average=True``), used for ``sal``
    (``pos_weight=None``) and ``edge`` (``pos_weight=0.95``) in ``get_loss``.

    Args:
        pos_weight: fixed positive-class weight in [0, 1], or None for HED weighting.
        task: task name used in error messages.
        ignore_index: label value excluded from the loss.

    Raises:
        MtbenchError: ``pos_weight`` outside [0, 1].
    """

    def __init__(self, pos_weight: float | None = None, task: str = "sal", ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        if pos_weight is not None and not 0.0 <= pos_weight <= 1.0:
            raise MtbenchError(f"{task}: pos_weight must be in [0, 1] or None, got {pos_weight}")
        self.pos_weight = pos_weight
        self.task = task
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Loss of logits ``pred`` [B,1,H,W] against a 0/1 mask ``target`` [B,1,H,W] (255 = ignore).

        Returns:
            scalar tensor (nats per valid pixel, weighted).

        Raises:
            MtbenchError: shapes do not match or ``pred`` has more than one channel.
        """
        target = _as_single_channel(self.task, target)
        _check_spatial(self.task, pred, target)
        if pred.shape[1] != 1:
            raise MtbenchError(f"{self.task}: prediction must have 1 channel, got {pred.shape[1]}")
        valid = target != self.ignore_index
        x = pred.float()[valid]
        y = (target[valid] >= 0.5).float()
        n_valid = torch.tensor(float(x.numel()), device=pred.device).clamp(min=1.0)
        if self.pos_weight is None:
            w = ((1.0 - y).sum() / n_valid).detach()
        else:
            w = torch.tensor(float(self.pos_weight), device=pred.device)
        # -log sigmoid(x) = softplus(-x); -log(1 - sigmoid(x)) = softplus(x); both stable for large |x|.
        per_pixel = w * y * F.softplus(-x) + (1.0 - w) * (1.0 - y) * F.softplus(x)
        return per_pixel.sum() / n_valid


class NormalsL1Loss(nn.Module):
    """L1 loss between the L2-normalised predicted normal and the target normal, over valid pixels.

    ``pred`` is divided by ``||pred||_2 + 1e-12`` per pixel (as the official ``Normalize``); a pixel is valid when
    no channel of the target equals ``ignore_index`` (invalid pixels are 255 in all three channels). The loss is the
    mean absolute difference over the valid *elements* (3 per valid pixel)::

        L = sum_{valid p} sum_c |n_hat_pc - t_pc| / max(3 * N_valid, 1)

    Zero when the prediction is a positive multiple of a unit target; exactly 0 (graph kept) when no pixel is valid.

    Source: MTLoRA ``mtl_loss_schemes.py::NormalsLoss(normalize=True, size_average=True, norm=1)``, which divides the
    L1 sum by the number of valid elements.

    Args:
        task: task name used in error messages.
        ignore_index: label value marking invalid pixels.
    """

    def __init__(self, task: str = "normals", ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.task = task
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Loss of raw normals ``pred`` [B,3,H,W] against unit normals ``target`` [B,3,H,W].

        Returns:
            scalar tensor (mean absolute component difference, unitless).

        Raises:
            MtbenchError: shapes do not match or either tensor does not have 3 channels.
        """
        _check_spatial(self.task, pred, target)
        if pred.shape[1] != 3 or target.dim() != 4 or target.shape[1] != 3:
            raise MtbenchError(
                f"{self.task}: prediction and target must be [B,3,H,W], got {tuple(pred.shape)}, {tuple(target.shape)}"
            )
        pred = pred.float()
        unit = pred / (torch.linalg.vector_norm(pred, ord=2, dim=1, keepdim=True) + 1e-12)
        valid = (target != self.ignore_index).all(dim=1, keepdim=True).expand_as(target)
        diff = (unit[valid] - target[valid].float()).abs()
        return diff.sum() / max(diff.numel(), 1)


class DepthL1Loss(nn.Module):
    """L1 loss on depth over valid pixels (``target != ignore_index``), in metres.

    ``L = sum_{valid p} |pred_p - target_p| / max(N_valid, 1)``; exactly 0 (graph kept) when no pixel is valid.

    Source: MTLoRA ``mtl_loss_schemes.py::DepthLoss('l1')`` (masked ``nn.L1Loss``).

    Args:
        task: task name used in error messages.
        ignore_index: label value marking invalid pixels.
    """

    def __init__(self, task: str = "depth", ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.task = task
        self.ignore_index = ignore_index

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Loss of depth ``pred`` [B,1,H,W] (metres) against ``target`` [B,1,H,W] (metres, 255 = invalid).

        Returns:
            scalar tensor (metres).

        Raises:
            MtbenchError: shapes do not match or ``pred`` has more than one channel.
        """
        target = _as_single_channel(self.task, target)
        _check_spatial(self.task, pred, target)
        if pred.shape[1] != 1:
            raise MtbenchError(f"{self.task}: prediction must have 1 channel, got {pred.shape[1]}")
        valid = target != self.ignore_index
        diff = (pred.float()[valid] - target[valid].float()).abs()
        return diff.sum() / max(diff.numel(), 1)


def build_loss(task: TaskSpec) -> nn.Module:
    """The training loss of one task (see the module table), a module with ``forward(pred, target) -> scalar``.

    Args:
        task: the task; its :class:`mtbench.tasks.TaskKind` (``task.name``) supplies the loss factory.

    Raises:
        MtbenchError: unknown task name.
    """
    from mtbench.tasks import TASK_KINDS

    if task.name not in TASK_KINDS:
        raise MtbenchError(f"no loss for task {task.name!r}; valid: {', '.join(TASK_KINDS)}")
    return TASK_KINDS[task.name].loss(task)


class MultiTaskLoss(nn.Module):
    """Weighted sum of the per-task losses: ``total = sum_t w_t * L_t`` with ``w_t = task.loss_weight``.

    Source: MTLoRA ``mtl_loss_schemes.py::MultiTaskLoss`` with the weights of ``main.py``
    (:data:`mtbench.tasks.DEFAULT_LOSS_WEIGHTS`).

    Args:
        tasks: the tasks, each with its ``loss_weight``.

    Raises:
        MtbenchError: empty or duplicate task list, or an unknown task.
    """

    def __init__(self, tasks: list[TaskSpec]) -> None:
        super().__init__()
        names = [t.name for t in tasks]
        if not names:
            raise MtbenchError("MultiTaskLoss needs at least one task")
        if len(set(names)) != len(names):
            raise MtbenchError(f"duplicate task in {names}")
        self.task_names = names
        self.weights = {t.name: float(t.loss_weight) for t in tasks}
        self.losses = nn.ModuleDict({t.name: build_loss(t) for t in tasks})

    def forward(self, preds: dict[str, Tensor], targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Total loss and the unweighted per-task losses.

        Args:
            preds: ``{task: prediction [B,C,H,W]}``; extra keys are ignored.
            targets: the batch, ``{task: target}`` (see :data:`mtbench.tasks.SAMPLE_FORMAT`); extra keys such as
                ``image`` and ``meta`` are ignored.

        Returns:
            ``(total, {task: L_t})``: ``total`` a scalar tensor with grad; ``L_t`` the *unweighted* task loss as a
            detached Python float.

        Raises:
            MtbenchError: a task is missing from ``preds`` or ``targets``.
        """
        total: Tensor | None = None
        parts: dict[str, float] = {}
        for name in self.task_names:
            if name not in preds:
                raise MtbenchError(f"prediction for task {name!r} missing; got {sorted(preds)}")
            if name not in targets:
                raise MtbenchError(f"target for task {name!r} missing from the batch; got {sorted(targets)}")
            loss = self.losses[name](preds[name], targets[name])
            parts[name] = float(loss.detach())
            weighted = self.weights[name] * loss
            total = weighted if total is None else total + weighted
        assert total is not None
        return total, parts
