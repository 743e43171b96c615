"""Datasets: the embedded synthetic scenes and readers for PASCAL-MT and NYUD-MT.

Every dataset module here registers a :class:`mtbench.datasets.DatasetSpec` (its tasks, setting, presets, references
and reader); :func:`build_dataset` builds any of them by name. Every dataset yields dicts in
:data:`mtbench.tasks.SAMPLE_FORMAT`.

:class:`SafeDataset` and :func:`safe_collate` turn a sample that cannot be read into one error line that names the
file and the sample index, also when the sample is read in a DataLoader worker process (the error travels inside
the batch and :func:`raise_batch_error` raises it in the main process, so no worker traceback is printed).
"""

from __future__ import annotations

import os

from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from mtbench.errors import MtbenchError

#: Key under which a batch carries a data error from a worker.
BATCH_ERROR_KEY = "__data_error__"


def check_data_root(root: str | os.PathLike | None) -> None:
    """Fail before any work when a given data root (``--data-root``) is not a directory; None (the default root) is
    checked where it is resolved.

    Raises:
        MtbenchError: ``data root not found: 'ROOT'``, or a file given as the root.
    """
    if root is not None and os.path.isfile(root):
        raise MtbenchError(f"data root {str(root)!r} is a file; give the dataset's directory")
    if root is not None and not os.path.isdir(root):
        raise MtbenchError(f"data root not found: {str(root)!r}")


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    tasks: list[str] | tuple[str, ...] | None = None,
    img_size: int | None = None,
    train_aug: bool | str = False,
    seed: int = 0,
    n: int | None = None,
    label_resolution: str = "resized",
) -> Dataset:
    """The dataset ``name`` / ``split``, yielding samples in :data:`mtbench.tasks.SAMPLE_FORMAT`.

    Args:
        name: a registered dataset (``synthetic``, ``pascal_context``, ``nyud``).
        split: one of the dataset's splits (``train``, ``val``, ``test``; ``upstream`` for synthetic).
        root: for the real datasets the downloaded directory (``PASCAL_MT`` / ``NYUD_MT``; falls back to
            ``$MTBENCH_DATA/<dir>``); for ``synthetic`` the cache directory (default ``$MTBENCH_CACHE/synthetic``
            or ``~/.cache/mtbench/synthetic``).
        tasks: task names (None: every task of the dataset).
        img_size: square side ``S`` of images (and labels, unless ``label_resolution='original'``); default the
            spec's.
        train_aug: ``False``/``None`` (none), ``True`` or ``"flip"`` (random horizontal flip, normals x negated),
            ``"paper"`` (flip, then ScaleNRotate with the dataset's ranges; real datasets only).
        seed: synthetic generator seed (ignored by the real datasets).
        n: number of samples: the split size for synthetic, the first ``n`` ids of the split file for the real
            datasets (default all).
        label_resolution: ``resized`` (labels at ``S x S``, MTLoRA's evaluation) or ``original`` (labels at the
            stored resolution, the older literature's evaluation; real datasets only).

    Raises:
        MtbenchError: unknown dataset, split, task, augmentation or label resolution; missing data root, split file
            or label files.
    """
    from mtbench.datasets import get_dataset

    spec = get_dataset(name)
    if split not in spec.splits:
        raise MtbenchError(f"unknown split {split!r} for dataset {name!r}; valid: {', '.join(spec.splits)}")
    size = spec.img_size if img_size is None else int(img_size)
    if size < 8:
        raise MtbenchError(f"img_size must be >= 8, got {size}")
    augment = train_aug if isinstance(train_aug, str) else ("flip" if train_aug else None)
    if augment not in (None, "flip", "paper"):
        raise MtbenchError(f"unknown augmentation {augment!r}; valid: flip, paper")
    if label_resolution not in ("resized", "original"):
        raise MtbenchError(f"unknown label resolution {label_resolution!r}; valid: resized, original")
    if spec.data_dir is not None and root is None:
        base = os.environ.get("MTBENCH_DATA")
        if not base:
            raise MtbenchError(f"dataset {name!r} needs a data root (the {spec.data_dir}/ directory) or $MTBENCH_DATA "
                               "set")
        root = os.path.join(base, spec.data_dir)
    return spec.reader(root, split, tasks=tasks, img_size=size, augment=augment, n=n,
                       label_resolution=label_resolution, seed=seed)


class SafeDataset(Dataset):
    """Wraps a dataset so that a sample that fails to load becomes an error record instead of an exception.

    ``dataset[i]`` that raises becomes ``{BATCH_ERROR_KEY: "sample i (id ...): <message>"}``; the message of
    an :class:`MtbenchError` from the readers names the file. :func:`safe_collate` keeps such a record as the whole
    batch and :func:`raise_batch_error` raises it in the process that consumes the batch.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except Exception as e:  # noqa: BLE001 - every failure becomes one line in the main process
            ids = getattr(self.dataset, "ids", None)
            sid = f" (id {ids[i]})" if ids is not None and 0 <= i < len(ids) else ""
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, MtbenchError):
                msg = f"{type(e).__name__}: {msg}"
            return {BATCH_ERROR_KEY: f"{type(self.dataset).__name__} sample {i}{sid}: {msg}"}


def safe_collate(samples: list):
    """``default_collate``, except that a batch with a failed sample becomes ``{BATCH_ERROR_KEY: message}``."""
    for s in samples:
        if isinstance(s, dict) and BATCH_ERROR_KEY in s:
            return {BATCH_ERROR_KEY: s[BATCH_ERROR_KEY]}
    return default_collate(samples)


def raise_batch_error(batch) -> None:
    """Raise the data error a batch carries, if any.

    Raises:
        MtbenchError: ``batch`` is an error record from :func:`safe_collate` (the one-line message names the file
            and the sample index).
    """
    if isinstance(batch, dict) and BATCH_ERROR_KEY in batch:
        raise MtbenchError(f"cannot load data: {batch[BATCH_ERROR_KEY]}")
