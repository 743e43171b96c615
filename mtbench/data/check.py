"""``mtbench data check``: is a downloaded dataset complete and readable?

Every split file of the dataset must be present; every sample of every split must have every task's file, readable,
at the image's size and with values in the task's range (the readers' own checks: :func:`mtbench.data.pascal.
read_sample`, :func:`mtbench.data.nyud.read_sample`). The samples are read in worker processes (about 10k files per
split on PASCAL-Context). The dataset spec supplies the work items and the per-sample check
(:attr:`mtbench.datasets.DatasetSpec.check_items` / ``check_item``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mtbench.data import check_data_root
from mtbench.errors import MtbenchError


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Attributes:
        root: the checked directory.
        ids: ``{split: ids listed in its split file}`` (0 when the file is missing).
        counts: ``{split: {column: samples whose file for that column is present and well-formed}}``; columns are
            ``image`` and the dataset's tasks.
        columns: column order.
        expected: ``{split: images}`` of the full download.
        problems: one line per missing or malformed file (or missing split file).
    """

    root: str
    ids: dict[str, int] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def short(self) -> dict[str, tuple[int, int]]:
        """``{split: (ids listed, ids of the full download)}`` for every split that lists fewer ids than the full
        download: a partial or subset download, readable but not the papers' evaluation set."""
        return {s: (self.ids.get(s, 0), n) for s, n in self.expected.items() if self.ids.get(s, 0) < n}


def check_dataset(name: str, root: str | os.PathLike | None, *, workers: int | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Check every split file and every sample of every task of a downloaded dataset.

    Args:
        name: a registered dataset with files (``pascal_context``, ``nyud``).
        root: its directory (None: ``$MTBENCH_DATA/<data_dir>``).
        workers: worker processes (None: one per CPU core, at most 16).
        on_progress: ``callback(samples done, samples total)``.

    Returns:
        :class:`CheckReport` (``report.problems`` empty when everything is fine).

    Raises:
        MtbenchError: unknown dataset, a dataset without files to check, or a root that is not a directory.
    """
    from mtbench.datasets import dataset_names, get_dataset

    if name not in dataset_names():  # the datasets with files, not every registered one, are what is accepted here
        raise MtbenchError(f"unknown dataset {name!r}; valid: {', '.join(_checkable())}")
    spec = get_dataset(name)
    if spec.check_items is None or spec.check_item is None or spec.data_dir is None:
        raise MtbenchError(f"dataset {name!r} is generated, there are no files to check; valid: "
                           + ", ".join(n for n in _checkable()))
    if root is None:
        base = os.environ.get("MTBENCH_DATA")
        if not base:
            raise MtbenchError(f"--data-root is needed (the {spec.data_dir}/ directory), or $MTBENCH_DATA set")
        root = os.path.join(base, spec.data_dir)
    root = Path(root).expanduser()
    check_data_root(root)
    columns = ["image", *spec.tasks]
    report = CheckReport(root=str(root), columns=columns, expected=dict(spec.expected_counts))
    items = []
    for split in spec.expected_counts:
        report.counts[split] = {c: 0 for c in columns}
        try:
            split_items = spec.check_items(root, split)
        except MtbenchError as e:
            report.problems.append(f"{split}: {e}")
            report.ids[split] = 0
            continue
        report.ids[split] = len(split_items)
        items.extend(split_items)
    total = len(items)
    if on_progress is not None:
        on_progress(0, total)
    if items:
        n = max(1, min(workers or min(os.cpu_count() or 1, 16), total))
        chunk = max(1, min(64, total // (4 * n)))
        with ProcessPoolExecutor(max_workers=n) as pool:
            for done, (split, ok, problems) in enumerate(pool.map(spec.check_item, items, chunksize=chunk), 1):
                for c, good in ok.items():
                    report.counts[split][c] += int(good)
                report.problems.extend(problems)
                if on_progress is not None and (done % 16 == 0 or done == total):
                    on_progress(done, total)
    return report


def _checkable() -> list[str]:
    from mtbench.datasets import dataset_names, get_dataset

    return [n for n in dataset_names() if get_dataset(n).check_item is not None]


__all__ = ["CheckReport", "check_dataset"]
