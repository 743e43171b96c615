"""Dense-prediction tasks, their on-tensor formats and the per-dataset task tables.

Every dataset in mtbench yields samples in one format (see :data:`SAMPLE_FORMAT`), so that losses, metrics and
decoders never look at where a sample came from.

Sources: the task set, channel counts and loss weights follow MTLoRA (Agiza et al., CVPR 2024, §4.1) and its
official code (github.com/scale-lab/MTLoRA, ``main.py`` loss weights, ``data/mtl_ds.py`` encodings), which itself
follows ASTMT (Maninis et al., CVPR 2019) and Vandenhende et al. (TPAMI 2021).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

#: MTLoRA's task loss weights (official code ``main.py``; also Vandenhende et al.).
DEFAULT_LOSS_WEIGHTS = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0, "edge": 50.0, "depth": 1.0}

#: Which primary metric each task reports in the papers' Table 1, and whether higher is better.
PRIMARY_METRIC = {
    "semseg": ("mIoU", True),
    "human_parts": ("mIoU", True),
    "sal": ("mIoU", True),
    "normals": ("mErr", False),
    "depth": ("rmse", False),
    "edge": ("pixel_maxF", True),
}


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
    def primary_metric(self) -> str:
        return PRIMARY_METRIC[self.name][0]

    @property
    def higher_is_better(self) -> bool:
        return PRIMARY_METRIC[self.name][1]


PASCAL_CONTEXT_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PASCAL_PART_CLASSES = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")


def _synthetic_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from mtbench.data.synthetic import PART_NAMES, SEMSEG_NAMES

    return tuple(SEMSEG_NAMES), tuple(PART_NAMES)


def dataset_task_table(dataset: str) -> dict[str, TaskSpec]:
    """All tasks a dataset provides, as ``{name: TaskSpec}``.

    Raises:
        MtbenchError: the dataset name is unknown.
    """
    w = DEFAULT_LOSS_WEIGHTS
    if dataset == "pascal_context":
        return {
            "semseg": TaskSpec("semseg", 21, w["semseg"], PASCAL_CONTEXT_CLASSES),
            "human_parts": TaskSpec("human_parts", 7, w["human_parts"], PASCAL_PART_CLASSES),
            "sal": TaskSpec("sal", 1, w["sal"]),
            "normals": TaskSpec("normals", 3, w["normals"]),
            "edge": TaskSpec("edge", 1, w["edge"]),
        }
    if dataset == "nyud":
        return {
            "semseg": TaskSpec("semseg", 40, w["semseg"], tuple(f"class_{i}" for i in range(40))),
            "depth": TaskSpec("depth", 1, w["depth"]),
            "normals": TaskSpec("normals", 3, w["normals"]),
            "edge": TaskSpec("edge", 1, w["edge"]),
        }
    if dataset == "synthetic":
        sem, parts = _synthetic_classes()
        return {
            "semseg": TaskSpec("semseg", len(sem), w["semseg"], sem),
            "human_parts": TaskSpec("human_parts", len(parts), w["human_parts"], parts),
            "sal": TaskSpec("sal", 1, w["sal"]),
            "normals": TaskSpec("normals", 3, w["normals"]),
            "depth": TaskSpec("depth", 1, w["depth"]),
            "edge": TaskSpec("edge", 1, w["edge"]),
        }
    raise MtbenchError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


#: Datasets and the tasks used by default (the papers' setting; synthetic mirrors PASCAL-Context's four tasks).
DEFAULT_TASKS = {
    "pascal_context": ("semseg", "human_parts", "sal", "normals"),
    "nyud": ("semseg", "depth", "normals"),
    "synthetic": ("semseg", "human_parts", "sal", "normals"),
}
DATASETS = tuple(DEFAULT_TASKS)


def resolve_tasks(
    dataset: str, tasks: list[str] | tuple[str, ...] | None = None, loss_weights: dict[str, float] | None = None
) -> list[TaskSpec]:
    """The TaskSpecs for ``tasks`` on ``dataset`` (the dataset's default tasks when ``tasks`` is None).

    Args:
        dataset: dataset key (``synthetic``, ``pascal_context``, ``nyud``).
        tasks: task names, in order; None for the default set.
        loss_weights: per-task overrides of :data:`DEFAULT_LOSS_WEIGHTS`.

    Raises:
        MtbenchError: unknown dataset or task, a duplicate task, or a non-positive loss weight.
    """
    table = dataset_task_table(dataset)
    names = list(tasks) if tasks else list(DEFAULT_TASKS[dataset])
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
        spec = table[n]
        if n in weights:
            spec = TaskSpec(spec.name, spec.out_channels, float(weights[n]), spec.class_names)
        out.append(spec)
    return out
