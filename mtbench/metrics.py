"""Evaluation metrics for the dense tasks, accumulated over a whole split, plus the multi-task score Δm.

Every metric keeps running sums (confusion matrix, per-threshold counts, error histograms) across ``update`` calls
and derives its numbers in ``compute``; nothing is averaged per batch, so the result does not depend on how the
split is batched.

The definitions follow MTLoRA's official evaluation code (github.com/scale-lab/MTLoRA, ``evaluation/``; summarised
in ``/work/shared/reference/mtlora.md`` §4), written from the definitions, not copied. Where we deviate it is said
in the class docstring. Metrics are computed on whatever resolution the targets have (MTLoRA evaluates on the
448x448-resized ground truth).

=============  =====================================================  ==========================================
task           keys returned by ``compute``                            units
=============  =====================================================  ==========================================
semseg         ``mIoU``, ``mIoU_present``, ``pixel_acc``               percent
human_parts    same as semseg                                          percent
sal            ``mIoU``, ``maxF``, ``maxF_beta`` (β² = 0.3, pooled)    percent
normals        ``mErr``, ``rmse``, ``median``, ``11.25``, ``22.5``,    degrees; the last three percent of pixels
               ``30``
depth          ``rmse``, ``log_rmse``, ``abs_rel``                     metres; log-metres; ratio
edge           ``pixel_maxF`` (pixel-exact proxy, percent), ``loss``    see :class:`EdgeMetric`
=============  =====================================================  ==========================================

When no valid pixel was seen, ``compute`` returns NaN for every key.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mtbench.errors import MtbenchError
from mtbench.losses import EDGE_POS_WEIGHT
from mtbench.tasks import IGNORE_INDEX, TASK_KINDS, TaskSpec

__all__ = [
    "TaskMetric",
    "SegmentationMetric",
    "SaliencyMetric",
    "NormalsMetric",
    "DepthMetric",
    "EdgeMetric",
    "build_metric",
    "MultiTaskMetrics",
    "delta_m",
    "primary_metrics",
    "primary_higher_is_better",
    "SAL_THRESHOLDS",
    "EDGE_THRESHOLDS",
]

#: Saliency binarisation thresholds on sigmoid probabilities (MTLoRA ``eval_sal_no_beta.py``: linspace(0.2,0.9,15)).
SAL_THRESHOLDS = tuple(float(v) for v in torch.linspace(0.2, 0.9, 15, dtype=torch.float64))
#: Edge binarisation thresholds on sigmoid probabilities for the proxy F-measure.
EDGE_THRESHOLDS = tuple(float(v) for v in torch.linspace(0.05, 0.95, 19, dtype=torch.float64))

_NAN = float("nan")
#: Depth predictions are clamped to this many metres before every depth error (MTLoRA ``eval_depth.py``).
DEPTH_MIN = 1e-9
#: Thresholds and β² of the saliency F-measure pooled over the split (MTLoRA ``eval_sal_beta.py``:
#: ``arange(0.05, 1, 0.05)``, β² = 0.3).
SAL_BETA_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
SAL_BETA_SQUARED = 0.3


def _check_pred(task: str, pred: Tensor, target: Tensor, channels: int | None) -> None:
    if pred.dim() != 4:
        raise MtbenchError(f"{task}: prediction must be [B,C,H,W], got shape {tuple(pred.shape)}")
    if channels is not None and pred.shape[1] != channels:
        raise MtbenchError(f"{task}: prediction must have {channels} channel(s), got {pred.shape[1]}")
    if target.shape[0] != pred.shape[0] or target.shape[-2:] != pred.shape[-2:]:
        raise MtbenchError(
            f"{task}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in batch or H,W; "
            "predictions must be at the target's resolution"
        )


def _single_channel(task: str, target: Tensor) -> Tensor:
    """``[B,H,W]`` or ``[B,1,H,W]`` -> ``[B,1,H,W]``."""
    if target.dim() == 3:
        return target.unsqueeze(1)
    if target.dim() == 4 and target.shape[1] == 1:
        return target
    raise MtbenchError(f"{task}: target must be [B,1,H,W] or [B,H,W], got shape {tuple(target.shape)}")


class TaskMetric(abc.ABC):
    """A metric accumulated over a whole split.

    ``update`` may be called any number of times (one batch each); ``compute`` derives the numbers from everything
    seen since the last ``reset`` and does not change the state. Predictions are the raw model outputs
    ``[B,C,H,W]`` at the target's resolution; targets are batched as in :data:`mtbench.tasks.SAMPLE_FORMAT`.
    Accumulators live on the CPU; per-batch reductions run on the prediction's device.
    """

    task: str = ""

    @abc.abstractmethod
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch. Raises :class:`MtbenchError` on a shape mismatch."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """The metric values over everything seen so far, ``{name: value}`` (NaN if nothing valid was seen)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything seen."""


class SegmentationMetric(TaskMetric):
    """Confusion-matrix IoU for ``semseg`` and ``human_parts``.

    A ``C x C`` confusion matrix (rows ground truth, columns prediction = argmax of the logits) is accumulated over
    the whole split with ``torch.bincount``, skipping pixels labelled ``ignore_index``. Per class
    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``. ``compute`` returns, in percent:

    * ``mIoU``: the mean of ``IoU_c`` over **all** ``C`` classes of the task, a class that never occurs in either
      the ground truth or the prediction counting as IoU 0. This is what MTLoRA's official code does
      (``evaluation/eval_semseg.py``, ``eval_human_parts.py``: ``TP / max(TP+FP+FN, 1e-8)`` averaged over 21 / 7
      classes), so it is the number comparable with the papers' tables.
    * ``mIoU_present``: the mean over the classes with ``TP+FP+FN > 0`` only (the usual definition elsewhere; it
      differs from ``mIoU`` on small splits, e.g. the synthetic data or a subset).
    * ``pixel_acc``: ``sum_c TP_c / N_valid``.

    Args:
        num_classes: ``C``, the number of output channels.
        class_names: optional names for :meth:`per_class_iou`.
        task: task name used in error messages.
        ignore_index: label value excluded from the counts.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Iterable[str] = (),
        task: str = "semseg",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if num_classes < 1:
            raise MtbenchError(f"{task}: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        names = tuple(class_names)
        self.class_names = names if len(names) == num_classes else tuple(f"class_{i}" for i in range(num_classes))
        self.task = task
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Zero the confusion matrix."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` logits [B,C,H,W], ``target`` class indices [B,H,W] (or [B,1,H,W]), 255 = ignore.

        Raises:
            MtbenchError: shape mismatch, or a target label outside ``[0, C)`` that is not ``ignore_index``.
        """
        if target.dim() == 4 and target.shape[1] == 1:
            target = target[:, 0]
        if target.dim() != 3:
            raise MtbenchError(f"{self.task}: target must be [B,H,W], got shape {tuple(target.shape)}")
        _check_pred(self.task, pred, target, self.num_classes)
        target = target.to(pred.device).long()
        labels = pred.argmax(dim=1)
        valid = target != self.ignore_index
        gt = target[valid]
        if gt.numel() and (int(gt.min()) < 0 or int(gt.max()) >= self.num_classes):
            raise MtbenchError(
                f"{self.task}: target labels must be in [0, {self.num_classes}) or {self.ignore_index}, "
                f"got values in [{int(gt.min())}, {int(gt.max())}]"
            )
        idx = gt * self.num_classes + labels[valid]
        counts = torch.bincount(idx, minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes).cpu()

    def _iou(self) -> tuple[Tensor, Tensor]:
        conf = self.confusion.double()
        tp = conf.diag()
        denom = conf.sum(0) + conf.sum(1) - tp  # TP + FP + FN
        iou = torch.where(denom > 0, tp / denom.clamp(min=1), torch.zeros_like(tp))
        return iou, denom > 0

    def per_class_iou(self) -> dict[str, float]:
        """``{class name: IoU in percent}`` (0 for classes never seen nor predicted)."""
        iou, _ = self._iou()
        return {n: 100.0 * float(v) for n, v in zip(self.class_names, iou)}

    def compute(self) -> dict[str, float]:
        """``{"mIoU", "mIoU_present", "pixel_acc"}``, all in percent (NaN if no valid pixel was seen)."""
        total = int(self.confusion.sum())
        if total == 0:
            return {"mIoU": _NAN, "mIoU_present": _NAN, "pixel_acc": _NAN}
        iou, present = self._iou()
        return {
            "mIoU": 100.0 * float(iou.mean()),
            "mIoU_present": 100.0 * float(iou[present].mean()),
            "pixel_acc": 100.0 * float(self.confusion.diag().sum()) / total,
        }


class SaliencyMetric(TaskMetric):
    """Per-image Jaccard and image-averaged precision/recall over thresholds, for ``sal``.

    The probability is ``sigmoid(logit)``; a pixel is predicted salient at threshold ``τ`` when ``prob > τ``, the
    ground truth is ``target > 0.5``, pixels labelled ``ignore_index`` are excluded. For every image and every
    ``τ`` in :data:`SAL_THRESHOLDS` (``linspace(0.2, 0.9, 15)``):

    * ``J = TP / (TP + FP + FN)``, and ``J = 1`` when both masks are empty;
    * ``P = TP / (TP + FP)`` and ``R = TP / (TP + FN)``, each 0 when its denominator is 0.

    ``compute`` averages ``J``, ``P`` and ``R`` over all images of the split per threshold, then reports in percent
    ``mIoU = max_τ mean J`` (the number the papers' tables call saliency mIoU) and
    ``maxF = max_τ 2 P̄ R̄ / (P̄ + R̄)`` (β² = 1, F of the averaged P and R; 0 where P̄ + R̄ = 0).

    It also reports ``maxF_beta``: the saliency literature's F-measure with β² = 0.3, **pooled over the split**
    (TP, predicted and actual positives summed over all valid pixels of all images) at the thresholds
    :data:`SAL_BETA_THRESHOLDS` (0.05, 0.10, ..., 0.95; a pixel is positive when ``prob >= τ``):
    ``F_β = (1 + β²) P R / (β² P + R)`` with ``P = TP / predicted``, ``R = TP / actual`` (0 where undefined),
    ``maxF_beta = max_τ F_β`` in percent.

    Source: MTLoRA ``evaluation/eval_sal_no_beta.py`` and ``evaluation/jaccard.py`` (from ASTMT) for ``mIoU`` and
    ``maxF``; ``evaluation/eval_sal_beta.py::SaliencyMeterWithBeta`` for ``maxF_beta``, whose sigmoid is applied
    once here (the official loop feeds it ``255 * sigmoid(logit)`` and it applies a second sigmoid; mtlora.md §4).

    Args:
        thresholds: probability thresholds.
        task: task name used in error messages.
        ignore_index: label value excluded.
    """

    def __init__(
        self, thresholds: Iterable[float] = SAL_THRESHOLDS, task: str = "sal", ignore_index: int = IGNORE_INDEX
    ) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        if not self.thresholds:
            raise MtbenchError(f"{task}: at least one threshold is needed")
        self.task = task
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Zero the per-threshold sums and the image count."""
        n = len(self.thresholds)
        self.jaccard_sum = torch.zeros(n, dtype=torch.float64)
        self.precision_sum = torch.zeros(n, dtype=torch.float64)
        self.recall_sum = torch.zeros(n, dtype=torch.float64)
        self.n_images = 0
        nb = len(SAL_BETA_THRESHOLDS)
        self.beta_tp = torch.zeros(nb, dtype=torch.float64)
        self.beta_pred = torch.zeros(nb, dtype=torch.float64)
        self.beta_actual = 0.0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` logits [B,1,H,W], ``target`` 0/1 mask [B,1,H,W] (255 = ignore).

        Raises:
            MtbenchError: shape mismatch.
        """
        target = _single_channel(self.task, target)
        _check_pred(self.task, pred, target, 1)
        b = pred.shape[0]
        prob = torch.sigmoid(pred.float()).reshape(b, -1)
        target = target.to(pred.device).reshape(b, -1)
        valid = target != self.ignore_index
        gt = (target > 0.5) & valid
        not_gt = (~gt) & valid
        n_gt = gt.sum(1).double()
        rows = []
        for thr in self.thresholds:
            p = prob > thr
            tp = (p & gt).sum(1).double()
            fp = (p & not_gt).sum(1).double()
            fn = n_gt - tp
            union = tp + fp + fn
            jac = torch.where(union > 0, tp / union.clamp(min=1), torch.ones_like(tp))
            prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
            rec = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
            rows.append(torch.stack([jac.sum(), prec.sum(), rec.sum()]))
        pv, gv = prob[valid], gt[valid]
        beta = torch.stack([torch.stack([((pv >= t) & gv).sum(), (pv >= t).sum()]) for t in SAL_BETA_THRESHOLDS])
        beta = beta.double().cpu()
        self.beta_tp += beta[:, 0]
        self.beta_pred += beta[:, 1]
        self.beta_actual += float(gv.sum())
        sums = torch.stack(rows).cpu()  # [T, 3], one device sync per batch
        self.jaccard_sum += sums[:, 0]
        self.precision_sum += sums[:, 1]
        self.recall_sum += sums[:, 2]
        self.n_images += b

    def compute(self) -> dict[str, float]:
        """``{"mIoU", "maxF", "maxF_beta"}`` in percent (NaN if no image was seen)."""
        if self.n_images == 0:
            return {"mIoU": _NAN, "maxF": _NAN, "maxF_beta": _NAN}
        mj = self.jaccard_sum / self.n_images
        mp = self.precision_sum / self.n_images
        mr = self.recall_sum / self.n_images
        f = torch.where(mp + mr > 0, 2 * mp * mr / (mp + mr).clamp(min=1e-300), torch.zeros_like(mp))
        b2 = SAL_BETA_SQUARED
        zero = torch.zeros_like(self.beta_tp)
        prec = torch.where(self.beta_pred > 0, self.beta_tp / self.beta_pred.clamp(min=1), zero)
        rec = self.beta_tp / self.beta_actual if self.beta_actual > 0 else zero
        den = b2 * prec + rec
        fb = torch.where(den > 0, (1 + b2) * prec * rec / den.clamp(min=1e-300), zero)
        return {"mIoU": 100.0 * float(mj.max()), "maxF": 100.0 * float(f.max()), "maxF_beta": 100.0 * float(fb.max())}


class NormalsMetric(TaskMetric):
    """Angular error of surface normals in degrees, pixel-pooled over the whole split.

    Prediction and target are L2-normalised per pixel and the angle between them is
    ``2 * atan2(||a - b||, ||a + b||)`` (equal to ``acos(a·b)`` for unit vectors, but accurate near 0° and 180°).
    A pixel is valid when no target channel equals ``ignore_index``. ``compute`` returns:

    * ``mErr``: mean angular error (degrees). This is the number the papers call "Normals (rmse)": MTLoRA's
      ``NormalsMeterV1`` reports the mean under the name ``rmse`` (mtlora.md §4).
    * ``rmse``: the true root-mean-square angular error ``sqrt(mean(e²))`` (degrees), always ``>= mErr``.
    * ``median``: median angular error (degrees), from a histogram with bins of ``median_resolution`` degrees and
      linear interpolation inside the bin, so it is accurate to that resolution without storing every pixel.
    * ``11.25``, ``22.5``, ``30``: percent of valid pixels with error strictly below that many degrees.

    Source: MTLoRA ``evaluation/eval_normals_v1.py`` (pixel-pooled mean and the three thresholds), ASTMT for the
    median. Unlike MTLoRA we do not quantise the prediction to 8 bits before measuring.

    Args:
        median_resolution: histogram bin width in degrees for the median.
        task: task name used in error messages.
        ignore_index: label value marking invalid pixels.
    """

    ANGLES = (11.25, 22.5, 30.0)

    def __init__(self, median_resolution: float = 1e-3, task: str = "normals", ignore_index: int = IGNORE_INDEX):
        if not median_resolution > 0:
            raise MtbenchError(f"{task}: median_resolution must be > 0, got {median_resolution}")
        self.median_resolution = float(median_resolution)
        self.n_bins = int(math.ceil(180.0 / self.median_resolution)) + 1
        self.task = task
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Zero the sums, counts and histogram."""
        self.n = 0
        self.sum_err = 0.0
        self.sum_sq = 0.0
        self.below = [0 for _ in self.ANGLES]
        self.hist = torch.zeros(self.n_bins, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` raw normals [B,3,H,W], ``target`` unit normals [B,3,H,W] (invalid = 255).

        Raises:
            MtbenchError: shape mismatch.
        """
        _check_pred(self.task, pred, target, 3)
        if target.dim() != 4 or target.shape[1] != 3:
            raise MtbenchError(f"{self.task}: target must be [B,3,H,W], got shape {tuple(target.shape)}")
        target = target.to(pred.device)
        valid = (target != self.ignore_index).all(dim=1)  # [B,H,W]
        a = F.normalize(pred.float(), p=2, dim=1, eps=1e-12).permute(0, 2, 3, 1)[valid]  # [N,3]
        b = F.normalize(target.float(), p=2, dim=1, eps=1e-12).permute(0, 2, 3, 1)[valid]
        if a.shape[0] == 0:
            return
        err = torch.rad2deg(
            2.0 * torch.atan2(torch.linalg.vector_norm(a - b, dim=1), torch.linalg.vector_norm(a + b, dim=1))
        ).double()
        self.n += int(err.numel())
        self.sum_err += float(err.sum())
        self.sum_sq += float((err * err).sum())
        for i, ang in enumerate(self.ANGLES):
            self.below[i] += int((err < ang).sum())
        bins = (err / self.median_resolution).floor().long().clamp(0, self.n_bins - 1)
        self.hist += torch.bincount(bins, minlength=self.n_bins).cpu()

    def _median(self) -> float:
        cum = torch.cumsum(self.hist, 0)
        half = self.n / 2.0
        k = int(torch.searchsorted(cum.double(), torch.tensor([half], dtype=torch.float64))[0])
        before = float(cum[k - 1]) if k > 0 else 0.0
        in_bin = float(self.hist[k])
        frac = (half - before) / in_bin if in_bin > 0 else 0.0
        return (k + frac) * self.median_resolution

    def compute(self) -> dict[str, float]:
        """``{"mErr", "rmse", "median"}`` in degrees and ``{"11.25", "22.5", "30"}`` in percent of pixels."""
        keys = ("mErr", "rmse", "median", "11.25", "22.5", "30")
        if self.n == 0:
            return {k: _NAN for k in keys}
        out = {
            "mErr": self.sum_err / self.n,
            "rmse": math.sqrt(self.sum_sq / self.n),
            "median": self._median(),
        }
        for ang, key, cnt in zip(self.ANGLES, keys[3:], self.below):
            out[key] = 100.0 * cnt / self.n
        return out


class DepthMetric(TaskMetric):
    """Pixel-pooled depth errors over the whole split.

    Valid pixels: ``target != ignore_index`` (and finite). With ``N`` valid pixels, ``g`` the ground truth and
    ``d`` the prediction, both in metres:

    the prediction is first clamped, ``d = max(d, 1e-9)`` (depth is positive), before *both* errors, as MTLoRA's
    evaluator does; then

    * ``rmse = sqrt(sum (g - d)² / N)`` (metres) over all valid pixels;
    * ``log_rmse = sqrt(sum (log g - log d)² / N')`` and ``abs_rel = sum |g - d| / g / N'`` over the valid pixels
      with ``g > 0`` (``N'`` of them; MTLoRA divides the log sum by ``N``, which differs only when a valid ground
      truth is 0, impossible after the readers' ``0 -> invalid``).

    Source: MTLoRA ``evaluation/eval_depth.py::DepthMeter`` (pixel-pooled rmse and log-rmse, ``clamp(min=1e-9)``).
    ``abs_rel`` is the usual NYUD extra (Eigen et al., NeurIPS 2014), not in MTLoRA.

    Args:
        task: task name used in error messages.
        ignore_index: label value marking invalid pixels.
    """

    def __init__(self, task: str = "depth", ignore_index: int = IGNORE_INDEX) -> None:
        self.task = task
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Zero the sums and counts."""
        self.n = 0
        self.n_pos = 0
        self.sum_sq = 0.0
        self.sum_log_sq = 0.0
        self.sum_abs_rel = 0.0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` depth [B,1,H,W] in metres, ``target`` [B,1,H,W] in metres (255 = invalid).

        Raises:
            MtbenchError: shape mismatch.
        """
        target = _single_channel(self.task, target)
        _check_pred(self.task, pred, target, 1)
        target = target.to(pred.device).double()
        pred = pred.double().clamp(min=DEPTH_MIN)
        valid = (target != self.ignore_index) & torch.isfinite(target)
        g, d = target[valid], pred[valid]
        self.n += int(g.numel())
        self.sum_sq += float(((g - d) ** 2).sum())
        pos = g > 0
        g, d = g[pos], d[pos]
        self.n_pos += int(g.numel())
        self.sum_log_sq += float(((g.log() - d.log()) ** 2).sum())
        self.sum_abs_rel += float(((g - d).abs() / g).sum())

    def compute(self) -> dict[str, float]:
        """``{"rmse"}`` in metres, ``{"log_rmse"}`` in natural-log metres, ``{"abs_rel"}`` as a ratio."""
        return {
            "rmse": math.sqrt(self.sum_sq / self.n) if self.n else _NAN,
            "log_rmse": math.sqrt(self.sum_log_sq / self.n_pos) if self.n_pos else _NAN,
            "abs_rel": self.sum_abs_rel / self.n_pos if self.n_pos else _NAN,
        }


class EdgeMetric(TaskMetric):
    """A cheap proxy for edge detection: pixel-pooled F (``pixel_maxF``, not ODS-F), no boundary tolerance, plus
    the balanced BCE.

    The probability is ``sigmoid(logit)``; a pixel is predicted as edge at threshold ``τ`` when ``prob > τ``; the
    ground truth is ``target > 0.5``; pixels labelled ``ignore_index`` are excluded. TP/FP/FN are summed over the
    whole split per ``τ`` in :data:`EDGE_THRESHOLDS` (``linspace(0.05, 0.95, 19)``); ``P = TP/(TP+FP)``,
    ``R = TP/(TP+FN)``, ``F = 2PR/(P+R)``; ``pixel_maxF = max_τ F`` in percent.

    **This is not the ODS-F of the edge literature** (SEISM / BSDS benchmark), which matches predicted and true
    boundary pixels within a distance tolerance after non-maximum suppression; exact pixel matching gives much
    lower numbers, so do not compare ``pixel_maxF`` with published edge scores.

    ``loss`` is the balanced BCE of :class:`mtbench.losses.BalancedBCELoss` with positive weight 0.95, pooled over
    all valid pixels of the split (nats per pixel, lower is better). It is what MTLoRA's ``evaluation/eval_edge.py``
    reports for edges (MTLoRA feeds it sigmoid probabilities as if they were logits; we use the logits).

    Args:
        thresholds: probability thresholds.
        task: task name used in error messages.
        ignore_index: label value excluded.
    """

    def __init__(
        self, thresholds: Iterable[float] = EDGE_THRESHOLDS, task: str = "edge", ignore_index: int = IGNORE_INDEX
    ) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        if not self.thresholds:
            raise MtbenchError(f"{task}: at least one threshold is needed")
        self.task = task
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Zero the per-threshold counts and the loss sum."""
        n = len(self.thresholds)
        self.tp = torch.zeros(n, dtype=torch.int64)
        self.fp = torch.zeros(n, dtype=torch.int64)
        self.fn = torch.zeros(n, dtype=torch.int64)
        self.loss_sum = 0.0
        self.n = 0

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` logits [B,1,H,W], ``target`` 0/1 boundary mask [B,1,H,W] (255 = ignore).

        Raises:
            MtbenchError: shape mismatch.
        """
        target = _single_channel(self.task, target)
        _check_pred(self.task, pred, target, 1)
        target = target.to(pred.device)
        valid = target != self.ignore_index
        x = pred.float()[valid]
        gt = target[valid] > 0.5
        prob = torch.sigmoid(x)
        n_gt = gt.sum()
        rows = []
        for thr in self.thresholds:
            p = prob > thr
            tp = (p & gt).sum()
            rows.append(torch.stack([tp, p.sum() - tp, n_gt - tp]))
        counts = torch.stack(rows).cpu()  # [T, 3]
        self.tp += counts[:, 0]
        self.fp += counts[:, 1]
        self.fn += counts[:, 2]
        w = EDGE_POS_WEIGHT
        y = gt.double()
        xd = x.double()
        per_pixel = w * y * F.softplus(-xd) + (1.0 - w) * (1.0 - y) * F.softplus(xd)
        self.loss_sum += float(per_pixel.sum())
        self.n += int(x.numel())

    def compute(self) -> dict[str, float]:
        """``{"pixel_maxF"}`` in percent and ``{"loss"}`` in nats per valid pixel (NaN if no valid pixel was seen)."""
        if self.n == 0:
            return {"pixel_maxF": _NAN, "loss": _NAN}
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
        rec = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
        f = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp(min=1e-300), torch.zeros_like(tp))
        return {"pixel_maxF": 100.0 * float(f.max()), "loss": self.loss_sum / self.n}


def build_metric(task: TaskSpec) -> TaskMetric:
    """The evaluation metric of one task (see the module table).

    Args:
        task: the task; its :class:`mtbench.tasks.TaskKind` supplies the metric factory (``out_channels`` and
            ``class_names`` are used by segmentation metrics).

    Raises:
        MtbenchError: unknown task name.
    """
    from mtbench.tasks import TASK_KINDS

    if task.name not in TASK_KINDS:
        raise MtbenchError(f"no metric for task {task.name!r}; valid: {', '.join(TASK_KINDS)}")
    return TASK_KINDS[task.name].metric(task)


class MultiTaskMetrics:
    """One :class:`TaskMetric` per task, updated together from model outputs and a batch.

    Args:
        tasks: the tasks to evaluate.

    Raises:
        MtbenchError: empty or duplicate task list, or an unknown task.
    """

    def __init__(self, tasks: Iterable[TaskSpec]) -> None:
        tasks = list(tasks)
        names = [t.name for t in tasks]
        if not names:
            raise MtbenchError("MultiTaskMetrics needs at least one task")
        if len(set(names)) != len(names):
            raise MtbenchError(f"duplicate task in {names}")
        self.tasks = tasks
        self.metrics: dict[str, TaskMetric] = {t.name: build_metric(t) for t in tasks}

    def update(self, preds: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        """Add one batch.

        Args:
            preds: ``{task: prediction [B,C,H,W]}`` (raw model outputs); extra keys are ignored.
            batch: the batch dict, ``{task: target}`` as in :data:`mtbench.tasks.SAMPLE_FORMAT`; extra keys such as
                ``image`` and ``meta`` are ignored.

        Raises:
            MtbenchError: a task is missing from ``preds`` or ``batch``, or a shape mismatch.
        """
        for name, metric in self.metrics.items():
            if name not in preds:
                raise MtbenchError(f"prediction for task {name!r} missing; got {sorted(preds)}")
            if name not in batch:
                raise MtbenchError(f"target for task {name!r} missing from the batch; got {sorted(batch)}")
            metric.update(preds[name], batch[name])

    def compute(self) -> dict[str, dict[str, float]]:
        """``{task: {metric name: value}}`` over everything seen since the last reset."""
        return {name: m.compute() for name, m in self.metrics.items()}

    def reset(self) -> None:
        """Reset every task metric."""
        for m in self.metrics.values():
            m.reset()


def _task_name(task: TaskSpec | str) -> str:
    return task if isinstance(task, str) else task.name


def primary_metrics(
    metrics: Mapping[str, Mapping[str, float]], tasks: Iterable[TaskSpec | str]
) -> dict[str, float]:
    """Pick each task's primary metric (:data:`mtbench.tasks.PRIMARY_METRIC`) from ``compute()``'s output.

    Args:
        metrics: ``{task: {metric name: value}}``, e.g. :meth:`MultiTaskMetrics.compute`.
        tasks: TaskSpecs or task names.

    Returns:
        ``{task: value}`` (semseg/human_parts/sal ``mIoU``, normals ``mErr``, depth ``rmse``, edge ``pixel_maxF``).

    Raises:
        MtbenchError: a task without a primary metric, or missing from ``metrics``.
    """
    out = {}
    for t in tasks:
        name = _task_name(t)
        if name not in TASK_KINDS:
            raise MtbenchError(f"task {name!r} has no primary metric; valid: {', '.join(TASK_KINDS)}")
        key = TASK_KINDS[name].primary_metric
        if name not in metrics or key not in metrics[name]:
            raise MtbenchError(f"metric {key!r} of task {name!r} missing from the results")
        out[name] = float(metrics[name][key])
    return out


def primary_higher_is_better(tasks: Iterable[TaskSpec | str]) -> dict[str, bool]:
    """``{task: True if a higher primary metric is better}`` from :data:`mtbench.tasks.PRIMARY_METRIC`.

    Raises:
        MtbenchError: a task without a primary metric.
    """
    out = {}
    for t in tasks:
        name = _task_name(t)
        if name not in TASK_KINDS:
            raise MtbenchError(f"task {name!r} has no primary metric; valid: {', '.join(TASK_KINDS)}")
        out[name] = TASK_KINDS[name].higher_is_better
    return out


def delta_m(mt: Mapping[str, float], st: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> float:
    """Average relative improvement of a multi-task model over single-task references, in percent.

    ``Δm = (1/T) * sum_t (-1)^{l_t} * (M_mt,t - M_st,t) / M_st,t * 100`` where ``T`` is the number of tasks in
    ``mt``, ``l_t = 1`` when a lower metric is better for task ``t`` (normals error, depth rmse) and 0 otherwise.

    Source: TADFormer (CVPR 2025) Eq. (6) (``/work/shared/papers/002``), the Δm of MTLoRA (CVPR 2024) and
    Maninis et al. (ASTMT, CVPR 2019); MTLoRA's ``evaluation/evaluate_utils.py::calculate_multi_task_performance``
    (never called there) has the same form without the factor 100.

    Worked example (PASCAL-Context, the references of its dataset spec,
    ``mtbench.datasets.get_dataset('pascal_context').references``; MTLoRA issue #6 results)::

        semseg       (68.38 - 67.21) / 67.21 = +1.741 %   (higher is better)
        human_parts  (59.58 - 61.93) / 61.93 = -3.795 %   (higher is better)
        sal          (63.85 - 62.35) / 62.35 = +2.406 %   (higher is better)
        normals     -(16.76 - 17.97) / 17.97 = +6.733 %   (lower is better, sign flipped)
        Δm = (1.741 - 3.795 + 2.406 + 6.733) / 4 = +1.77 %

    Args:
        mt: ``{task: primary metric}`` of the model being scored (e.g. :func:`primary_metrics`).
        st: ``{task: primary metric}`` of the single-task references, same units.
        higher_is_better: ``{task: bool}`` (e.g. :func:`primary_higher_is_better`).

    Returns:
        Δm in percent (positive = better than the references).

    Raises:
        MtbenchError: ``mt`` is empty, or a task of ``mt`` has no reference, a zero or non-finite reference, or no
            ``higher_is_better`` entry.
    """
    if not mt:
        raise MtbenchError("delta_m needs at least one task")
    total = 0.0
    for task, value in mt.items():
        if task not in st:
            raise MtbenchError(f"no single-task reference for task {task!r}; have: {', '.join(st) or 'none'}")
        ref = float(st[task])
        if ref == 0.0 or not math.isfinite(ref):
            raise MtbenchError(f"single-task reference for task {task!r} must be finite and non-zero, got {ref}")
        if task not in higher_is_better:
            raise MtbenchError(f"higher_is_better not given for task {task!r}")
        sign = 1.0 if higher_is_better[task] else -1.0
        total += sign * (float(value) - ref) / ref
    return 100.0 * total / len(mt)
