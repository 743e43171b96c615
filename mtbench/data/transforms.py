"""Small resize / flip / normalise helpers shared by the mtbench datasets.

Everything here works on numpy arrays in HWC / HW layout before conversion and on the torch sample dict of
:data:`mtbench.tasks.SAMPLE_FORMAT` after conversion. Interpolation follows the MTLoRA / ASTMT pipeline: image and
normals are resized bicubically (normals renormalised afterwards), every label map nearest-neighbour.
"""

from __future__ import annotations

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
