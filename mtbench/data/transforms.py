"""Small resize / flip / normalise helpers shared by the mtbench datasets.

Everything here works on numpy arrays in HWC / HW layout before conversion and on the torch sample dict of
:data:`mtbench.tasks.SAMPLE_FORMAT` after conversion. Interpolation follows the MTLoRA / ASTMT pipeline: image and
normals are resized bicubically (normals renormalised afterwards), every label map nearest-neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mtbench.errors import MtbenchError
from mtbench.tasks import IGNORE_INDEX

#: ImageNet channel statistics used to normalise every image (RGB, for values in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def image_to_tensor(img: np.ndarray) -> torch.Tensor:
    """RGB uint8 ``[H,W,3]`` (0..255) or float ``[H,W,3]`` (0..1) -> ImageNet-normalised float32 ``[3,H,W]``."""
    x = img.astype(np.float32)
    if img.dtype == np.uint8:
        x /= 255.0
    x = (x - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def denormalize_image(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`image_to_tensor`: float ``[3,H,W]`` -> float ``[H,W,3]`` clipped to [0, 1] (for plots)."""
    a = x.detach().cpu().numpy().transpose(1, 2, 0) * _STD + _MEAN
    return np.clip(a, 0.0, 1.0)


def resize_image(img: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of an RGB uint8 ``[H,W,3]`` image to ``[size,size,3]`` uint8 (aspect ratio not kept)."""
    if img.shape[:2] == (size, size):
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def resize_nearest(label: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map ``[H,W]`` (any dtype) to ``[size,size]``, dtype kept."""
    if label.shape[:2] == (size, size):
        return label
    h, w = label.shape[:2]
    # Pixel-centre sampling; identical to PIL/cv2 NEAREST and works for any dtype (uint16, float, bool).
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


def resize_normals(normals: np.ndarray, size: int) -> np.ndarray:
    """Resize a normal map and renormalise it.

    Args:
        normals: float ``[H,W,3]``; unit vectors where valid, pixels with norm ~0 (or value 255) are invalid.
        size: output side length.

    Returns:
        float32 ``[size,size,3]``: bicubically resized unit vectors; pixels that were invalid (nearest-neighbour
        resized validity mask) or whose resized vector has (near) zero norm are 255 in all three channels.
    """
    n = normals.astype(np.float32)
    valid = (np.abs(n) < 2.0).all(-1) & (np.linalg.norm(n, axis=-1) > 1e-3)
    n = np.where(valid[..., None], n, 0.0).astype(np.float32)
    if n.shape[:2] != (size, size):
        chans = [Image.fromarray(np.ascontiguousarray(n[..., c])).resize((size, size), Image.BICUBIC) for c in range(3)]
        n = np.stack([np.asarray(c, dtype=np.float32) for c in chans], axis=-1)
        valid = resize_nearest(valid, size)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    valid = valid & (norm[..., 0] > 1e-3)
    out = n / np.maximum(norm, 1e-6)
    out[~valid] = IGNORE_INDEX
    return out.astype(np.float32)


def hflip_sample(sample: dict) -> dict:
    """Horizontally flip every dense entry of a torch sample dict in place (and return it).

    Tensors ``[...,H,W]`` are flipped along W; for ``normals`` the x component is negated on valid pixels only
    (invalid pixels stay 255). ``meta`` is left untouched.
    """
    for k, v in sample.items():
        if isinstance(v, torch.Tensor):
            sample[k] = torch.flip(v, dims=[-1])
    if "normals" in sample:
        n = sample["normals"]
        valid = n[0] != IGNORE_INDEX
        n[0] = torch.where(valid, -n[0], n[0])
    return sample


def to_sample(image: np.ndarray, labels: dict[str, np.ndarray], meta: dict, train_aug: bool = False) -> dict:
    """Build a torch sample in :data:`mtbench.tasks.SAMPLE_FORMAT` from numpy arrays of equal size ``H,W``.

    Args:
        image: RGB uint8 ``[H,W,3]``.
        labels: per task: ``semseg``/``human_parts`` integer ``[H,W]``; ``sal``/``depth``/``edge`` float ``[H,W]``;
            ``normals`` float ``[H,W,3]`` (already using 255 for ignored / invalid pixels).
        meta: stored in the sample unchanged (``{"id": str, "size": (H0, W0)}``).
        train_aug: apply a random horizontal flip (p = 0.5, torch RNG).
    """
    out: dict = {"image": image_to_tensor(image)}
    for k, v in labels.items():
        if k in ("semseg", "human_parts"):
            out[k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64))
        elif k == "normals":
            out[k] = torch.from_numpy(np.ascontiguousarray(v.transpose(2, 0, 1), dtype=np.float32))
        else:
            out[k] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)[None])
    if train_aug and torch.rand(()).item() < 0.5:
        hflip_sample(out)
    out["meta"] = meta
    return out


def read_split_file(path) -> list[str]:
    """Sample ids listed in a split file (one per line; blank lines and surrounding whitespace ignored)."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def split_check_items(root, split: str, path) -> list[tuple[str, str, str]]:
    """Work items ``(root, split, id)`` for ``mtbench data check`` from the split file at ``path``.

    Raises:
        MtbenchError: the split file is missing or lists no ids.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise MtbenchError(f"missing split file {path}")
    ids = read_split_file(path)
    if not ids:
        raise MtbenchError(f"split file {path} lists no ids")
    return [(str(root), split, sid) for sid in ids]


def check_split_and_tasks(dataset: str, split: str, splits, tasks, valid_tasks) -> tuple[str, ...]:
    """Validate a dataset's split and requested tasks; returns the tasks to load (all of them for None).

    Raises:
        MtbenchError: unknown split or task (the message lists the valid values).
    """
    if split not in splits:
        raise MtbenchError(f"unknown {dataset} split {split!r}; valid: {', '.join(splits)}")
    chosen = tuple(tasks) if tasks else tuple(valid_tasks)
    bad = [t for t in chosen if t not in valid_tasks]
    if bad:
        raise MtbenchError(f"{dataset} has no task {bad[0]!r}; valid: {', '.join(valid_tasks)}")
    return chosen


# ------------------------------------------------------------------------------------------------------------------
# The papers' training transforms and label derivations (ASTMT / MTLoRA ``data/custom_transforms.py``, ``mtl_ds.py``)
# ------------------------------------------------------------------------------------------------------------------

#: Label maps whose out-of-image border is filled with 0 by ScaleNRotate (cv2.warpAffine's constant 0 border in
#: ASTMT / MTLoRA: semseg border becomes class 0, not ignore). Depth and normals borders become invalid (255).
_ZERO_BORDER = ("semseg", "human_parts", "sal", "edge")


@dataclass(frozen=True)
class ScaleNRotate:
    """Random scale and rotation about the image centre, as ASTMT's / MTLoRA's ``ScaleNRotate``.

    Either a continuous range (``rotations=(lo, hi)`` degrees, ``scales=(lo, hi)``; uniform draws) or fixed choices
    (``rotation_choices`` / ``scale_choices``; uniform over the list). ``depth_divide``: depth is divided by the
    scale (zooming in by ``s`` brings the scene ``s`` times closer), as MTLoRA's NYUD transform does.

    Source: MTLoRA ``data/mtl_ds.py::get_transformations`` (PASCAL: rots (-20, 20), scales (0.75, 1.25); NYUD: rots
    [0], scales [1, 1.2, 1.5]) and ``data/custom_transforms.py::ScaleNRotate`` (from ASTMT).
    """

    rotations: tuple[float, float] | None = None
    scales: tuple[float, float] | None = None
    rotation_choices: tuple[float, ...] | None = None
    scale_choices: tuple[float, ...] | None = None
    depth_divide: bool = True

    def draw(self, gen: torch.Generator | None = None) -> tuple[float, float]:
        """``(angle in degrees, scale)`` drawn with torch's RNG (seeded per DataLoader worker by torch)."""

        def pick(rng, choices):
            if choices is not None:
                return float(choices[int(torch.randint(len(choices), (), generator=gen))])
            lo, hi = rng
            return float(lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64))

        rot = pick(self.rotations or (0.0, 0.0), self.rotation_choices)
        sc = pick(self.scales or (1.0, 1.0), self.scale_choices)
        return rot, sc


def rotation_matrix(center: tuple[float, float], angle_deg: float, scale: float) -> np.ndarray:
    """The 2x3 affine map ``dst = M @ [x, y, 1]`` of a rotation by ``angle_deg`` (counter-clockwise as seen on
    screen, image y pointing down) and a zoom by ``scale`` about ``center = (x, y)``: OpenCV's
    ``getRotationMatrix2D`` convention, which ASTMT / MTLoRA use (``M = [[a, b, (1-a)cx - b cy], [-b, a,
    b cx + (1-a) cy]]`` with ``a = s cos θ``, ``b = s sin θ``)."""
    t = np.deg2rad(angle_deg)
    a, b = scale * np.cos(t), scale * np.sin(t)
    cx, cy = center
    return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]], dtype=np.float64)


def _warp(x: np.ndarray, m: np.ndarray, order: int, cval: float) -> np.ndarray:
    from skimage.transform import AffineTransform, warp

    tf = AffineTransform(matrix=np.vstack([m, [0.0, 0.0, 1.0]]))
    return warp(x.astype(np.float64), tf.inverse, order=order, mode="constant", cval=cval, preserve_range=True,
                output_shape=x.shape[:2])


def rotate_normals(normals: np.ndarray, angle_deg: float) -> np.ndarray:
    """In-plane rotation of normal vectors ``[H,W,3]`` by ``angle_deg`` (the rotation :func:`rotation_matrix`
    applies to the image): ``x' = x cos θ + y sin θ``, ``y' = y cos θ − x sin θ``, ``z`` unchanged. Pixels with
    a 255 channel (invalid) are left as they are. Source: ASTMT / MTLoRA ``ScaleNRotate`` (``atan2`` form)."""
    out = normals.astype(np.float32).copy()
    valid = ~(out == IGNORE_INDEX).any(-1)
    t = np.deg2rad(angle_deg)
    c, s = np.float32(np.cos(t)), np.float32(np.sin(t))
    x, y = out[..., 0].copy(), out[..., 1].copy()
    out[..., 0] = np.where(valid, x * c + y * s, x)
    out[..., 1] = np.where(valid, y * c - x * s, y)
    return out


def scale_rotate(image: np.ndarray, labels: dict[str, np.ndarray], angle_deg: float, scale: float,
                 depth_divide: bool = True) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Apply one scale-and-rotation to an image and all its labels, keeping them aligned.

    Args:
        image: RGB uint8 ``[H,W,3]``.
        labels: decoded labels at the image's size (``normals`` ``[H,W,3]``; others ``[H,W]``; 255 = ignore).
        angle_deg, scale: as :func:`rotation_matrix` (centre ``(W/2, H/2)`` as in ASTMT).
        depth_divide: divide valid depth by ``scale``.

    Returns:
        ``(image, labels)`` of the same size. Interpolation as in MTLoRA's ``FLAGVALS``: image and normals bicubic,
        every label map nearest. Outside the source image: image 0; semseg, human_parts, sal and edge 0 (the
        official zero border; human_parts stays all-ignore on an image without parts); depth and normals invalid.
        Normals are rotated in-plane by the same angle and renormalised; pixels whose validity mask does not land
        on a valid source pixel are invalid (255).
    """
    h, w = image.shape[:2]
    m = rotation_matrix((w / 2.0, h / 2.0), angle_deg, scale)
    img = np.clip(np.rint(_warp(image, m, 3, 0.0)), 0, 255).astype(np.uint8)
    out: dict[str, np.ndarray] = {}
    for t, v in labels.items():
        if t == "normals":
            n = rotate_normals(v, angle_deg)
            valid = ~(n == IGNORE_INDEX).any(-1) & (np.linalg.norm(np.where(n == IGNORE_INDEX, 0, n), axis=-1) > 1e-3)
            n = np.where(valid[..., None], n, 0.0)
            n = _warp(n, m, 3, 0.0)
            valid = _warp(valid.astype(np.float64), m, 0, 0.0) > 0.5
            norm = np.linalg.norm(n, axis=-1, keepdims=True)
            valid &= norm[..., 0] > 1e-3
            n = n / np.maximum(norm, 1e-6)
            n[~valid] = IGNORE_INDEX
            out[t] = n.astype(np.float32)
        elif t == "depth":
            d = _warp(v, m, 0, float(IGNORE_INDEX))
            if depth_divide:
                d = np.where(d != IGNORE_INDEX, d / scale, d)
            out[t] = d.astype(v.dtype)
        else:
            fill = 0.0 if t in _ZERO_BORDER else float(IGNORE_INDEX)
            if t == "human_parts" and (v == IGNORE_INDEX).all():
                fill = float(IGNORE_INDEX)
            out[t] = _warp(v, m, 0, fill).astype(v.dtype)
    return img, out


def hflip_arrays(image: np.ndarray, labels: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Horizontal flip of an HWC image and its labels (numpy); normals' x negated on valid pixels."""
    out = {}
    for t, v in labels.items():
        f = np.ascontiguousarray(v[:, ::-1])
        if t == "normals":
            valid = ~(f == IGNORE_INDEX).any(-1)
            f[..., 0] = np.where(valid, -f[..., 0], f[..., 0])
        out[t] = f
    return np.ascontiguousarray(image[:, ::-1]), out


def label_edges(label_map: np.ndarray) -> np.ndarray:
    """Edge map uint8 ``[H,W]`` of a label map, as ASTMT / MTLoRA derive PASCAL-Context edges from ``LabelMap``.

    ``edge = thin(|Laplacian(label_map)| > 0)``: the 4-neighbour Laplacian kernel ``[[0,1,0],[1,-4,1],[0,1,0]]``
    with reflect-101 borders (``scipy.ndimage.laplace(mode='mirror')``, identical to OpenCV's
    ``cv2.Laplacian(ksize=1)``) marks the pixels on both sides of every label change, then
    ``skimage.morphology.thin`` thins that two-pixel band to a one-pixel line.

    Source: MTLoRA ``data/mtl_ds.py::PASCALContext._load_edge`` (from ASTMT).
    """
    from scipy.ndimage import laplace
    from skimage.morphology import thin

    lap = laplace(np.asarray(label_map, dtype=np.float64), mode="mirror")
    return thin(np.abs(lap) > 0).astype(np.uint8)


def finish_sample(image: np.ndarray, labels: dict[str, np.ndarray], meta: dict, size: int, *,
                  augment: str | None = None, scale_rotate_cfg: ScaleNRotate | None = None,
                  label_resolution: str = "resized") -> dict:
    """The real datasets' pipeline from decoded arrays to a torch sample (:data:`mtbench.tasks.SAMPLE_FORMAT`).

    Training (``augment='paper'``), as MTLoRA's ``get_transformations``: random horizontal flip (p = 0.5, normals
    x negated), then ``scale_rotate_cfg`` (:class:`ScaleNRotate`), then the fixed resize to ``size x size``
    (image and normals bicubic, normals renormalised; labels nearest), then ImageNet normalisation.
    ``augment='flip'``: the flip only. Evaluation (``augment=None``): the fixed resize only; with
    ``label_resolution='original'`` the labels keep their stored size (only the image is resized).

    Raises:
        MtbenchError: unknown ``augment``, or ``paper`` without a ``scale_rotate_cfg``.
    """
    if augment not in (None, "flip", "paper"):
        raise MtbenchError(f"unknown augmentation {augment!r}; valid: flip, paper")
    if augment is not None and torch.rand(()).item() < 0.5:
        image, labels = hflip_arrays(image, labels)
    if augment == "paper":
        if scale_rotate_cfg is None:
            raise MtbenchError("the 'paper' augmentation needs the dataset's ScaleNRotate ranges")
        rot, sc = scale_rotate_cfg.draw()
        image, labels = scale_rotate(image, labels, rot, sc, scale_rotate_cfg.depth_divide)
    if label_resolution != "original":
        labels = {t: resize_normals(v, size) if t == "normals" else resize_nearest(v, size) for t, v in labels.items()}
    return to_sample(resize_image(image, size), labels, meta, False)
