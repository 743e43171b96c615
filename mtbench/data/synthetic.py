"""The embedded default dataset: procedurally generated 3D scenes rendered by vectorised ray casting.

Every label follows exactly from the scene geometry, so a model that learns the tasks learns something real:

* **Scene.** A pinhole camera (jittered height, position, pitch and yaw) looks at a floor plane (``y = 0``, world
  y is up) and a back wall (``z = wall_z``). One to four primitives stand on the floor, never interpenetrating
  but free to occlude each other: spheres, boxes (axis-aligned or yaw-rotated), vertical cylinders and cones.
* **Appearance.** Each surface (floor, wall, every object) gets two random colours and a random solid texture
  (plain, checker, stripes or value noise) in its own local frame. Colour is drawn independently of the object
  kind, so a model has to use shape. Shading is Lambertian from a random directional light on the camera side
  plus ambient, with a weak specular highlight on objects and cast shadows (a shadow ray per sample). Pixels
  next to a surface or part boundary get 4 extra sub-pixel samples (adaptive 2x2 supersampling, anti-aliased
  silhouettes); then a random exposure and small Gaussian pixel noise are applied. About 17 % of the pixels are
  objects on average.
* **Labels** come from one ray through each pixel centre:

  - ``semseg``: object kind (:data:`SEMSEG_NAMES`); floor and wall are ``background`` (0).
  - ``human_parts``: geometric sub-part (:data:`PART_NAMES`): sphere upper/lower hemisphere, box top face/side
    faces, cylinder top cap/side, cone upper half ("tip")/lower half ("base"). :data:`PART_TO_CLASS` maps each
    part to its semseg class.
  - ``sal``: 1 on objects, 0 on floor and wall.
  - ``depth``: z distance along the optical axis in metres (``t * dot(ray, forward)``), valid on every pixel that
    hits a surface (with floor and wall, every pixel does).
  - ``normals``: analytic unit normals in camera coordinates: x right, y down, z towards the camera (note: this
    triple is left-handed). A surface facing the viewer has z > 0 (up to perspective: a side face near the image
    border can reach z ~ -0.4); the floor seen by a level camera has normal (0, -1, 0), here (0, -cos p, sin p)
    for the camera's downward pitch p of 12..24 degrees; the back wall has z > 0.9.
  - ``edge``: 1 on a one-pixel line at every boundary between surfaces (floor, wall, object id or part
    changes; all primitives are convex, so every depth jump is such a boundary). Of the two pixels on either
    side, the one nearer the camera is marked, so the line sits on the occluding contour and is symmetric under
    horizontal flips.

Sample ``i`` of split ``s`` is a pure function of ``(seed, s, i, img_size)`` (its RNG is seeded from
``(seed, split code, i)``), so a split of ``n`` samples is the prefix of any larger one and splits never share a
scene. Splits: ``train`` (1600), ``val`` (200), ``test`` (200), ``upstream`` (4000; backbone pretraining only).

Rendered splits are cached as one compressed ``.npz`` per ``(seed, split, n, img_size, GENERATOR_VERSION)`` under
``$MTBENCH_CACHE/synthetic`` (default ``~/.cache/mtbench/synthetic``).
"""

from __future__ import annotations

import colorsys
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mtbench.data.transforms import check_split_and_tasks, hflip_sample, image_to_tensor
from mtbench.errors import MtbenchError
from mtbench.tasks import IGNORE_INDEX

#: Bump whenever rendering changes; it is part of the cache key, so old caches are never reused.
GENERATOR_VERSION = 2

#: Semantic classes (object kinds). Floor and wall are background.
SEMSEG_NAMES = ("background", "sphere", "box", "cylinder", "cone")
#: Geometric sub-parts; ``PART_TO_CLASS[p]`` is the semseg class part ``p`` belongs to.
PART_NAMES = (
    "background",
    "sphere_top",
    "sphere_bottom",
    "box_top",
    "box_side",
    "cylinder_cap",
    "cylinder_side",
    "cone_tip",
    "cone_base",
)
PART_TO_CLASS = (0, 1, 1, 2, 2, 3, 3, 4, 4)
#: Number of object kinds excluding background (the ``K`` of :func:`grid_presence`).
NUM_KINDS = len(SEMSEG_NAMES) - 1

#: Tasks the synthetic dataset provides.
TASKS = ("semseg", "human_parts", "sal", "normals", "depth", "edge")
#: Default number of samples per split.
SPLIT_SIZES = {"train": 1600, "val": 200, "test": 200, "upstream": 4000}
SPLITS = tuple(SPLIT_SIZES)
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3, "upstream": 4}

_SPHERE, _BOX, _CYLINDER, _CONE = 1, 2, 3, 4
_FLOOR, _WALL = 0, 1  # surface ids; object j has surface id 2 + j
_EPS = 1e-4
_INF = np.float64(np.inf)


def default_cache_dir() -> Path:
    """``$MTBENCH_CACHE/synthetic`` if ``MTBENCH_CACHE`` is set, else ``~/.cache/mtbench/synthetic``."""
    base = os.environ.get("MTBENCH_CACHE")
    return Path(base) / "synthetic" if base else Path.home() / ".cache" / "mtbench" / "synthetic"


# ----------------------------------------------------------------------------------------------------------------
# Scene description and sampling
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Look:
    """Appearance of one surface: two colours mixed by a solid texture in the surface's local frame."""

    c1: np.ndarray
    c2: np.ndarray
    pattern: str  # plain | checker | stripes | noise
    scale: float
    rot: np.ndarray  # 3x3, world -> texture frame
    origin: np.ndarray
    lattice: np.ndarray | None = None
    shiny: float = 0.0


@dataclass
class _Obj:
    kind: int
    centre: np.ndarray  # box/sphere: geometric centre; cylinder/cone: centre of the base disk (y = 0)
    size: tuple  # sphere (r,), box (a, h, b) half extents, cylinder (r, h), cone (R, H)
    yaw: float = 0.0
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))  # world -> object frame (boxes)
    bound_c: np.ndarray = None
    bound_r: float = 0.0
    foot_r: float = 0.0


@dataclass
class _Scene:
    cam: np.ndarray
    fwd: np.ndarray
    right: np.ndarray
    up: np.ndarray
    tan_half: float
    wall_z: float
    objects: list
    looks: list  # floor, wall, then one per object
    light: np.ndarray
    light_col: np.ndarray
    ambient: float
    noise: float
    exposure: float


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def _rand_rot(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random rotation matrix [3,3] (from a random unit quaternion)."""
    w, x, y, z = rng.normal(size=4)
    n = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def _yaw_rot(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    # rows: object x, y, z axes expressed in world coordinates -> world->object rotation
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


_PATTERNS = ("plain", "checker", "stripes", "noise")
_PATTERN_CDF = np.cumsum([0.2, 0.3, 0.25, 0.25])[:-1]


def _sample_look(rng: np.random.Generator, origin: np.ndarray, base_rot: np.ndarray, is_obj: bool) -> _Look:
    c1 = _hsv(rng.random(), rng.uniform(0.15, 0.9), rng.uniform(0.35, 0.95))
    if rng.random() < 0.5:  # second colour: a shade of the first, or an unrelated colour
        c2 = np.clip(c1 * rng.uniform(0.35, 0.75), 0, 1)
    else:
        c2 = _hsv(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.2, 0.95))
    pattern = _PATTERNS[int(np.searchsorted(_PATTERN_CDF, rng.random(), side="right"))]
    scale = rng.uniform(1.5, 5.0) if pattern != "noise" else rng.uniform(1.0, 3.0)
    # textures are fixed to the object frame, with a random extra rotation so stripes/checkers run any direction
    rot = (_rand_rot(rng) if rng.random() < 0.6 else np.eye(3)) @ base_rot
    lattice = rng.random((8, 8, 8)) if pattern == "noise" else None
    shiny = rng.uniform(0.0, 0.35) if is_obj else 0.0
    return _Look(c1, c2, pattern, scale, rot, origin, lattice, shiny)


def _sample_scene(rng: np.random.Generator) -> _Scene:
    cam = np.array([rng.uniform(-0.3, 0.3), rng.uniform(1.4, 2.0), rng.uniform(-0.3, 0.3)])
    pitch = np.deg2rad(rng.uniform(12.0, 24.0))  # downwards
    yaw = np.deg2rad(rng.uniform(-8.0, 8.0))
    cp, sp, cy, sy = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    fwd = np.array([sy * cp, -sp, cy * cp])
    right = np.array([cy, 0.0, -sy])
    up = np.array([sy * sp, cp, cy * sp])
    tan_half = float(np.tan(np.deg2rad(rng.uniform(25.0, 29.0))))
    wall_z = cam[2] + rng.uniform(7.0, 9.5)

    objects: list[_Obj] = []
    n_obj = int(rng.integers(1, 5))
    for _ in range(n_obj):
        kind = int(rng.integers(1, 5))
        for _try in range(30):
            s = rng.uniform(2.2, 5.5)
            lat = s * tan_half * rng.uniform(-0.75, 0.75)
            x = cam[0] + s * sy + lat * cy
            z = cam[2] + s * cy - lat * sy
            if kind == _SPHERE:
                r = rng.uniform(0.35, 0.8)
                o = _Obj(kind, np.array([x, r, z]), (r,), foot_r=r)
                o.bound_c, o.bound_r = o.centre, r
            elif kind == _BOX:
                a, b, h = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.7)
                yaw_o = 0.0 if rng.random() < 0.3 else rng.uniform(0.0, np.pi / 2)
                o = _Obj(kind, np.array([x, h, z]), (a, h, b), yaw_o, _yaw_rot(yaw_o), foot_r=float(np.hypot(a, b)))
                o.bound_c, o.bound_r = o.centre, float(np.sqrt(a * a + b * b + h * h))
            elif kind == _CYLINDER:
                r, h = rng.uniform(0.25, 0.55), rng.uniform(0.6, 1.6)
                o = _Obj(kind, np.array([x, 0.0, z]), (r, h), foot_r=r)
                o.bound_c, o.bound_r = np.array([x, h / 2, z]), float(np.hypot(r, h / 2))
            else:
                r, h = rng.uniform(0.35, 0.7), rng.uniform(0.8, 1.7)
                o = _Obj(kind, np.array([x, 0.0, z]), (r, h), foot_r=r)
                o.bound_c, o.bound_r = np.array([x, h / 2, z]), float(np.hypot(r, h / 2))
            if z + o.foot_r > wall_z - 0.2:
                continue
            if all(np.hypot(x - p.centre[0], z - p.centre[2]) > o.foot_r + p.foot_r + 0.05 for p in objects):
                objects.append(o)
                break

    looks = [
        _sample_look(rng, np.zeros(3), np.eye(3), False),  # floor
        _sample_look(rng, np.zeros(3), np.eye(3), False),  # wall
    ]
    for o in objects:
        looks.append(_sample_look(rng, o.centre, o.rot, True))

    el = np.deg2rad(rng.uniform(25.0, 70.0))
    az = np.deg2rad(rng.uniform(-70.0, 70.0))
    light = np.array([np.cos(el) * np.sin(az), np.sin(el), -np.cos(el) * np.cos(az)])  # towards the light
    light_col = 1.0 - 0.15 * rng.random(3)
    return _Scene(
        cam, fwd, right, up, tan_half, wall_z, objects, looks, light, light_col,
        ambient=float(rng.uniform(0.2, 0.45)), noise=float(rng.uniform(0.005, 0.03)),
        exposure=float(rng.uniform(1.0, 1.4)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Ray casting. Vectors are stored component-major: origins O [3,M] or [3,1], unit directions D [3,M] or [3,1]
# (numpy is an order of magnitude faster on [3,M] than on [M,3] for broadcast arithmetic and gathers).
# ----------------------------------------------------------------------------------------------------------------


def _dot(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Column-wise dot product of [3,M] / [3,1] arrays -> [M]."""
    if A.shape[1] == 1:
        return A[:, 0] @ B
    if B.shape[1] == 1:
        return B[:, 0] @ A
    return A[0] * B[0] + A[1] * B[1] + A[2] * B[2]


def _bound_hit(o: _Obj, O: np.ndarray, D: np.ndarray) -> np.ndarray:
    oc = O - o.bound_c[:, None]
    b = _dot(oc, D)
    disc = b * b - (_dot(oc, oc) - o.bound_r**2)
    return (disc > 0) & (-b + np.sqrt(np.maximum(disc, 0.0)) > 0)


def _first_root(t0: np.ndarray, t1: np.ndarray, ok0: np.ndarray, ok1: np.ndarray) -> np.ndarray:
    t = np.where(ok1 & (t1 > _EPS), t1, _INF)
    return np.where(ok0 & (t0 > _EPS), t0, t)


def _t_object(o: _Obj, O: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Distance along each ray to the object's surface [M] (inf on a miss)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if o.kind == _SPHERE:
            oc = O - o.centre[:, None]
            b = _dot(oc, D)
            disc = b * b - (_dot(oc, oc) - o.size[0] ** 2)
            sq = np.sqrt(np.maximum(disc, 0.0))
            hit = disc > 0
            return _first_root(-b - sq, -b + sq, hit, hit)
        if o.kind == _BOX:  # slab test in the box frame
            half = np.asarray(o.size)[:, None]
            Ol = o.rot @ (O - o.centre[:, None])
            Dl = o.rot @ D
            Dl = np.where(np.abs(Dl) < 1e-12, 1e-12, Dl)
            t1 = (-half - Ol) / Dl
            t2 = (half - Ol) / Dl
            tn = np.minimum(t1, t2).max(0)
            tf = np.maximum(t1, t2).min(0)
            hit = tf >= tn
            return _first_root(tn, tf, hit, hit)
        if o.kind == _CYLINDER:  # side (front root of the infinite cylinder, 0 <= y <= h) or top cap
            r, h = o.size
            ox, oy, oz = O - o.centre[:, None]
            dx, dy, dz = D
            a = dx * dx + dz * dz
            b = ox * dx + oz * dz
            disc = b * b - a * (ox * ox + oz * oz - r * r)
            ts = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
            ys = oy + ts * dy
            ok_side = (disc > 0) & (a > 1e-12) & (ys >= 0) & (ys <= h)
            tc = (h - oy) / dy
            cx, cz = ox + tc * dx, oz + tc * dz
            ok_cap = (np.abs(dy) > 1e-12) & (cx * cx + cz * cz <= r * r)
            t = np.where(ok_side & (ts > _EPS), ts, _INF)
            return np.minimum(t, np.where(ok_cap & (tc > _EPS), tc, _INF))
        # cone, apex coordinates: x^2 + z^2 = k^2 y^2 with -H <= y <= 0
        r, h = o.size
        k2 = (r / h) ** 2
        ox, oy, oz = O - (o.centre + np.array([0.0, h, 0.0]))[:, None]
        dx, dy, dz = D
        a = dx * dx + dz * dz - k2 * dy * dy
        b = ox * dx + oz * dz - k2 * oy * dy
        c = ox * ox + oz * oz - k2 * oy * oy
        disc = b * b - a * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        a_safe = np.where(np.abs(a) < 1e-12, 1e-12, a)
        r0, r1 = (-b - sq) / a_safe, (-b + sq) / a_safe
        t0, t1 = np.minimum(r0, r1), np.maximum(r0, r1)
        y0, y1 = oy + t0 * dy, oy + t1 * dy
        ok = disc > 0
        return _first_root(t0, t1, ok & (y0 >= -h) & (y0 <= 0), ok & (y1 >= -h) & (y1 <= 0))


def _trace(sc: _Scene, O: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of camera rays (``O`` [3,1]): ``t`` [N] (inf on a miss) and surface id [N] int16
    (0 floor, 1 wall, 2+j object j, -1 none)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = np.where(D[1] < -1e-9, -O[1] / D[1], _INF)
        t_wall = np.where(D[2] > 1e-9, (sc.wall_z - O[2]) / D[2], _INF)
    t_floor = np.where(t_floor > _EPS, t_floor, _INF)
    t_wall = np.where(t_wall > _EPS, t_wall, _INF)
    t = np.minimum(t_floor, t_wall)
    sid = np.where(np.isfinite(t), np.where(t_floor <= t_wall, _FLOOR, _WALL), -1).astype(np.int16)
    for j, o in enumerate(sc.objects):
        idx = np.flatnonzero(_bound_hit(o, O, D))
        if idx.size == 0:
            continue
        tj = _t_object(o, O, D[:, idx])
        better = tj < t[idx]
        t[idx[better]] = tj[better]
        sid[idx[better]] = 2 + j
    return t, sid


def _shadowed(sc: _Scene, P: np.ndarray) -> np.ndarray:
    """Whether the ray from each point ``P`` [3,M] towards the light hits an object [M] (floor and wall cannot
    occlude: the light is above the floor and on the camera side of the wall)."""
    out = np.zeros(P.shape[1], dtype=bool)
    L = sc.light[:, None]
    PL, PP = sc.light @ P, _dot(P, P)
    for o in sc.objects:
        c = o.bound_c
        b = PL - c @ sc.light  # (P - c) . L
        disc = b * b - (PP - 2 * (c @ P) + (c @ c - o.bound_r**2))
        idx = np.flatnonzero((disc > 0) & (b < 0) | (disc > b * b))  # sphere ahead of, or around, the point
        if idx.size:
            out[idx] |= np.isfinite(_t_object(o, P[:, idx], L))
    return out


def _surface_info(sc: _Scene, P: np.ndarray, sid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World unit normals [3,M] and part ids [M] uint8 of hit points ``P`` [3,M] on surfaces ``sid`` [M]."""
    nrm = np.zeros_like(P)
    part = np.zeros(P.shape[1], dtype=np.uint8)
    nrm[1, sid == _FLOOR] = 1.0
    nrm[2, sid == _WALL] = -1.0
    for j, o in enumerate(sc.objects):
        m = np.flatnonzero(sid == 2 + j)
        if m.size == 0:
            continue
        q = P[:, m] - o.centre[:, None]
        if o.kind == _SPHERE:
            n = q / o.size[0]
            p = np.where(q[1] >= 0, 1, 2)
        elif o.kind == _BOX:  # the face is the axis where the hit point is closest to the half extent
            ql = (o.rot @ q) / np.asarray(o.size)[:, None]
            ax = np.abs(ql).argmax(0)
            cols = np.arange(m.size)
            nl = np.zeros_like(ql)
            nl[ax, cols] = np.sign(ql[ax, cols])
            n = o.rot.T @ nl
            p = np.where((ax == 1) & (ql[1] > 0), 3, 4)
        elif o.kind == _CYLINDER:
            r, h = o.size
            rad = np.maximum(np.hypot(q[0], q[2]), 1e-9)
            cap = np.abs(h - q[1]) < np.abs(r - rad)
            n = np.stack([np.where(cap, 0.0, q[0] / rad), cap.astype(float), np.where(cap, 0.0, q[2] / rad)])
            p = np.where(cap, 5, 6)
        else:
            r, h = o.size
            n = np.stack([q[0], -((r / h) ** 2) * (q[1] - h), q[2]])  # gradient of x^2 + z^2 - k^2 y^2
            p = np.where(q[1] >= h / 2, 7, 8)
        nrm[:, m] = n / np.maximum(np.sqrt(_dot(n, n)), 1e-9)
        part[m] = p
    return nrm, part


def _value_noise(q: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Smooth 3D value noise in [0, 1] at points ``q`` [3,M] from a periodic random lattice ``lat`` [G,G,G]."""
    g = lat.shape[0]
    flat = lat.ravel()
    f = np.floor(q)
    s = q - f
    s = s * s * (3 - 2 * s)
    i0 = f.astype(np.int64) % g
    i1 = (i0 + 1) % g
    ix = (i0[0] * g * g, i1[0] * g * g)
    iy = (i0[1] * g, i1[1] * g)
    iz = (i0[2], i1[2])
    wx, wy, wz = (1 - s[0], s[0]), (1 - s[1], s[1]), (1 - s[2], s[2])
    out = np.zeros(q.shape[1])
    for a in (0, 1):
        for b in (0, 1):
            base = ix[a] + iy[b]
            out += wx[a] * wy[b] * (wz[0] * flat[base + iz[0]] + wz[1] * flat[base + iz[1]])
    return out


def _albedo(look: _Look, P: np.ndarray) -> np.ndarray:
    """Surface colour [3,M] at world points ``P`` [3,M]."""
    q = (look.rot * look.scale) @ (P - look.origin[:, None])
    if look.pattern == "checker":
        w = (np.floor(q[0]) + np.floor(q[1]) + np.floor(q[2])) % 2
    elif look.pattern == "stripes":
        w = np.floor(q[0]) % 2
    elif look.pattern == "noise":
        w = np.minimum(np.maximum(1.6 * _value_noise(q, look.lattice) - 0.3, 0.0), 1.0)
    else:
        return np.repeat(look.c1[:, None], P.shape[1], 1)
    return look.c1[:, None] + (look.c2 - look.c1)[:, None] * w


def _rays(sc: _Scene, uv: np.ndarray) -> np.ndarray:
    """Unit camera-ray directions [3,M] through normalised image points ``uv`` [2,M] (u right, v down, both in
    [-1, 1] across the field of view)."""
    t = sc.tan_half
    d = (t * np.stack([sc.right, -sc.up], 1)) @ uv + sc.fwd[:, None]
    # the camera basis is orthonormal, so |t u right - t v up + fwd| = sqrt(t^2 (u^2 + v^2) + 1)
    return d * (1.0 / np.sqrt(t * t * (uv[0] * uv[0] + uv[1] * uv[1]) + 1.0))


_GRIDS: dict = {}


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``uv`` [2,S*S] (row-major) and the 4 sub-pixel offsets [2,4] of a 2x2 grid."""
    if size not in _GRIDS:
        c = (np.arange(size) + 0.5) / size * 2 - 1
        v, u = np.meshgrid(c, c, indexing="ij")
        h = 0.5 / size  # a quarter pixel in normalised units
        off = np.array([[-h, h, -h, h], [-h, -h, h, h]])
        _GRIDS[size] = (np.stack([u.ravel(), v.ravel()]), off)
    return _GRIDS[size]


# (pixel a, its right / lower neighbour b) as slices of an [H,W] array
_NEIGHBOUR_PAIRS = (
    ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
    ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
)


def _edges(key: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundary masks from a surface/part key map [H,W] and depth [H,W].

    Returns ``(edge, near)`` bool [H,W]: ``edge`` marks, for every pair of 4-neighbours with different keys, the
    nearer pixel of the two (ties broken by key), so it is a one-pixel line on the occluding side of every
    contour; ``near`` marks both pixels of every such pair. Every primitive is convex and every part a connected
    patch, so depth jumps only occur where the key changes; no separate depth test is needed.
    """
    edge = np.zeros(key.shape, dtype=bool)
    near = np.zeros(key.shape, dtype=bool)
    for a_sl, b_sl in _NEIGHBOUR_PAIRS:
        ka, kb, da, db = key[a_sl], key[b_sl], depth[a_sl], depth[b_sl]
        diff = ka != kb
        a_wins = (da < db) | ((da == db) & (ka < kb))
        edge[a_sl] |= diff & a_wins
        edge[b_sl] |= diff & ~a_wins
        near[a_sl] |= diff
        near[b_sl] |= diff
    return edge, near


def _shade(sc: _Scene, P: np.ndarray, nw: np.ndarray, sid: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Linear RGB [3,M] of camera rays ``D`` [3,M] hitting points ``P`` [3,M] with world normals ``nw`` [3,M] on
    surfaces ``sid`` [M]: textured albedo x (ambient + Lambert x shadow test) + Phong highlight on objects."""
    ndl = sc.light @ nw
    direct = np.where((ndl > 0) & ~_shadowed(sc, P + 1e-3 * nw), ndl, 0.0)
    col = np.zeros((3, len(sid)))
    order = np.argsort(sid, kind="stable")
    bounds = np.searchsorted(sid[order], np.arange(len(sc.looks) + 1))
    for s, look in enumerate(sc.looks):
        m = order[bounds[s] : bounds[s + 1]]
        if m.size == 0:
            continue
        dm = direct[m]
        c = _albedo(look, P[:, m]) * (sc.ambient + (1 - sc.ambient) * sc.light_col[:, None] * dm)
        if look.shiny > 0:  # Phong highlight: reflected light direction against the view direction
            refl = 2 * ndl[m] * nw[:, m] - sc.light[:, None]
            spec = np.maximum(-_dot(refl, D[:, m]), 0.0) ** 20 * (dm > 0)
            c += look.shiny * spec
        col[:, m] = c
    return col


def render_sample(seed: int, split: str, index: int, img_size: int = 64) -> dict[str, np.ndarray]:
    """Render sample ``index`` of ``split`` (a pure function of its arguments).

    Args:
        seed: dataset seed.
        split: one of :data:`SPLITS`.
        index: sample index (>= 0).
        img_size: output side length ``S`` in pixels.

    Returns:
        numpy arrays: ``image`` uint8 [S,S,3]; ``semseg`` uint8 [S,S]; ``human_parts`` uint8 [S,S];
        ``depth`` float32 [S,S] metres (255 where no surface is hit); ``normals`` float32 [S,S,3] camera-frame
        unit normals (255 where invalid); ``edge`` uint8 [S,S] in {0,1}.

    Raises:
        MtbenchError: unknown split.
    """
    if split not in _SPLIT_CODE:
        raise MtbenchError(f"unknown synthetic split {split!r}; valid: {', '.join(SPLITS)}")
    rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index)])
    sc = _sample_scene(rng)
    S = int(img_size)
    O = sc.cam[:, None]

    # --- labels: one ray through each pixel centre
    uv, off = _pixel_grid(S)
    Dc = _rays(sc, uv)
    t, sid = _trace(sc, O, Dc)
    hit = np.isfinite(t)
    P = O + np.where(hit, t, 0.0) * Dc
    nw, part = _surface_info(sc, P, sid)
    depth = np.where(hit, t * (sc.fwd @ Dc), _INF)
    ncam = np.stack([sc.right, -sc.up, -sc.fwd]) @ nw  # x right, y down, z towards the camera
    kinds = np.array([0, 0] + [o.kind for o in sc.objects], dtype=np.uint8)
    semseg = np.where(sid >= 0, kinds[np.maximum(sid, 0)], 0).astype(np.uint8)
    key = (sid.astype(np.int32) * 16 + part).reshape(S, S)
    edge, busy = _edges(key, depth.reshape(S, S))

    # --- image: the centre ray of every pixel, plus a 2x2 grid of sub-pixel rays on pixels next to a surface or
    # part boundary (adaptive supersampling: anti-aliased silhouettes at a fraction of the cost of 5 rays/pixel).
    px = np.flatnonzero(busy)
    uv_s = (uv[:, px, None] + off[:, None, :]).reshape(2, -1)  # [2, K*4]
    Ds = _rays(sc, uv_s)
    ts, sids = _trace(sc, O, Ds)
    Ps = O + np.where(np.isfinite(ts), ts, 0.0) * Ds
    nws, _ = _surface_info(sc, Ps, sids)
    cols = _shade(
        sc,
        np.concatenate([P, Ps], 1),
        np.concatenate([nw, nws], 1),
        np.concatenate([sid, sids]),
        np.concatenate([Dc, Ds], 1),
    )
    col = cols[:, : S * S].copy()
    col[:, px] = (col[:, px] + cols[:, S * S :].reshape(3, px.size, 4).sum(-1)) / 5.0
    col = col.reshape(3, S, S)
    img = col.transpose(1, 2, 0) * sc.exposure
    img += sc.noise * rng.standard_normal(img.shape, dtype=np.float32)
    image = (np.minimum(np.maximum(img, 0.0), 1.0) * 255 + 0.5).astype(np.uint8)

    normals = np.where(hit, ncam, IGNORE_INDEX).T.astype(np.float32)
    return {
        "image": image,
        "semseg": semseg.reshape(S, S),
        "human_parts": part.reshape(S, S),
        "depth": np.where(hit, depth, IGNORE_INDEX).astype(np.float32).reshape(S, S),
        "normals": normals.reshape(S, S, 3),
        "edge": edge.astype(np.uint8),
    }


# ----------------------------------------------------------------------------------------------------------------
# Whole splits and the on-disk cache
# ----------------------------------------------------------------------------------------------------------------


_STORAGE_KEYS = ("image", "semseg", "human_parts", "edge", "depth_mm", "normals")


def _render_range(args: tuple) -> dict[str, np.ndarray]:
    split, start, stop, S, seed = args
    n = stop - start
    out = {
        "image": np.zeros((n, S, S, 3), np.uint8),
        "semseg": np.zeros((n, S, S), np.uint8),
        "human_parts": np.zeros((n, S, S), np.uint8),
        "edge": np.zeros((n, S, S), np.uint8),
        "depth_mm": np.zeros((n, S, S), np.uint16),
        "normals": np.zeros((n, S, S, 3), np.float16),
    }
    for k, i in enumerate(range(start, stop)):
        r = render_sample(seed, split, i, S)
        for name in ("image", "semseg", "human_parts", "edge"):
            out[name][k] = r[name]
        valid = r["depth"] != IGNORE_INDEX
        out["depth_mm"][k] = np.where(valid, np.clip(np.round(r["depth"] * 1000), 1, 65535), 0)
        out["normals"][k] = np.where(valid[..., None], r["normals"], 0)
    return out


def _default_workers(n: int) -> int:
    env = os.environ.get("MTBENCH_RENDER_WORKERS")
    if env is not None:
        try:
            return max(1, int(env))
        except ValueError:
            raise MtbenchError(f"MTBENCH_RENDER_WORKERS must be an integer, got {env!r}") from None
    if n < 64 or multiprocessing.current_process().daemon:  # daemonic processes (DataLoader workers) can't fork
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def render_split(
    split: str, n: int, img_size: int = 64, seed: int = 0, workers: int | None = None
) -> dict[str, np.ndarray]:
    """Render samples ``0..n-1`` of ``split`` into the compact storage format.

    Args:
        workers: processes to render with (default: ``$MTBENCH_RENDER_WORKERS``, else one per available core, up
            to 8, for ``n >= 64``). The result does not depend on it.

    Returns:
        ``image`` uint8 [n,S,S,3]; ``semseg``, ``human_parts``, ``edge`` uint8 [n,S,S]; ``depth_mm`` uint16
        [n,S,S] (millimetres, 0 = invalid); ``normals`` float16 [n,S,S,3] (0 = invalid).
    """
    S = int(img_size)
    workers = _default_workers(n) if workers is None else max(1, int(workers))
    if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        step = -(-n // (4 * workers))
        jobs = [(split, a, min(a + step, n), S, seed) for a in range(0, n, step)]
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(workers, mp_context=ctx) as ex:
                parts = list(ex.map(_render_range, jobs))
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        except (OSError, BrokenProcessPool):  # no fork / resources: fall back to rendering here
            pass
    return _render_range((split, 0, n, S, seed))


def cache_path(cache_dir: str | os.PathLike, split: str, n: int, img_size: int, seed: int) -> Path:
    """The file caching a rendered split: ``{cache_dir}/{split}_n{n}_s{img_size}_seed{seed}_v{VERSION}.npz``."""
    return Path(cache_dir) / f"{split}_n{n}_s{img_size}_seed{seed}_v{GENERATOR_VERSION}.npz"


def load_split(
    split: str, n: int, img_size: int = 64, seed: int = 0, cache_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """The storage arrays of :func:`render_split`, from the cache if present, else rendered and cached.

    Samples are a pure function of their index, so a cached file of the same split with more samples is reused
    (its first ``n``). The cache file is written atomically (temporary file in the same directory, then
    ``os.replace``); an unreadable cache file is re-rendered. ``cache_dir`` defaults to :func:`default_cache_dir`.

    Raises:
        MtbenchError: the cache directory cannot be created or written.
    """
    path = cache_path(cache_dir or default_cache_dir(), split, n, img_size, seed)
    candidates = [path]
    if path.parent.is_dir():
        for other in path.parent.glob(f"{split}_n*_s{img_size}_seed{seed}_v{GENERATOR_VERSION}.npz"):
            m = other.name[len(split) + 2 :].split("_", 1)[0]
            if m.isdigit() and int(m) > n:
                candidates.append(other)
    for cand in candidates:
        if not cand.exists():
            continue
        try:
            with np.load(cand) as z:
                arrays = {k: z[k][:n] for k in z.files}
            if all(len(v) == n for v in arrays.values()) and set(arrays) == set(_STORAGE_KEYS):
                return arrays
        except Exception:  # corrupt / truncated cache: try the next one, else re-render
            pass
    arrays = render_split(split, n, img_size, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise MtbenchError(f"cannot write synthetic cache {path}: {e.strerror or e}") from e
    return arrays


class SyntheticMultiTask(Dataset):
    """The synthetic multi-task dataset (see the module docstring for scenes and label definitions).

    Args:
        split: ``train``, ``val``, ``test`` or ``upstream``.
        n: number of samples (default :data:`SPLIT_SIZES`\\[split]); samples are ``0..n-1`` of the split.
        img_size: side length ``S`` of images and labels (rendered natively at this size).
        tasks: task names out of :data:`TASKS`; None for all of them.
        seed: dataset seed; together with split and index it fixes every sample.
        cache_dir: where rendered splits are cached (default :func:`default_cache_dir`).
        train_aug: random horizontal flip (p = 0.5, torch RNG; normals x negated).

    Items are dicts in :data:`mtbench.tasks.SAMPLE_FORMAT`: ``image`` float32 [3,S,S] (ImageNet-normalised),
    ``semseg``/``human_parts`` int64 [S,S], ``sal``/``depth``/``edge`` float32 [1,S,S], ``normals`` float32
    [3,S,S], ``meta`` ``{"id": "synthetic/{split}/{i:05d}", "size": (S, S)}``.

    Raises:
        MtbenchError: unknown split or task, ``n`` < 1, ``img_size`` < 8.
    """

    def __init__(
        self,
        split: str = "train",
        n: int | None = None,
        img_size: int = 64,
        tasks: list[str] | tuple[str, ...] | None = None,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        train_aug: bool = False,
    ):
        self.tasks = check_split_and_tasks("synthetic", split, SPLITS, tasks, TASKS)
        self.n = SPLIT_SIZES[split] if n is None else int(n)
        if self.n < 1:
            raise MtbenchError(f"synthetic split size must be >= 1, got {self.n}")
        self.img_size = int(img_size)
        if self.img_size < 8:
            raise MtbenchError(f"synthetic img_size must be >= 8, got {self.img_size}")
        self.split, self.seed, self.train_aug = split, int(seed), bool(train_aug)
        self.arrays = load_split(split, self.n, self.img_size, self.seed, cache_dir)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        a = self.arrays
        S = self.img_size
        out: dict = {"image": image_to_tensor(a["image"][i])}
        sem = a["semseg"][i]
        if "semseg" in self.tasks:
            out["semseg"] = torch.from_numpy(sem.astype(np.int64))
        if "human_parts" in self.tasks:
            out["human_parts"] = torch.from_numpy(a["human_parts"][i].astype(np.int64))
        if "sal" in self.tasks:
            out["sal"] = torch.from_numpy((sem > 0).astype(np.float32)[None])
        if "normals" in self.tasks:
            n = a["normals"][i].astype(np.float32)
            norm = np.linalg.norm(n, axis=-1, keepdims=True)
            n = np.where(norm > 0.5, n / np.maximum(norm, 1e-6), IGNORE_INDEX).astype(np.float32)
            out["normals"] = torch.from_numpy(np.ascontiguousarray(n.transpose(2, 0, 1)))
        if "depth" in self.tasks:
            d = a["depth_mm"][i]
            out["depth"] = torch.from_numpy(np.where(d > 0, d / 1000.0, IGNORE_INDEX).astype(np.float32)[None])
        if "edge" in self.tasks:
            out["edge"] = torch.from_numpy(a["edge"][i].astype(np.float32)[None])
        if self.train_aug and torch.rand(()).item() < 0.5:
            hflip_sample(out)
        out["meta"] = {"id": f"synthetic/{self.split}/{i:05d}", "size": (S, S)}
        return out


def grid_presence(semseg: torch.Tensor, num_kinds: int = NUM_KINDS, grid: int = 4) -> torch.Tensor:
    """Multi-label upstream target: which object kinds cover each cell of a ``grid`` x ``grid`` partition.

    Args:
        semseg: int [H,W] or [B,H,W] class map (0 = background, 1..num_kinds = kinds, 255 = ignore); H and W
            should be divisible by ``grid`` (otherwise cells are adaptive-pooling windows).
        num_kinds: ``K``, number of kinds excluding background.
        grid: cells per side.

    Returns:
        float32 [K,grid,grid] (or [B,K,grid,grid]): 1 where kind ``k+1`` has at least one pixel in the cell.
    """
    batched = semseg.dim() == 3
    s = semseg if batched else semseg[None]
    kinds = torch.arange(1, num_kinds + 1, device=s.device).view(1, -1, 1, 1)
    onehot = (s[:, None].long() == kinds).float()  # [B,K,H,W]
    out = torch.nn.functional.adaptive_max_pool2d(onehot, grid)
    return out if batched else out[0]


def upstream_targets(sample: dict, grid: int = 4) -> torch.Tensor:
    """:func:`grid_presence` of a sample's ``semseg`` entry: float32 [NUM_KINDS,grid,grid]."""
    return grid_presence(sample["semseg"], NUM_KINDS, grid)


def save_preview(
    path: str | os.PathLike, n: int = 8, split: str = "val", img_size: int = 64, seed: int = 0
) -> Path:
    """Write a PNG grid (one row per sample: image, semseg, parts, sal, depth, normals, edge) for ``n`` samples.

    Samples are rendered directly (no cache). Normals are shown as RGB ``(n + 1) / 2``; depth with a colour map.

    Returns:
        the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ("image", "semseg", "human_parts", "sal", "depth", "normals", "edge")
    fig, axes = plt.subplots(n, len(cols), figsize=(len(cols) * 1.6, n * 1.6), squeeze=False)
    for r in range(n):
        s = render_sample(seed, split, r, img_size)
        sal = (s["semseg"] > 0).astype(float)
        nrm = np.where(s["normals"] == IGNORE_INDEX, 0.0, (s["normals"] + 1) / 2)
        views = {
            "image": (s["image"], {}),
            "semseg": (s["semseg"], dict(cmap="tab10", vmin=0, vmax=9, interpolation="nearest")),
            "human_parts": (s["human_parts"], dict(cmap="tab10", vmin=0, vmax=9, interpolation="nearest")),
            "sal": (sal, dict(cmap="gray", vmin=0, vmax=1, interpolation="nearest")),
            "depth": (np.where(s["depth"] == IGNORE_INDEX, np.nan, s["depth"]), dict(cmap="viridis")),
            "normals": (nrm, dict(interpolation="nearest")),
            "edge": (s["edge"], dict(cmap="gray", vmin=0, vmax=1, interpolation="nearest")),
        }
        for c, name in enumerate(cols):
            ax = axes[r, c]
            arr, kw = views[name]
            ax.imshow(arr, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "GENERATOR_VERSION",
    "SEMSEG_NAMES",
    "PART_NAMES",
    "PART_TO_CLASS",
    "NUM_KINDS",
    "TASKS",
    "SPLITS",
    "SPLIT_SIZES",
    "SyntheticMultiTask",
    "render_sample",
    "render_split",
    "load_split",
    "cache_path",
    "default_cache_dir",
    "grid_presence",
    "upstream_targets",
    "save_preview",
]


# ------------------------------------------------------------------------------------------------------------------
# The dataset spec (everything mtbench knows about this dataset, in one place)
# ------------------------------------------------------------------------------------------------------------------


def _read(root, split, *, tasks=None, img_size=64, augment=None, n=None, label_resolution="resized", seed=0):
    """Reader of the spec: :class:`SyntheticMultiTask` (labels are rendered at ``img_size``, so both label
    resolutions are the same; only the ``flip`` augmentation exists here)."""
    from mtbench.errors import MtbenchError

    if augment not in (None, "flip"):
        raise MtbenchError(f"dataset 'synthetic' has no {augment!r} augmentation; valid: flip")
    if n is not None and split in SPLIT_SIZES and int(n) > SPLIT_SIZES[split]:  # as the real datasets' readers
        raise MtbenchError(f"synthetic split {split!r} has {SPLIT_SIZES[split]} images; asked for the first {int(n)}")
    return SyntheticMultiTask(split, n=n, img_size=img_size, tasks=tasks, seed=seed, cache_dir=root,
                              train_aug=augment == "flip")


def _register() -> None:
    from mtbench.datasets import DatasetSpec, RecipePreset, register_dataset
    from mtbench.train import TrainConfig

    classes = {"semseg": tuple(SEMSEG_NAMES), "human_parts": tuple(PART_NAMES)}
    register_dataset(DatasetSpec(
        name="synthetic",
        title="embedded synthetic scenes (64x64)",
        tasks={t: classes.get(t, ()) for t in TASKS},
        default_tasks=("semseg", "human_parts", "sal", "normals"),
        splits=SPLITS,
        backbone="swin_embedded",
        img_size=64,
        presets={"embedded": RecipePreset(
            "embedded", TrainConfig(), "the embedded default: 6 epochs, batch 32, LR 1e-3, 1 warm-up epoch, flip",
            source="mtbench: sized so that the main job fits in about 10 minutes on 2 CPU cores")},
        reader=_read,
        published="generated on first use (mtbench/data/synthetic.py), cached under $MTBENCH_CACHE",
        expected_counts=dict(SPLIT_SIZES),
    ))
    # The embedded dataset's Δm references are mtbench's own single_task run, shipped in
    # mtbench/assets/single_task_references.json (mtbench.results.load_references reads that file first).


_register()
