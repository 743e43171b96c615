"""Dataset specs: one registered description per dataset.

A :class:`DatasetSpec` owns everything mtbench needs to know about a dataset: its tasks (names and class lists;
the losses, metrics and output channels come from the task specs in :mod:`mtbench.tasks`), the backbone and input
size of its setting, its splits and their published sizes, its recipe presets, its single-task references for Δm
with their source, and its reader. The runner, ``mtbench params``, ``mtbench data check``, ``build_dataset`` and the
result files all read it from here.

Adding a dataset touches one file: a module in ``mtbench/data/`` that defines the reader and ends with
``register_dataset(DatasetSpec(...))``. Every module of the ``mtbench.data`` package is imported (and so registered)
on first use of the registry. The synthetic dataset, PASCAL-Context and NYUD-v2 are registered this way
(``mtbench/data/synthetic.py``, ``pascal.py``, ``nyud.py``).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from mtbench.errors import MtbenchError
from mtbench.tasks import TaskSpec, task_kind
from mtbench.train import TrainConfig

#: Names of the recipe presets every real dataset offers (``--preset``).
PRESETS = ("embedded", "paper")


@dataclass(frozen=True)
class RecipePreset:
    """A named training recipe of a dataset.

    Attributes:
        name: ``embedded`` or ``paper``.
        config: the recipe at its own batch size.
        description: one line for ``--help``, the README and the result file.
        base_lr, base_min_lr, lr_ref_batch: when set, the learning rates are ``base * batch / lr_ref_batch``
            (MTLoRA ``config.py``: 5e-4 and 5e-6 at reference batch 512), so ``--batch-size`` rescales them;
            ``--lr`` still overrides the peak rate.
        source: where the recipe comes from.
    """

    name: str
    config: TrainConfig
    description: str
    base_lr: float | None = None
    base_min_lr: float | None = None
    lr_ref_batch: int | None = None
    source: str = ""

    def resolve(self, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                **extra: Any) -> TrainConfig:
        """The :class:`TrainConfig` with command-line overrides applied (``None`` keeps the preset's value).

        Raises:
            MtbenchError: an override out of range (see :meth:`TrainConfig.validate`).
        """
        cfg = self.config
        changes: dict[str, Any] = dict(extra)
        if epochs is not None:
            changes["epochs"] = int(epochs)
        if batch_size is not None:
            changes["batch_size"] = int(batch_size)
        bs = changes.get("batch_size", cfg.batch_size)
        if self.lr_ref_batch and bs >= 1:
            changes["lr"] = self.base_lr * bs / self.lr_ref_batch
            changes["min_lr"] = self.base_min_lr * bs / self.lr_ref_batch
        if lr is not None:
            changes["lr"] = float(lr)
        cfg = replace(cfg, **changes)
        cfg.validate()
        return cfg


@dataclass(frozen=True)
class DatasetSpec:
    """Everything about one dataset, registered once with :func:`register_dataset`.

    Attributes:
        name: the ``--dataset`` key.
        title: human-readable name.
        tasks: ``{task: class names}`` of every task the dataset provides (empty tuple for non-segmentation tasks);
            loss, metric and output channels come from the task spec (:func:`mtbench.tasks.task_kind`).
        default_tasks: the tasks of the papers' setting.
        splits: valid split names.
        backbone: backbone name of the setting (:data:`mtbench.swin.BACKBONES`).
        img_size: square input side ``S``.
        presets: ``{name: RecipePreset}``; ``default_preset`` is used when ``--preset`` is not given.
        references: single-task references ``{task: primary metric}`` for Δm, or None.
        reference_source: where the references come from (paper, table, row, and what the metric is).
        reader: ``reader(root, split, tasks=..., img_size=..., augment=..., n=..., label_resolution=...,
            seed=...) -> Dataset`` yielding :data:`mtbench.tasks.SAMPLE_FORMAT` samples.
        data_dir: name of the downloaded directory (``PASCAL_MT``); None for generated data.
        published: where the data is published (URL and what to download).
        expected_counts: ``{split: images}`` of the full download, printed by ``mtbench data check``.
        check_items: ``check_items(root, split) -> list of picklable work items`` and ``check_item(item) ->
            (split, {task: ok}, [problem lines])`` for ``mtbench data check``; None when the dataset has nothing to
            check (generated data).
    """

    name: str
    title: str
    tasks: dict[str, tuple[str, ...]]
    default_tasks: tuple[str, ...]
    splits: tuple[str, ...]
    backbone: str
    img_size: int
    presets: dict[str, RecipePreset]
    reader: Callable[..., Any]
    default_preset: str = "embedded"
    references: dict[str, float] | None = None
    reference_source: str | None = None
    data_dir: str | None = None
    published: str = ""
    expected_counts: dict[str, int] = field(default_factory=dict)
    check_items: Callable[..., list] | None = None
    check_item: Callable[[Any], tuple] | None = None

    def task_table(self) -> dict[str, TaskSpec]:
        """``{task: TaskSpec}`` of every task of the dataset (output channels: one per class for segmentation
        tasks, else the task spec's; loss weight: the task spec's default)."""
        out = {}
        for name, classes in self.tasks.items():
            kind = task_kind(name)
            channels = len(classes) if kind.out_channels is None else kind.out_channels
            out[name] = TaskSpec(name, channels, kind.loss_weight, tuple(classes))
        return out

    def preset(self, name: str | None) -> RecipePreset:
        """The recipe preset ``name`` (None: :attr:`default_preset`).

        Raises:
            MtbenchError: the dataset has no such preset (the message lists the valid ones).
        """
        key = self.default_preset if name is None else name
        if key not in self.presets:
            raise MtbenchError(f"unknown --preset {key!r} for dataset {self.name!r}; valid: {', '.join(self.presets)}")
        return self.presets[key]


_DATASETS: dict[str, DatasetSpec] = {}
_LOADED = False
#: The built-in datasets, in the order every listing shows them (any other dataset follows, as registered), and
#: their modules in ``mtbench/data/``.
_BUILTINS = ("synthetic", "pascal_context", "nyud")
_BUILTIN_MODULES = ("synthetic", "pascal", "nyud")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register a dataset spec (called at the end of its module in ``mtbench/data/``) and return it.

    Raises:
        MtbenchError: a dataset of that name is already registered, a default task it does not provide, a task
            without a task spec, or a default preset it does not define.
    """
    if spec.name in _DATASETS:
        raise MtbenchError(f"dataset {spec.name!r} is already registered")
    for t in spec.tasks:
        task_kind(t)
    bad = [t for t in spec.default_tasks if t not in spec.tasks]
    if bad:
        raise MtbenchError(f"dataset {spec.name!r}: default task {bad[0]!r} is not one of its tasks")
    if spec.default_preset not in spec.presets:
        raise MtbenchError(f"dataset {spec.name!r}: default preset {spec.default_preset!r} is not defined")
    _DATASETS[spec.name] = spec
    return spec


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import mtbench.data as pkg

    for name in _BUILTIN_MODULES:
        importlib.import_module(f"mtbench.data.{name}")
    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"mtbench.data.{mod.name}")


def get_dataset(name: str) -> DatasetSpec:
    """The registered :class:`DatasetSpec` called ``name``.

    Raises:
        MtbenchError: unknown dataset (the message lists the registered ones).
    """
    _load()
    if name not in _DATASETS:
        raise MtbenchError(f"unknown dataset {name!r}; valid: {', '.join(dataset_names())}")
    return _DATASETS[name]


def dataset_names() -> tuple[str, ...]:
    """Every registered dataset name: the built-ins (``synthetic``, ``pascal_context``, ``nyud``), then the others in
    registration order, whichever module a process happened to import first."""
    _load()
    return tuple(sorted(_DATASETS, key=lambda n: _BUILTINS.index(n) if n in _BUILTINS else len(_BUILTINS)))


def resolve_recipe(dataset: str, preset: str | None = None, *, epochs: int | None = None,
                   batch_size: int | None = None, lr: float | None = None, **extra: Any) -> tuple[str, TrainConfig]:
    """``(preset name, TrainConfig)`` of a dataset's preset with command-line overrides applied.

    Raises:
        MtbenchError: unknown dataset or preset, or an override out of range.
    """
    spec = get_dataset(dataset)
    p = spec.preset(preset)
    return p.name, p.resolve(epochs=epochs, batch_size=batch_size, lr=lr, **extra)


# ---------------------------------------------------------------------------------------------------------------
# The recipes shared by the real datasets (MTLoRA's official recipe, mtlora.md §1 "Training recipe")
# ---------------------------------------------------------------------------------------------------------------

#: Source line of the papers' recipe.
PAPER_RECIPE_SOURCE = ("MTLoRA (Agiza et al., CVPR 2024) §4.1 and official code scale-lab/MTLoRA config.py defaults, "
                       "README and issues #2/#4: AdamW wd 0.05, base LR 5e-4 x batch/512, warm-up 20 epochs then "
                       "cosine, 300 epochs, batch 32, grad clip 5, AMP, eval every 5 epochs")


def paper_preset(augment: str = "paper") -> RecipePreset:
    """The papers' recipe: AdamW (wd 0.05; none on norms, biases and relative-position tables), LR 5e-4 x batch/512
    (min 5e-6 x batch/512), 20 warm-up epochs then cosine, 300 epochs, batch 32, gradient clipping 5, AMP on CUDA,
    validation every 5 epochs, the papers' training transforms, and loading set for a GPU (8 workers, pinned
    memory, persistent workers, prefetch 4)."""
    cfg = TrainConfig(epochs=300, batch_size=32, lr=5e-4 * 32 / 512, min_lr=5e-6 * 32 / 512, warmup_epochs=20,
                      weight_decay=0.05, grad_clip=5.0, eval_every=5, num_workers=8, amp=True,
                      no_decay_position_tables=True, augment=augment, pin_memory=True, persistent_workers=True,
                      prefetch_factor=4)
    return RecipePreset("paper", cfg, "the papers' recipe (MTLoRA): 300 epochs, batch 32, LR 5e-4 x batch/512, "
                        "warm-up 20, cosine, wd 0.05, clip 5, AMP, flip + ScaleNRotate", base_lr=5e-4,
                        base_min_lr=5e-6, lr_ref_batch=512, source=PAPER_RECIPE_SOURCE)


def real_embedded_preset() -> RecipePreset:
    """The pre-``--preset`` default of the real datasets: the papers' schedule with a random flip as the only
    augmentation, 4 workers and a fixed learning rate of 5e-4 x 32/512."""
    cfg = TrainConfig(epochs=300, batch_size=32, lr=5e-4 * 32 / 512, min_lr=5e-6 * 32 / 512, warmup_epochs=20,
                      eval_every=5, num_workers=4)
    return RecipePreset("embedded", cfg, "mtbench's default: the papers' schedule, random flip only")


__all__ = ["DatasetSpec", "RecipePreset", "PRESETS", "register_dataset", "get_dataset", "dataset_names",
           "resolve_recipe", "paper_preset", "real_embedded_preset", "PAPER_RECIPE_SOURCE"]
