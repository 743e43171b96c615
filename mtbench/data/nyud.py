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

Training transforms: ``augment='paper'`` applies MTLoRA's NYUD pipeline (random flip, then ScaleNRotate with no
rotation and a scale drawn from {1, 1.2, 1.5}, depth divided by the scale; :data:`SCALE_ROTATE`), ``flip`` only the
flip. Resizing to ``img_size x img_size`` (448 by default, aspect ratio not kept): image and normals bicubic (normals
renormalised), segmentation, depth and edge nearest-neighbour (depth is not interpolated so that missing values
never blend into valid ones). ``label_resolution='original'`` keeps the labels at the stored size.

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

from mtbench.data.transforms import ScaleNRotate, check_split_and_tasks, finish_sample, split_check_items, read_split_file
from mtbench.errors import MtbenchError
from mtbench.tasks import IGNORE_INDEX

#: Tasks NYUD-MT provides.
TASKS = ("semseg", "depth", "normals", "edge")
SPLITS = ("train", "val", "test")
NUM_CLASSES = 40
#: Split files of the download and their published sizes (NYU Depth v2, Silberman et al. ECCV 2012).
SPLIT_FILES = {"train": "train.txt", "val": "val.txt"}
EXPECTED_COUNTS = {"train": 795, "val": 654}
#: MTLoRA's NYUD training ScaleNRotate (``data/mtl_ds.py::get_transformations``): no rotation, zoom 1, 1.2 or 1.5.
SCALE_ROTATE = ScaleNRotate(rotation_choices=(0.0,), scale_choices=(1.0, 1.2, 1.5), depth_divide=True)

_DIRS = {
    "semseg": ("segmentation", ".png"),
    "depth": ("depth", ".npy"),
    "normals": ("normals", ".npy"),
    "edge": ("edge", ".npy"),
}


def _err(path: Path, e: Exception) -> MtbenchError:
    return MtbenchError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise MtbenchError(f"missing file {path}")
    try:
        return np.load(path)
    except Exception as e:
        raise _err(path, e) from e


def _squeeze_hw(a: np.ndarray) -> np.ndarray:
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


def image_path(root: Path, sid: str) -> Path:
    """``images/{id}.jpg``, or ``.png`` when only that exists."""
    p = root / "images" / f"{sid}.jpg"
    return p if p.exists() or not (root / "images" / f"{sid}.png").exists() else root / "images" / f"{sid}.png"


def task_path(root: Path, task: str, sid: str) -> Path:
    d, ext = _DIRS[task]
    return root / d / f"{sid}{ext}"


def read_sample(root: Path, sid: str, tasks, image: np.ndarray | None = None):
    """Image uint8 ``[H,W,3]`` and decoded labels (module docstring) of one sample at the stored resolution.

    Raises:
        MtbenchError: a missing or unreadable file, a label whose size differs from the image, or label values
            out of range; the message names the file.
    """
    if image is None:
        path = image_path(root, sid)
        if not path.is_file():
            raise MtbenchError(f"missing file {path}")
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise _err(path, e) from e
    shape = image.shape[:2]
    labels: dict[str, np.ndarray] = {}
    for t in tasks:
        path = task_path(root, t, sid)
        if t == "semseg":
            if not path.is_file():
                raise MtbenchError(f"missing file {path}")
            try:
                with Image.open(path) as im:
                    s = _squeeze_hw(np.asarray(im)).astype(np.int64)
            except Exception as e:
                raise _err(path, e) from e
            if s.ndim != 2:
                raise MtbenchError(f"{path}: segmentation must be a single-channel PNG, got shape {list(s.shape)}")
            bad = (s > NUM_CLASSES) & (s != IGNORE_INDEX)
            if bad.any():
                raise MtbenchError(f"{path}: segmentation values must be 0..{NUM_CLASSES} or 255, found "
                                   f"{int(s[bad].max())}")
            v = np.where((s == 0) | (s == IGNORE_INDEX), IGNORE_INDEX, s - 1).astype(np.uint8)
        elif t == "depth":
            d = _squeeze_hw(_load_npy(path)).astype(np.float32)
            if d.ndim != 2:
                raise MtbenchError(f"{path}: depth must be [H,W] or [H,W,1], got {list(d.shape)}")
            if (np.isfinite(d) & (d < 0)).any():
                raise MtbenchError(f"{path}: depth must be >= 0 metres, found {float(d[np.isfinite(d)].min())}")
            v = np.where(np.isfinite(d) & (d > 0), d, IGNORE_INDEX).astype(np.float32)
        elif t == "normals":
            nrm = _load_npy(path).astype(np.float32)
            if nrm.ndim != 3 or nrm.shape[-1] != 3:
                raise MtbenchError(f"{path}: expected normals of shape [H,W,3], got {list(nrm.shape)}")
            bad = ~np.isfinite(nrm).all(-1)
            nrm = np.where(bad[..., None], 0.0, nrm)
            bad |= np.linalg.norm(nrm, axis=-1) < 0.1
            nrm[bad] = IGNORE_INDEX
            v = nrm
        else:  # edge
            e = _squeeze_hw(_load_npy(path)).astype(np.float32)
            if e.ndim != 2:
                raise MtbenchError(f"{path}: edge must be [H,W] or [H,W,1], got {list(e.shape)}")
            v = np.where(e == IGNORE_INDEX, IGNORE_INDEX, (e > 0.5).astype(np.float32))
        if tuple(v.shape[:2]) != tuple(shape):
            raise MtbenchError(f"{path} has size {v.shape[0]}x{v.shape[1]}, its image has {shape[0]}x{shape[1]}")
        labels[t] = v
    return image, labels


class NYUDMT(Dataset):
    """NYUD-MT samples in :data:`mtbench.tasks.SAMPLE_FORMAT`.

    Args:
        root: the ``NYUD_MT`` directory (layout in the module docstring).
        split: ``train``, ``val`` or ``test``.
        tasks: subset of :data:`TASKS` (None: all). Only the files of requested tasks are checked and opened.
        img_size: side ``S`` of the square output (default 448).
        train_aug: random horizontal flip (p = 0.5; normals x negated); same as ``augment='flip'``.
        n: keep only the first ``n`` ids of the split; None for all.
        augment: None, ``flip`` or ``paper`` (flip + :data:`SCALE_ROTATE`).
        label_resolution: ``resized`` (labels ``S x S``) or ``original`` (labels at the stored size).

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
        augment: str | None = None,
        label_resolution: str = "resized",
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
        if n is not None and int(n) > len(ids):
            raise MtbenchError(f"NYUD_MT split {split!r} has {len(ids)} images ({split_file}); asked for the first "
                               f"{int(n)}")
        if n is not None:
            ids = ids[: int(n)]
        if not ids:
            raise MtbenchError(f"NYUD_MT split file {split_file} lists no ids")
        self.split, self.img_size, self.ids = split, int(img_size), ids
        self.augment = augment if augment is not None else ("flip" if train_aug else None)
        self.label_resolution = label_resolution
        self._images: list[Path] = []
        missing, first = 0, None
        for sid in ids:
            img = image_path(self.root, sid)
            self._images.append(img)
            for p in [img] + [task_path(self.root, t, sid) for t in self.tasks]:
                if not p.exists():
                    missing += 1
                    first = first or p
        if missing:
            raise MtbenchError(f"NYUD_MT: {missing} file(s) missing for split {split!r}, first: {first}")

    def __len__(self) -> int:
        return len(self.ids)

    def load_raw(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Image uint8 [H0,W0,3] and decoded labels at the stored resolution (before resizing)."""
        return read_sample(self.root, self.ids[i], self.tasks)

    def __getitem__(self, i: int) -> dict:
        img, labels = self.load_raw(i)
        meta = {"id": self.ids[i], "size": (int(img.shape[0]), int(img.shape[1]))}
        return finish_sample(img, labels, meta, self.img_size, augment=self.augment, scale_rotate_cfg=SCALE_ROTATE,
                             label_resolution=self.label_resolution)


# ------------------------------------------------------------------------------------------------------------------
# mtbench data check and the dataset spec
# ------------------------------------------------------------------------------------------------------------------


def check_items(root, split: str) -> list[tuple[str, str, str]]:
    """Work items ``(root, split, id)`` of one split file for ``mtbench data check``.

    Raises:
        MtbenchError: the split file is missing or lists no ids.
    """
    return split_check_items(root, split, Path(root) / "gt_sets" / SPLIT_FILES[split])


def check_item(item: tuple[str, str, str]) -> tuple[str, dict[str, bool], list[str]]:
    """Read every task of one sample: ``(split, {task: readable and well-formed}, [problem lines])``."""
    root, split, sid = item
    root = Path(root)
    ok: dict[str, bool] = {}
    problems: list[str] = []
    img = None
    try:
        img, _ = read_sample(root, sid, ())
        ok["image"] = True
    except MtbenchError as e:
        ok["image"] = False
        problems.append(f"{split} {sid}: {e}")
    for t in TASKS:
        try:
            if img is not None:
                read_sample(root, sid, (t,), image=img)
            elif t == "semseg":
                p = task_path(root, t, sid)
                if not p.is_file():
                    raise MtbenchError(f"missing file {p}")
            else:
                _load_npy(task_path(root, t, sid))
            ok[t] = True
        except MtbenchError as e:
            ok[t] = False
            problems.append(f"{split} {sid}: {e}")
    return split, ok, problems


def _read(root, split, *, tasks=None, img_size=448, augment=None, n=None, label_resolution="resized", seed=0):
    return NYUDMT(root, split, tasks=tasks, img_size=img_size, n=n, augment=augment,
                  label_resolution=label_resolution)


def _register() -> None:
    from mtbench.datasets import DatasetSpec, paper_preset, real_embedded_preset, register_dataset

    register_dataset(DatasetSpec(
        name="nyud",
        title="NYUD-v2 (NYUD_MT, ASTMT's multi-task labels)",
        tasks={"semseg": tuple(f"class_{i}" for i in range(NUM_CLASSES)), "depth": (), "normals": (), "edge": ()},
        default_tasks=("semseg", "depth", "normals"),
        splits=SPLITS,
        backbone="swin_tiny_patch4_window7_224",
        img_size=448,
        presets={"embedded": real_embedded_preset(), "paper": paper_preset()},
        reader=_read,
        references={"normals": 22.43, "depth": 0.814, "semseg": 36.73},
        reference_source=(
            "TDSS (AAAI 2026) Table 2, 'Single-task' row (shared/papers/003): normals mean angular error 22.43 "
            "(degrees), depth 0.814, semseg mIoU 36.73 (%). The depth column is an error in metres (its header is "
            "garbled in our copy; the values 0.59-0.86 are in the range of NYUD depth RMSE), compared with mtbench's "
            "depth 'rmse' (pixel-pooled, MTLoRA's DepthMeter). TDSS's text says 19-class semseg and 765 training "
            "images; mtbench uses ASTMT's 40 classes and 795 images, so treat these references as approximate"),
        data_dir="NYUD_MT",
        published="NYUD_MT.tgz, Google Drive id 14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw (ASTMT / MTLoRA data/mtl_ds.py)",
        expected_counts=dict(EXPECTED_COUNTS),
        check_items=check_items,
        check_item=check_item,
    ))


_register()
