"""Datasets: the embedded synthetic scenes and readers for PASCAL-MT and NYUD-MT.

Every dataset yields dicts in :data:`mtbench.tasks.SAMPLE_FORMAT`; use :func:`build_dataset` to get one by name.
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from mtbench.errors import MtbenchError

#: Default square input size per dataset (the papers use 448 for the real datasets).
DATASET_IMG_SIZE = {"synthetic": 64, "pascal_context": 448, "nyud": 448}
DATASET_NAMES = tuple(DATASET_IMG_SIZE)
#: Valid split names per dataset (``upstream`` is the synthetic split reserved for backbone pretraining).
DATASET_SPLITS = {
    "synthetic": ("train", "val", "test", "upstream"),
    "pascal_context": ("train", "val", "test"),
    "nyud": ("train", "val", "test"),
}


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    tasks: list[str] | tuple[str, ...] | None = None,
    img_size: int | None = None,
    train_aug: bool = False,
    seed: int = 0,
    n: int | None = None,
) -> Dataset:
    """The dataset ``name`` / ``split``, yielding samples in :data:`mtbench.tasks.SAMPLE_FORMAT`.

    Args:
        name: ``synthetic``, ``pascal_context`` or ``nyud``.
        split: ``train``, ``val``, ``test`` (and ``upstream`` for synthetic).
        root: for ``pascal_context`` / ``nyud`` the ``PASCAL_MT`` / ``NYUD_MT`` directory (required; falls back to
            ``$MTBENCH_DATA/PASCAL_MT`` or ``$MTBENCH_DATA/NYUD_MT``); for ``synthetic`` the cache directory
            (default ``$MTBENCH_CACHE/synthetic`` or ``~/.cache/mtbench/synthetic``).
        tasks: task names (None: every task of the dataset).
        img_size: square side ``S`` of images and labels (default :data:`DATASET_IMG_SIZE`\\[name]).
        train_aug: random horizontal flip (normals x negated).
        seed: synthetic generator seed (ignored by the real datasets).
        n: number of samples: the split size for synthetic (default 1600/200/200/4000), the first ``n`` ids of
            the split file for the real datasets (default all).

    Raises:
        MtbenchError: unknown dataset, split or task; missing dataset root, split file or label files.
    """
    if name not in DATASET_IMG_SIZE:
        raise MtbenchError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")
    if split not in DATASET_SPLITS[name]:
        raise MtbenchError(f"unknown split {split!r} for dataset {name!r}; valid: {', '.join(DATASET_SPLITS[name])}")
    size = DATASET_IMG_SIZE[name] if img_size is None else int(img_size)
    if size < 8:
        raise MtbenchError(f"img_size must be >= 8, got {size}")
    if name == "synthetic":
        from mtbench.data.synthetic import SyntheticMultiTask

        return SyntheticMultiTask(
            split, n=n, img_size=size, tasks=tasks, seed=seed, cache_dir=root, train_aug=train_aug
        )
    sub = "PASCAL_MT" if name == "pascal_context" else "NYUD_MT"
    if root is None:
        base = os.environ.get("MTBENCH_DATA")
        if not base:
            raise MtbenchError(f"dataset {name!r} needs a data root (the {sub}/ directory) or $MTBENCH_DATA set")
        root = os.path.join(base, sub)
    if name == "pascal_context":
        from mtbench.data.pascal import PascalMT

        return PascalMT(root, split, tasks=tasks, img_size=size, train_aug=train_aug, n=n)
    from mtbench.data.nyud import NYUDMT

    return NYUDMT(root, split, tasks=tasks, img_size=size, train_aug=train_aug, n=n)


__all__ = ["DATASET_IMG_SIZE", "DATASET_NAMES", "DATASET_SPLITS", "build_dataset"]
