"""NYUD-MT reader: NYU Depth v2 (795 train / 654 val) with the multi-task labels used by ASTMT / MTI-Net.

Expected layout under ``root`` (the extracted ``NYUD_MT/`` directory)::

    images/{id}.jpg (or .png)       RGB image
    gt_sets/{train,val}.txt         split files, one id per line
    segmentation/{id}.png           40 classes stored as 1..40, 0 = unlabelled
    depth/{id}.npy                  float [H,W] (or [H,W,1]) metres, 0 = missing
    normals/{id}.npy                float [H,W,3] in [-1, 1]
    edge/{id}.npy                   [H,W] (or [H,W,1]) 0/1 boundary mask

Decoding (per :data:`mtbench.tasks.SAMPLE_FORMAT`): segmentation ``0 -> 255`` (ignore) and ``k -> k - 1`` (so
classes are 0..39; a stored 255 stays 255); depth ``0`` or non-finite -> 255; normals with norm < 0.1 or
non-finite -> 255 in all channels; edge ``> 0.5 -> 1`` (a stored 255 stays 255).

Resizing to ``img_size x img_size`` (448 by default, aspect ratio not kept): image and normals bicubic (normals
renormalised), segmentation, depth and edge nearest-neighbour (depth is not interpolated so that missing values
never blend into valid ones).

Splits: ``train`` reads ``train.txt``; ``test`` reads ``val.txt`` (the set the papers report on); ``val`` reads
``gt_sets/val_select.txt`` if the user provides one, else ``val.txt`` too (model selection on the reported set, as
in the papers).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mtbench.data.transforms import check_split_and_tasks, read_split_file, resize_image, resize_nearest, resize_normals, to_sample
from mtbench.errors import MtbenchError
from mtbench.tasks import IGNORE_INDEX

#: Tasks NYUD-MT provides.
TASKS = ("semseg", "depth", "normals", "edge")
SPLITS = ("train", "val", "test")
NUM_CLASSES = 40

_DIRS = {
    "semseg": ("segmentation", ".png"),
    "depth": ("depth", ".npy"),
    "normals": ("normals", ".npy"),
    "edge": ("edge", ".npy"),
}


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except Exception as e:
        raise MtbenchError(f"cannot read {path}: {e}") from e


def _squeeze_hw(a: np.ndarray) -> np.ndarray:
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


class NYUDMT(Dataset):
    """NYUD-MT samples in :data:`mtbench.tasks.SAMPLE_FORMAT`.

    Args:
        root: the ``NYUD_MT`` directory (layout in the module docstring).
        split: ``train``, ``val`` or ``test``.
        tasks: subset of :data:`TASKS` (None: all). Only the files of requested tasks are checked and opened.
        img_size: side ``S`` of the square output (default 448).
        train_aug: random horizontal flip (p = 0.5; normals x negated).
        n: keep only the first ``n`` ids of the split; None for all.

    Items: ``image`` float32 [3,S,S]; ``semseg`` int64 [S,S] (0..39, 255 ignore); ``depth`` float32 [1,S,S] metres
    (255 invalid); ``normals`` float32 [3,S,S]; ``edge`` float32 [1,S,S]; ``meta`` ``{"id", "size": (H0, W0)}``.

    Raises:
        MtbenchError: unknown split/task, missing root or split file, or a required file missing for some id
            (checked once at construction; the message names the first missing path).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        tasks: list[str] | tuple[str, ...] | None = None,
        img_size: int = 448,
        train_aug: bool = False,
        n: int | None = None,
    ):
        self.tasks = check_split_and_tasks("nyud", split, SPLITS, tasks, TASKS)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise MtbenchError(f"NYUD_MT root not found: {self.root}")
        sets = self.root / "gt_sets"
        if split == "train":
            split_file = sets / "train.txt"
        elif split == "val" and (sets / "val_select.txt").exists():
            split_file = sets / "val_select.txt"
        else:
            split_file = sets / "val.txt"
        if not split_file.is_file():
            raise MtbenchError(f"NYUD_MT split file not found: {split_file}")
        ids = read_split_file(split_file)
        if n is not None:
            ids = ids[: int(n)]
        if not ids:
            raise MtbenchError(f"NYUD_MT split file {split_file} lists no ids")
        self.split, self.img_size, self.train_aug, self.ids = split, int(img_size), bool(train_aug), ids
        self._images: list[Path] = []
        missing, first = 0, None
        for sid in ids:
            img = self.root / "images" / f"{sid}.jpg"
            if not img.exists():
                img = self.root / "images" / f"{sid}.png"
            self._images.append(img)
            for p in [img] + [self._path(t, sid) for t in self.tasks]:
                if not p.exists():
                    missing += 1
                    first = first or p
        if missing:
            raise MtbenchError(f"NYUD_MT: {missing} file(s) missing for split {split!r}, first: {first}")

    def _path(self, task: str, sid: str) -> Path:
        d, ext = _DIRS[task]
        return self.root / d / f"{sid}{ext}"

    def __len__(self) -> int:
        return len(self.ids)

    def load_raw(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Image uint8 [H0,W0,3] and decoded labels at the stored resolution (before resizing)."""
        sid = self.ids[i]
        img = np.asarray(Image.open(self._images[i]).convert("RGB"))
        labels: dict[str, np.ndarray] = {}
        for t in self.tasks:
            path = self._path(t, sid)
            if t == "semseg":
                s = np.asarray(Image.open(path)).astype(np.int64)
                s = _squeeze_hw(s)
                labels[t] = np.where((s == 0) | (s == IGNORE_INDEX), IGNORE_INDEX, s - 1).astype(np.uint8)
            elif t == "depth":
                d = _squeeze_hw(_load_npy(path)).astype(np.float32)
                labels[t] = np.where(np.isfinite(d) & (d > 0), d, IGNORE_INDEX).astype(np.float32)
            elif t == "normals":
                nrm = _load_npy(path).astype(np.float32)
                if nrm.ndim != 3 or nrm.shape[-1] != 3:
                    raise MtbenchError(f"{path}: expected normals of shape [H,W,3], got {list(nrm.shape)}")
                bad = ~np.isfinite(nrm).all(-1)
                nrm = np.where(bad[..., None], 0.0, nrm)
                bad |= np.linalg.norm(nrm, axis=-1) < 0.1
                nrm[bad] = IGNORE_INDEX
                labels[t] = nrm
            elif t == "edge":
                e = _squeeze_hw(_load_npy(path)).astype(np.float32)
                labels[t] = np.where(e == IGNORE_INDEX, IGNORE_INDEX, (e > 0.5).astype(np.float32))
        for t, v in labels.items():
            if v.shape[:2] != img.shape[:2]:
                raise MtbenchError(f"NYUD_MT {t} label of {sid} has size {v.shape[:2]}, image has {img.shape[:2]}")
        return img, labels

    def __getitem__(self, i: int) -> dict:
        img, labels = self.load_raw(i)
        S = self.img_size
        out = {t: resize_normals(v, S) if t == "normals" else resize_nearest(v, S) for t, v in labels.items()}
        meta = {"id": self.ids[i], "size": (int(img.shape[0]), int(img.shape[1]))}
        return to_sample(resize_image(img, S), out, meta, self.train_aug)
