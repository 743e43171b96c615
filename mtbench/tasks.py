"""Dense-prediction tasks: the task specs (loss, metric, output channels), the sample format and task lookup.

A task is described once, by a :class:`TaskKind` in :data:`TASK_KINDS`; a dataset (see :mod:`mtbench.datasets`)
lists which tasks it provides and their class names. Every dataset in mtbench yields samples in one format (see :data:`SAMPLE_FORMAT`), so that losses, metrics and
decoders never look at where a sample came from.

Sources: the task set, channel counts and loss weights follow MTLoRA (Agiza et al., CVPR 2024, §4.1) and its
official code (github.com/scale-lab/MTLoRA, ``main.py`` loss weights, ``data/mtl_ds.py`` encodings), which itself
follows ASTMT (Maninis et al., CVPR 2019) and Vandenhende et al. (TPAMI 2021).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mtbench.errors import MtbenchError

#: Label value marking a pixel to be ignored by losses and metrics, for every task (MTLoRA / ASTMT convention).
IGNORE_INDEX = 255

#: What one dataset sample holds (a ``dict``); ``H, W`` is the dataset's image size.
SAMPLE_FORMAT = {
    "image": "float32 [3,H,W], ImageNet mean/std normalised",
    "semseg": "int64 [H,W], class index, 255 = ignore",
    "human_parts": "int64 [H,W], part index (0 = background), 255 = ignore",
    "sal": "float32 [1,H,W], 0/1 foreground mask, 255 = ignore",
    "normals": "float32 [3,H,W], unit surface normal (x right, y down, z towards camera); invalid pixels 255 in all channels",
    "depth": "float32 [1,H,W], depth in metres, 255 = invalid",
    "edge": "float32 [1,H,W], 0/1 boundary mask, 255 = ignore",
    "meta": "dict: id (str), size (H, W) of the stored image before resizing",
}

@dataclass(frozen=True)
class TaskKind:
    """Everything about one dense task that does not depend on the dataset: a **task spec**.

    Adding a task means adding one :class:`TaskKind` to :data:`TASK_KINDS` (with :func:`register_task`); losses
    (:func:`mtbench.losses.build_loss`), metrics (:func:`mtbench.metrics.build_metric`), decoders (output channels)
    and Δm (primary metric and direction) all read it from here.

    Attributes:
        name: task key as it appears in samples and result files.
        primary_metric: key of the metric the papers' tables report (Δm uses it).
        higher_is_better: direction of ``primary_metric``.
        loss_weight: default weight in the summed multi-task loss (MTLoRA ``main.py``).
        out_channels: decoder output channels; None means one per class (segmentation tasks).
        loss: ``factory(task: TaskSpec) -> nn.Module`` with ``forward(pred [B,C,H,W], target) -> scalar``.
        metric: ``factory(task: TaskSpec) -> mtbench.metrics.TaskMetric``.
        upsample: how a prediction is brought to a larger label resolution at evaluation (``nearest`` for
            segmentation logits, which equals resizing the arg-max label map with nearest neighbour as MTI-Net's
            evaluation does; ``bilinear`` otherwise).
    """

    name: str
    primary_metric: str
    higher_is_better: bool
    loss_weight: float
    out_channels: int | None
    loss: Callable[[TaskSpec], Any]
    metric: Callable[[TaskSpec], Any]
    upsample: str = "bilinear"


def _seg_loss(t):
    from mtbench.losses import SegmentationCELoss

    return SegmentationCELoss(task=t.name)


def _bce_loss(pos_weight):
    def make(t):
        from mtbench.losses import EDGE_POS_WEIGHT, BalancedBCELoss

        return BalancedBCELoss(pos_weight=EDGE_POS_WEIGHT if pos_weight == "edge" else None, task=t.name)

    return make


def _normals_loss(t):
    from mtbench.losses import NormalsL1Loss

    return NormalsL1Loss(task=t.name)


def _depth_loss(t):
    from mtbench.losses import DepthL1Loss

    return DepthL1Loss(task=t.name)


def _metric(cls_name: str):
    def make(t):
        import mtbench.metrics as m

        cls = getattr(m, cls_name)
        if cls_name == "SegmentationMetric":
            return cls(t.out_channels, t.class_names, task=t.name)
        return cls(task=t.name)

    return make


#: The task specs, by name (register more with :func:`register_task`). Losses and weights: MTLoRA ``main.py`` /
#: ``mtl_loss_schemes.py``; metrics: MTLoRA ``evaluation/`` (see :mod:`mtbench.metrics`).
TASK_KINDS: dict[str, TaskKind] = {}


def register_task(kind: TaskKind) -> TaskKind:
    """Add a task spec to :data:`TASK_KINDS` (and return it).

    Raises:
        MtbenchError: a task of that name is already registered.
    """
    if kind.name in TASK_KINDS:
        raise MtbenchError(f"task {kind.name!r} is already registered")
    TASK_KINDS[kind.name] = kind
    return kind


def task_kind(name: str) -> TaskKind:
    """The :class:`TaskKind` of a task name.

    Raises:
        MtbenchError: unknown task (the message lists the registered ones).
    """
    if name not in TASK_KINDS:
        raise MtbenchError(f"unknown task {name!r}; valid: {', '.join(TASK_KINDS)}")
    return TASK_KINDS[name]


for _k in (
    TaskKind("semseg", "mIoU", True, 1.0, None, _seg_loss, _metric("SegmentationMetric"), "nearest"),
    TaskKind("human_parts", "mIoU", True, 2.0, None, _seg_loss, _metric("SegmentationMetric"), "nearest"),
    TaskKind("sal", "mIoU", True, 5.0, 1, _bce_loss(None), _metric("SaliencyMetric")),
    TaskKind("normals", "mErr", False, 10.0, 3, _normals_loss, _metric("NormalsMetric")),
    TaskKind("depth", "rmse", False, 1.0, 1, _depth_loss, _metric("DepthMetric")),
    TaskKind("edge", "pixel_maxF", True, 50.0, 1, _bce_loss("edge"), _metric("EdgeMetric")),
):
    register_task(_k)


#: MTLoRA's task loss weights (official code ``main.py``; also Vandenhende et al.), derived from :data:`TASK_KINDS`.
DEFAULT_LOSS_WEIGHTS = {k.name: k.loss_weight for k in TASK_KINDS.values()}

#: Which primary metric each task reports in the papers' Table 1, and whether higher is better (from the task specs).
PRIMARY_METRIC = {k.name: (k.primary_metric, k.higher_is_better) for k in TASK_KINDS.values()}


@dataclass(frozen=True)
class TaskSpec:
    """One dense task of a dataset.

    Attributes:
        name: task key, one of ``semseg, human_parts, sal, normals, depth, edge``.
        out_channels: channels of the decoder output ``[B, out_channels, H, W]`` (classes for segmentation,
            1 for sal/depth/edge logits or values, 3 for normals).
        loss_weight: weight of this task's loss in the summed multi-task loss.
        class_names: names of the classes for segmentation tasks (empty otherwise).
    """

    name: str
    out_channels: int
    loss_weight: float
    class_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def kind(self) -> TaskKind:
        """The dataset-independent task spec (loss, metric, primary metric)."""
        return task_kind(self.name)

    @property
    def primary_metric(self) -> str:
        return self.kind.primary_metric

    @property
    def higher_is_better(self) -> bool:
        return self.kind.higher_is_better


def dataset_task_table(dataset: str) -> dict[str, TaskSpec]:
    """All tasks a dataset provides, as ``{name: TaskSpec}`` (from its :class:`mtbench.datasets.DatasetSpec`).

    Raises:
        MtbenchError: the dataset name is unknown.
    """
    from mtbench.datasets import get_dataset

    return get_dataset(dataset).task_table()


def resolve_tasks(
    dataset: str, tasks: list[str] | tuple[str, ...] | None = None, loss_weights: dict[str, float] | None = None
) -> list[TaskSpec]:
    """The TaskSpecs for ``tasks`` on ``dataset`` (the dataset's default tasks when ``tasks`` is None).

    Args:
        dataset: a registered dataset name (``synthetic``, ``pascal_context``, ``nyud``, ...).
        tasks: task names, in order; None for the default set.
        loss_weights: per-task overrides of the task specs' default loss weights.

    Raises:
        MtbenchError: unknown dataset or task, a duplicate task, or a non-positive loss weight.
    """
    from mtbench.datasets import get_dataset

    spec = get_dataset(dataset)
    table = spec.task_table()
    names = list(tasks) if tasks else list(spec.default_tasks)
    for n in names:
        if n not in table:
            raise MtbenchError(f"unknown task {n!r} for dataset {dataset!r}; valid: {', '.join(table)}")
    if len(set(names)) != len(names):
        raise MtbenchError(f"duplicate task in {names}")
    weights = dict(loss_weights or {})
    for n, v in weights.items():
        if n not in names:
            raise MtbenchError(f"loss weight given for task {n!r} which is not in the task list {names}")
        if not v > 0:
            raise MtbenchError(f"loss weight for {n!r} must be > 0, got {v}")
    out = []
    for n in names:
        t = table[n]
        if n in weights:
            t = TaskSpec(t.name, t.out_channels, float(weights[n]), t.class_names)
        out.append(t)
    return out
