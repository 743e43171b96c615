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
* ``normals``: ``2 v / 255 - 1``; vectors with norm < 0.1 (mid-grey) are invalid (255). As in ASTMT / MTLoRA,
  normals are only valid on the NYU-compatible context classes of the ``LabelMap`` (:func:`normals_valid_classes`:
  the class names in both ASTMT lists, shipped in ``mtbench/assets/pascal_normals_classes.json`` with their source,
  except ``unknown``, plus ``tvmonitor``). The mask is on by default (``normals_mask=True``).
* ``edge``: ``thin(|Laplacian(LabelMap)| > 0)`` at full resolution (:func:`mtbench.data.transforms.label_edges`),
  as ASTMT / MTLoRA.

Training transforms: ``augment='paper'`` applies MTLoRA's PASCAL pipeline (random flip, then ScaleNRotate with
rotation U(-20, 20) degrees and scale U(0.75, 1.25), normals rotated; :data:`SCALE_ROTATE`), ``flip`` only the
flip. Then everything is resized to ``img_size x img_size`` (448 by default, aspect ratio not kept, as in MTLoRA):
the image and normals bicubically (normals renormalised), label maps nearest-neighbour. With
``label_resolution='original'`` the labels keep their stored size (evaluation at the original resolution).

Splits: PASCAL-Context has no separate test set; the papers train on ``train`` and report on ``val``. Here
``train`` reads ``train.txt``, ``test`` reads ``val.txt`` (the reported numbers), and ``val`` (used for checkpoint
selection) reads ``ImageSets/Context/val_select.txt`` if the user provides one, else ``val.txt`` too (then model
selection happens on the reported set, exactly as in the papers).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Collection
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from torch.utils.data import Dataset

from mtbench.data.transforms import ScaleNRotate, check_split_and_tasks, finish_sample, split_check_items, label_edges, read_split_file
from mtbench.errors import MtbenchError
from mtbench.tasks import IGNORE_INDEX

#: Tasks PASCAL-MT provides.
TASKS = ("semseg", "human_parts", "sal", "normals", "edge")
SPLITS = ("train", "val", "test")
#: Split files of the download and their published sizes (PASCAL-Context, Mottaghi et al. CVPR 2014; TDSS §4).
SPLIT_FILES = {"train": "train.txt", "val": "val.txt"}
EXPECTED_COUNTS = {"train": 4998, "val": 5105}
#: MTLoRA's PASCAL training ScaleNRotate (``data/mtl_ds.py::get_transformations``).
SCALE_ROTATE = ScaleNRotate(rotations=(-20.0, 20.0), scales=(0.75, 1.25))

PASCAL_CONTEXT_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
PASCAL_PART_CLASSES = ("background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg")
NORMALS_CLASSES_FILE = Path(__file__).resolve().parent.parent / "assets" / "pascal_normals_classes.json"

#: PASCAL-Part person part names -> the 6 parts of :data:`PASCAL_PART_CLASSES`
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


@functools.lru_cache(maxsize=1)
def normals_valid_classes() -> tuple[int, ...]:
    """``LabelMap`` ids on which PASCAL-Context normals are valid: ``context_classes[name]`` for every class name
    in both of ASTMT's lists except ``unknown``, plus ``tvmonitor`` (sorted).

    Source: ASTMT ``fblib/util/db_info/{nyu,context}_classes.json`` and MTLoRA ``data/mtl_ds.py::PASCALContext``;
    the lists ship in ``mtbench/assets/pascal_normals_classes.json`` with their source and licence.
    """
    data = json.loads(NORMALS_CLASSES_FILE.read_text())
    nyu, ctx = data["nyu_classes"], data["context_classes"]
    ids = {ctx[n] for n in nyu if n in ctx and n != "unknown"} | {ctx["tvmonitor"]}
    return tuple(sorted(int(i) for i in ids))


def _loadmat_var(path: Path, var: str):
    try:
        m = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as e:
        raise MtbenchError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if var not in m:
        raise MtbenchError(f"{path} has no variable {var!r}")
    return m[var]


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 ``[H,W,3]`` of an image file, fully decoded (a truncated file is an error).

    Raises:
        MtbenchError: missing or unreadable file (the message names it).
    """
    if not path.is_file():
        raise MtbenchError(f"missing file {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise MtbenchError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _read_png(path: Path, mode: str | None = None) -> np.ndarray:
    if not path.is_file():
        raise MtbenchError(f"missing file {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode) if mode else im)
    except Exception as e:
        raise MtbenchError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _check_size(path: Path, arr: np.ndarray, shape: tuple[int, int]) -> None:
    if arr.ndim < 2 or tuple(arr.shape[:2]) != tuple(shape):
        raise MtbenchError(f"{path} has size {'x'.join(map(str, arr.shape[:2]))}, its image has "
                           f"{shape[0]}x{shape[1]}")


def read_sample(root: Path, sid: str, tasks, normals_classes=None,
                image: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Image uint8 ``[H,W,3]`` and decoded labels of one sample at the stored resolution.

    Args:
        root: the ``PASCAL_MT`` directory.
        sid: the sample id.
        tasks: tasks to decode.
        normals_classes: ``LabelMap`` ids on which normals are valid (None: no class mask).
        image: the already decoded image (skips reading it again).

    Raises:
        MtbenchError: a missing or unreadable file, a label whose size differs from the image, or label values
            outside the task's range; the message names the file.
    """
    img = read_image(root / "JPEGImages" / f"{sid}.jpg") if image is None else image
    shape = img.shape[:2]
    labels: dict[str, np.ndarray] = {}
    label_map = None
    if "edge" in tasks or (normals_classes is not None and "normals" in tasks):
        path = _task_path(root, "edge", sid)
        if not path.is_file():
            raise MtbenchError(f"missing file {path}")
        label_map = np.asarray(_loadmat_var(path, "LabelMap"))
        if label_map.ndim != 2 or label_map.dtype.kind not in "uif":
            raise MtbenchError(f"{path}: LabelMap must be a 2-D integer array, got {label_map.dtype} "
                               f"{list(label_map.shape)}")
        _check_size(path, label_map, shape)
    for t in tasks:
        path = _task_path(root, t, sid)
        if t == "semseg":
            sem = _read_png(path)
            _check_size(path, sem, shape)
            if sem.ndim != 2:
                raise MtbenchError(f"{path}: semseg must be a single-channel PNG, got shape {list(sem.shape)}")
            bad = (sem > 20) & (sem != IGNORE_INDEX)
            if bad.any():
                raise MtbenchError(f"{path}: semseg values must be 0..20 or 255, found {int(sem[bad].max())}")
            labels[t] = sem.astype(np.uint8)
        elif t == "human_parts":
            if not path.is_file():
                raise MtbenchError(f"missing file {path}")
            try:
                labels[t] = decode_human_parts(_loadmat_var(path, "anno"), shape)
            except MtbenchError as e:
                msg = str(e)
                raise MtbenchError(msg if str(path) in msg else f"{path}: {msg}") from e
        elif t == "sal":
            sal = _read_png(path, "L")
            _check_size(path, sal, shape)
            labels[t] = (sal.astype(np.float32) / 255.0 > 0.5).astype(np.float32)
        elif t == "normals":
            v = _read_png(path, "RGB").astype(np.float32)
            _check_size(path, v, shape)
            nrm = 2.0 * v / 255.0 - 1.0
            invalid = np.linalg.norm(nrm, axis=-1) < 0.1
            if normals_classes is not None:
                invalid |= ~np.isin(label_map, normals_classes)
            nrm[invalid] = IGNORE_INDEX
            labels[t] = nrm
        elif t == "edge":
            labels[t] = label_edges(label_map).astype(np.float32)
    return img, labels


class PascalMT(Dataset):
    """PASCAL-MT (PASCAL-Context multi-task) samples in :data:`mtbench.tasks.SAMPLE_FORMAT`.

    Args:
        root: the ``PASCAL_MT`` directory (layout in the module docstring).
        split: ``train``, ``val`` or ``test`` (see the module docstring for the files each reads).
        tasks: subset of :data:`TASKS` (None: all). Only the files of requested tasks are checked and opened.
        img_size: side ``S`` of the square output (default 448).
        train_aug: random horizontal flip (p = 0.5; normals x negated); same as ``augment='flip'``.
        n: keep only the first ``n`` ids of the split (smoke tests); None for all.
        normals_valid_classes: ``LabelMap`` values on which normals are valid (others 255); None: the shipped
            NYU-compatible classes (:func:`normals_valid_classes`) when ``normals_mask`` is on.
        normals_mask: mask normals to those classes (ASTMT / MTLoRA; default on).
        augment: None, ``flip`` or ``paper`` (flip + :data:`SCALE_ROTATE`), see
            :func:`mtbench.data.transforms.finish_sample`.
        label_resolution: ``resized`` (labels ``S x S``) or ``original`` (labels at the stored size).

    Items: ``image`` float32 [3,S,S]; ``semseg``, ``human_parts`` int64 [S,S]; ``sal``, ``edge`` float32 [1,S,S];
    ``normals`` float32 [3,S,S]; ``meta`` ``{"id": id, "size": (H0, W0)}`` (size of the stored JPEG). With
    ``label_resolution='original'`` the labels are ``[H0,W0]``.

    Raises:
        MtbenchError: unknown split/task, missing root or split file, or a required file missing for some id
            (checked once at construction; the message names the first missing path). Reading a sample raises
            :class:`MtbenchError` naming the file for unreadable files, wrong label sizes or label values.
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
        normals_mask: bool = True,
        augment: str | None = None,
        label_resolution: str = "resized",
    ):
        self.tasks = check_split_and_tasks("pascal_context", split, SPLITS, tasks, TASKS)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise MtbenchError(f"PASCAL_MT root not found: {self.root}")
        split_file = _split_file(self.root, split)
        if not split_file.is_file():
            raise MtbenchError(f"PASCAL_MT split file not found: {split_file}")
        ids = read_split_file(split_file)
        if n is not None and int(n) > len(ids):
            raise MtbenchError(f"PASCAL_MT split {split!r} has {len(ids)} images ({split_file}); asked for the first "
                               f"{int(n)}")
        if n is not None:
            ids = ids[: int(n)]
        if not ids:
            raise MtbenchError(f"PASCAL_MT split file {split_file} lists no ids")
        self.split, self.img_size = split, int(img_size)
        self.augment = augment if augment is not None else ("flip" if train_aug else None)
        self.label_resolution = label_resolution
        if normals_valid_classes is None and normals_mask:
            normals_valid_classes = globals()["normals_valid_classes"]()
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
        return read_sample(self.root, self.ids[i], self.tasks, self.normals_valid_classes)

    def __getitem__(self, i: int) -> dict:
        img, labels = self.load_raw(i)
        meta = {"id": self.ids[i], "size": (int(img.shape[0]), int(img.shape[1]))}
        return finish_sample(img, labels, meta, self.img_size, augment=self.augment, scale_rotate_cfg=SCALE_ROTATE,
                             label_resolution=self.label_resolution)


def _split_file(root: Path, split: str) -> Path:
    sets = root / "ImageSets" / "Context"
    if split == "train":
        return sets / "train.txt"
    if split == "val" and (sets / "val_select.txt").exists():
        return sets / "val_select.txt"
    return sets / "val.txt"


# ------------------------------------------------------------------------------------------------------------------
# mtbench data check
# ------------------------------------------------------------------------------------------------------------------


def check_items(root, split: str) -> list[tuple[str, str, str]]:
    """Work items ``(root, split, id)`` of one split file for ``mtbench data check``.

    Raises:
        MtbenchError: the split file is missing or lists no ids.
    """
    return split_check_items(root, split, Path(root) / "ImageSets" / "Context" / SPLIT_FILES[split])


def check_item(item: tuple[str, str, str]) -> tuple[str, dict[str, bool], list[str]]:
    """Read every task of one sample: ``(split, {task: readable and well-formed}, [problem lines])``."""
    root, split, sid = item
    root = Path(root)
    ok: dict[str, bool] = {}
    problems: list[str] = []
    img = None
    try:
        img = read_image(root / "JPEGImages" / f"{sid}.jpg")
        ok["image"] = True
    except MtbenchError as e:
        ok["image"] = False
        problems.append(f"{split} {sid}: {e}")
    classes = normals_valid_classes()
    for t in TASKS:
        try:
            if img is not None:
                read_sample(root, sid, (t,), classes if t == "normals" else None, image=img)
            else:
                _read_label_only(root, sid, t)
            ok[t] = True
        except MtbenchError as e:
            ok[t] = False
            problems.append(f"{split} {sid}: {e}")
    return split, ok, problems


def _read_label_only(root: Path, sid: str, task: str) -> None:
    """Existence and readability of one label when the image itself is unreadable (no size check possible)."""
    path = _task_path(root, task, sid)
    if not path.is_file():
        raise MtbenchError(f"missing file {path}")
    if path.suffix == ".mat":
        _loadmat_var(path, "LabelMap" if task == "edge" else "anno")
    else:
        _read_png(path)


def _read(root, split, *, tasks=None, img_size=448, augment=None, n=None, label_resolution="resized", seed=0):
    return PascalMT(root, split, tasks=tasks, img_size=img_size, n=n, augment=augment,
                    label_resolution=label_resolution)


def _register() -> None:
    from mtbench.datasets import DatasetSpec, paper_preset, real_embedded_preset, register_dataset

    classes = {"semseg": PASCAL_CONTEXT_CLASSES, "human_parts": PASCAL_PART_CLASSES}
    register_dataset(DatasetSpec(
        name="pascal_context",
        title="PASCAL-Context (PASCAL_MT, ASTMT's multi-task labels)",
        tasks={t: classes.get(t, ()) for t in TASKS},
        default_tasks=("semseg", "human_parts", "sal", "normals"),
        splits=SPLITS,
        backbone="swin_tiny_patch4_window7_224",
        img_size=448,
        presets={"embedded": real_embedded_preset(), "paper": paper_preset()},
        reader=_read,
        references={"semseg": 67.21, "human_parts": 61.93, "sal": 62.35, "normals": 17.97},
        reference_source=("MTLoRA CVPR'24 / TADFormer CVPR'25 / TDSS AAAI'26 Table 1, single-task full fine-tuning "
                          "row: semseg, human_parts, sal mIoU (%), normals mean angular error (degrees)"),
        data_dir="PASCAL_MT",
        published="https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz (ASTMT / MTLoRA README)",
        expected_counts=dict(EXPECTED_COUNTS),
        check_items=check_items,
        check_item=check_item,
    ))


_register()
