"""PASCAL-MT reader: PASCAL-Context with the multi-task labels of ASTMT (Maninis et al., CVPR 2019).

Expected layout under ``root`` (the extracted ``PASCAL_MT/`` directory, as used by ASTMT, MTI-Net and MTLoRA)::

    JPEGImages/{id}.jpg                       RGB image
    ImageSets/Context/{train,val}.txt         split files, one id per line
    semseg/VOC12/{id}.png                     semseg, uint8 0..20, 255 = ignore ...
    semseg/pascal-context/{id}.png            ... used when the VOC12 file is absent
    human_parts/{id}.mat                      variable ``anno`` (see below)
    sal_distill/{id}.png                      saliency, grey value / 255 > 0.5 -> 1
    normals_distill/{id}.png                  normals, RGB v -> 2 v / 255 - 1
    pascal-context/trainval/{id}.mat          variable ``LabelMap`` (459-class context labels), for edges

Decoding (per :data:`mtbench.tasks.SAMPLE_FORMAT`):

* ``human_parts``: ``anno`` is either the PASCAL-Part structure shipped with PASCAL_MT (``anno.objects[k]`` with
  ``class_ind`` and ``parts[j].part_name`` / ``parts[j].mask``; parts of person objects, ``class_ind == 15``, are
  mapped to 6 body parts by :data:`HUMAN_PART_MAP`, later parts overwriting earlier ones, everything else 0) or, as
  a simplification for custom data, a 2-D integer array that already holds the part map (0..6, 255 ignore). As in
  ASTMT, an image whose map has no part pixel at all (no person, or persons without part annotation) is ignored
  entirely (all 255).
* ``normals``: ``2 v / 255 - 1``; vectors with norm < 0.1 (mid-grey) are invalid (255). ASTMT further restricts
  normals to NYU-compatible context classes through the ``LabelMap``; its class lists are not part of PASCAL_MT,
  so that mask is only applied when ``normals_valid_classes`` (LabelMap values) is given.
* ``edge``: 1 where the ``LabelMap`` value differs from the right or lower neighbour (a one-pixel line; ASTMT uses
  a Laplacian followed by thinning, which gives nearly the same line), computed at full resolution.

Everything is resized to ``img_size x img_size`` (448 by default, aspect ratio not kept, as in MTLoRA): the image
and normals bicubically (normals renormalised), label maps nearest-neighbour.

Splits: PASCAL-Context has no separate test set; the papers train on ``train`` and report on ``val``. Here
``train`` reads ``train.txt``, ``test`` reads ``val.txt`` (the reported numbers), and ``val`` (used for checkpoint
selection) reads ``ImageSets/Context/val_select.txt`` if the user provides one, else ``val.txt`` too (then model
selection happens on the reported set, exactly as in the papers).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from torch.utils.data import Dataset

from mtbench.data.transforms import check_split_and_tasks, read_split_file, resize_image, resize_nearest, resize_normals, to_sample
from mtbench.errors import MtbenchError
from mtbench.tasks import IGNORE_INDEX

#: Tasks PASCAL-MT provides.
TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
SPLITS = ("train", "val", "test")

#: PASCAL-Part person part names -> the 6 parts of :data:`mtbench.tasks.PASCAL_PART_CLASSES`
#: (1 head, 2 torso, 3 upper arm, 4 lower arm, 5 upper leg, 6 lower leg).
HUMAN_PART_MAP = {
    **{n: 1 for n in ("head", "hair", "leye", "reye", "lear", "rear", "lebrow", "rebrow", "nose", "mouth")},
    **{n: 2 for n in ("torso", "neck")},
    **{n: 3 for n in ("luarm", "ruarm")},
    **{n: 4 for n in ("llarm", "rlarm", "lhand", "rhand")},
    **{n: 5 for n in ("luleg", "ruleg")},
    **{n: 6 for n in ("llleg", "rlleg", "lfoot", "rfoot")},
}
PERSON_CLASS_IND = 15


def _task_path(root: Path, task: str, sid: str) -> Path:
    if task == "semseg":
        p = root / "semseg" / "VOC12" / f"{sid}.png"
        return p if p.exists() else root / "semseg" / "pascal-context" / f"{sid}.png"
    return {
        "human_parts": root / "human_parts" / f"{sid}.mat",
        "sal": root / "sal_distill" / f"{sid}.png",
        "normals": root / "normals_distill" / f"{sid}.png",
        "edge": root / "pascal-context" / "trainval" / f"{sid}.mat",
    }[task]


def _as_list(x) -> list:
    """A MATLAB struct array loaded with ``squeeze_me=True`` as a list (it may be a scalar struct or an array)."""
    if x is None:
        return []
    if isinstance(x, np.ndarray):
        return list(x.ravel())
    return [x]


def decode_human_parts(anno, shape: tuple[int, int]) -> np.ndarray:
    """Part map uint8 [H,W] (0 background, 1..6 parts, all 255 when the image has no part pixel).

    Args:
        anno: the ``anno`` variable of a ``human_parts/{id}.mat`` file loaded with
            ``scipy.io.loadmat(..., squeeze_me=True, struct_as_record=False)``: a PASCAL-Part struct or a 2-D
            integer part map.
        shape: image size ``(H, W)``, used for the structure form.

    Raises:
        MtbenchError: ``anno`` is neither form, or a mask/map does not match ``shape``.
    """
    if isinstance(anno, np.ndarray) and anno.ndim == 2 and anno.dtype.kind in "uif":
        parts = anno.astype(np.int64)
        parts = np.where((parts >= 0) & (parts <= 6), parts, IGNORE_INDEX).astype(np.uint8)
    elif hasattr(anno, "objects") or (isinstance(anno, np.ndarray) and anno.dtype == object and anno.size == 1):
        a = anno if hasattr(anno, "objects") else anno.item()
        parts = np.zeros(shape, dtype=np.uint8)
        for obj in _as_list(getattr(a, "objects", None)):
            if int(np.asarray(getattr(obj, "class_ind", -1))) != PERSON_CLASS_IND:
                continue
            for part in _as_list(getattr(obj, "parts", None)):
                label = HUMAN_PART_MAP.get(str(getattr(part, "part_name", "")))
                mask = np.asarray(getattr(part, "mask", np.zeros(0)))
                if label is None or mask.size == 0:
                    continue
                if mask.shape != tuple(shape):
                    raise MtbenchError(f"human-parts mask of shape {mask.shape} does not match image {tuple(shape)}")
                parts[mask > 0] = label
    else:
        raise MtbenchError(f"unsupported human_parts 'anno' of type {type(anno).__name__}")
    if parts.shape != tuple(shape):
        raise MtbenchError(f"human-parts map of shape {parts.shape} does not match image {tuple(shape)}")
    if not ((parts > 0) & (parts != IGNORE_INDEX)).any():
        parts = np.full(shape, IGNORE_INDEX, dtype=np.uint8)
    return parts


def label_edges(labels: np.ndarray) -> np.ndarray:
    """One-pixel boundary mask uint8 [H,W]: 1 where a label differs from its right or lower neighbour."""
    e = np.zeros(labels.shape, dtype=bool)
    e[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    e[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return e.astype(np.uint8)


def _loadmat_var(path: Path, var: str):
    try:
        m = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as e:
        raise MtbenchError(f"cannot read {path}: {e}") from e
    if var not in m:
        raise MtbenchError(f"{path} has no variable {var!r}")
    return m[var]


class PascalMT(Dataset):
    """PASCAL-MT (PASCAL-Context multi-task) samples in :data:`mtbench.tasks.SAMPLE_FORMAT`.

    Args:
        root: the ``PASCAL_MT`` directory (layout in the module docstring).
        split: ``train``, ``val`` or ``test`` (see the module docstring for the files each reads).
        tasks: subset of :data:`TASKS` (None: all). Only the files of requested tasks are checked and opened.
        img_size: side ``S`` of the square output (default 448).
        train_aug: random horizontal flip (p = 0.5; normals x negated).
        n: keep only the first ``n`` ids of the split (smoke tests); None for all.
        normals_valid_classes: ``LabelMap`` values on which normals are valid (others 255); None: no mask.

    Items: ``image`` float32 [3,S,S]; ``semseg``, ``human_parts`` int64 [S,S]; ``sal``, ``edge`` float32 [1,S,S];
    ``normals`` float32 [3,S,S]; ``meta`` ``{"id": id, "size": (H0, W0)}`` (size of the stored JPEG).

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
        normals_valid_classes: Collection[int] | None = None,
    ):
        self.tasks = check_split_and_tasks("pascal_context", split, SPLITS, tasks, TASKS)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise MtbenchError(f"PASCAL_MT root not found: {self.root}")
        sets = self.root / "ImageSets" / "Context"
        if split == "train":
            split_file = sets / "train.txt"
        elif split == "val" and (sets / "val_select.txt").exists():
            split_file = sets / "val_select.txt"
        else:
            split_file = sets / "val.txt"
        if not split_file.is_file():
            raise MtbenchError(f"PASCAL_MT split file not found: {split_file}")
        ids = read_split_file(split_file)
        if n is not None:
            ids = ids[: int(n)]
        if not ids:
            raise MtbenchError(f"PASCAL_MT split file {split_file} lists no ids")
        self.split, self.img_size, self.train_aug = split, int(img_size), bool(train_aug)
        self.normals_valid_classes = None if normals_valid_classes is None else np.asarray(list(normals_valid_classes))
        self.ids = ids
        self._check_files()

    def _check_files(self) -> None:
        missing, first = 0, None
        for sid in self.ids:
            paths = [self.root / "JPEGImages" / f"{sid}.jpg"] + [_task_path(self.root, t, sid) for t in self.tasks]
            if self.normals_valid_classes is not None and "normals" in self.tasks:
                paths.append(_task_path(self.root, "edge", sid))
            for p in paths:
                if not p.exists():
                    missing += 1
                    first = first or p
        if missing:
            raise MtbenchError(f"PASCAL_MT: {missing} file(s) missing for split {self.split!r}, first: {first}")

    def __len__(self) -> int:
        return len(self.ids)

    def load_raw(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Image uint8 [H0,W0,3] and labels at the stored resolution (decoded, before resizing)."""
        sid = self.ids[i]
        img = np.asarray(Image.open(self.root / "JPEGImages" / f"{sid}.jpg").convert("RGB"))
        shape = img.shape[:2]
        labels: dict[str, np.ndarray] = {}
        label_map = None
        if "edge" in self.tasks or (self.normals_valid_classes is not None and "normals" in self.tasks):
            label_map = np.asarray(_loadmat_var(_task_path(self.root, "edge", sid), "LabelMap"))
        for t in self.tasks:
            path = _task_path(self.root, t, sid)
            if t == "semseg":
                labels[t] = np.asarray(Image.open(path)).astype(np.uint8)
            elif t == "human_parts":
                labels[t] = decode_human_parts(_loadmat_var(path, "anno"), shape)
            elif t == "sal":
                labels[t] = (np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0 > 0.5).astype(
                    np.float32
                )
            elif t == "normals":
                v = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
                nrm = 2.0 * v / 255.0 - 1.0
                invalid = np.linalg.norm(nrm, axis=-1) < 0.1
                if self.normals_valid_classes is not None:
                    invalid |= ~np.isin(label_map, self.normals_valid_classes)
                nrm[invalid] = IGNORE_INDEX
                labels[t] = nrm
            elif t == "edge":
                labels[t] = label_edges(label_map).astype(np.float32)
        for t, v in labels.items():
            if v.shape[:2] != shape:
                raise MtbenchError(f"PASCAL_MT {t} label of {sid} has size {v.shape[:2]}, image has {shape}")
        return img, labels

    def __getitem__(self, i: int) -> dict:
        img, labels = self.load_raw(i)
        S = self.img_size
        out = {}
        for t, v in labels.items():
            out[t] = resize_normals(v, S) if t == "normals" else resize_nearest(v, S)
        meta = {"id": self.ids[i], "size": (int(img.shape[0]), int(img.shape[1]))}
        return to_sample(resize_image(img, S), out, meta, self.train_aug)
