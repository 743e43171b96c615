"""Tests for mtbench.data: the synthetic generator and the PASCAL-MT / NYUD-MT readers (on tiny fake datasets)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from mtbench.data import build_dataset
from mtbench.data.nyud import NYUDMT
from mtbench.data.pascal import PascalMT, decode_human_parts
from mtbench.data.synthetic import (
    NUM_KINDS,
    PART_NAMES,
    PART_TO_CLASS,
    SEMSEG_NAMES,
    SyntheticMultiTask,
    cache_path,
    grid_presence,
    render_sample,
    save_preview,
    upstream_targets,
)
from mtbench.data.transforms import hflip_sample, resize_normals
from mtbench.datasets import dataset_names, get_dataset
from mtbench.errors import MtbenchError
from mtbench.tasks import IGNORE_INDEX, dataset_task_table

# ------------------------------------------------------------------------------------------------------------------
# synthetic
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples():
    return [render_sample(0, "train", i, 64) for i in range(24)]


def test_class_lists():
    assert SEMSEG_NAMES[0] == "background" and PART_NAMES[0] == "background"
    assert len(SEMSEG_NAMES) <= 8 and len(PART_TO_CLASS) == len(PART_NAMES)
    assert NUM_KINDS == len(SEMSEG_NAMES) - 1
    table = dataset_task_table("synthetic")
    assert table["semseg"].out_channels == len(SEMSEG_NAMES)
    assert table["human_parts"].out_channels == len(PART_NAMES)
    for p, c in enumerate(PART_TO_CLASS):  # part names start with their kind's name
        assert PART_NAMES[p].startswith(SEMSEG_NAMES[c]) or c == 0


def test_render_determinism():
    a, b = render_sample(0, "train", 5), render_sample(0, "train", 5)
    c = render_sample(1, "train", 5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"])
    assert not np.array_equal(a["depth"], c["depth"])


def test_splits_disjoint():
    digests = {}
    for split in ("train", "val", "test", "upstream"):
        for i in range(8):
            s = render_sample(0, split, i, 32)
            key = s["depth"].tobytes()
            assert key not in digests, f"{split}/{i} equals {digests.get(key)}"
            digests[key] = (split, i)


def test_render_shapes_and_dtypes(samples):
    s = samples[0]
    assert s["image"].shape == (64, 64, 3) and s["image"].dtype == np.uint8
    assert s["semseg"].shape == (64, 64) and s["human_parts"].shape == (64, 64)
    assert s["normals"].shape == (64, 64, 3) and s["depth"].shape == (64, 64) and s["edge"].shape == (64, 64)
    for size in (32, 96):
        r = render_sample(0, "val", 0, size)
        assert r["image"].shape == (size, size, 3) and r["normals"].shape == (size, size, 3)


def test_label_consistency(samples):
    n_obj = 0
    for s in samples:
        sem, parts, depth, nrm = s["semseg"], s["human_parts"], s["depth"], s["normals"]
        assert sem.max() < len(SEMSEG_NAMES) and parts.max() < len(PART_NAMES)
        # every part belongs to its kind; background part <=> background class
        np.testing.assert_array_equal(np.asarray(PART_TO_CLASS)[parts], sem)
        # every pixel hits floor, wall or an object: depth and normals valid everywhere
        assert (depth != IGNORE_INDEX).all() and (depth > 0.5).all() and (depth < 15).all()
        np.testing.assert_allclose(np.linalg.norm(nrm, axis=-1), 1.0, atol=1e-4)
        # visible surfaces face the viewer: z > 0 (camera coordinates, z towards the camera) up to perspective
        # (a side face near the image border can be seen at up to ~half the field of view past 90 degrees)
        assert (nrm[..., 2] > -1e-3).mean() > 0.95 and (nrm[..., 2] > -0.5).all()
        n_obj += int((sem > 0).any())
        # floor (background, normal ~ camera "up" = -y, pitch <= 24 deg) and wall (normal ~ +z, yaw <= 8 deg)
        floor = (sem == 0) & (nrm[..., 1] < -0.85)
        wall = (sem == 0) & (nrm[..., 2] > 0.85)
        assert ((sem == 0) == (floor | wall)).all(), "background is floor or wall"
        assert floor[-1].any() and wall[0].any()
        # the wall is behind the floor seen at the bottom of the image
        assert depth[wall].min() > depth[-1][floor[-1]].max()
        # floor depth decreases towards the bottom of the image (closer to the camera): every pixel of floor
        # directly above another floor pixel is farther away
        below = floor[:-1] & floor[1:]
        assert below.sum() > 20 and (depth[1:][below] < depth[:-1][below]).all()
        # upward-facing parts have upward camera normals
        for p in (PART_NAMES.index("box_top"), PART_NAMES.index("cylinder_cap")):
            if (parts == p).any():
                assert (nrm[parts == p][:, 1] < -0.85).all()
        top, bot = parts == PART_NAMES.index("sphere_top"), parts == PART_NAMES.index("sphere_bottom")
        if top.sum() > 3 and bot.sum() > 3:
            assert nrm[top][:, 1].mean() < nrm[bot][:, 1].mean()
    assert n_obj >= len(samples) - 2  # objects are nearly always visible


def test_edges_follow_label_changes(samples):
    for s in samples:
        hp = s["human_parts"].astype(int)
        key = hp * 2 + ((hp == 0) & (s["normals"][..., 1] < -0.85))  # parts, background split into floor/wall
        e = s["edge"].astype(bool)
        assert set(np.unique(s["edge"])) <= {0, 1}
        # across every boundary between different labels, one of the two pixels is an edge pixel
        dx = key[:, 1:] != key[:, :-1]
        assert (e[:, 1:] | e[:, :-1])[dx].all()
        dy = key[1:] != key[:-1]
        assert (e[1:] | e[:-1])[dy].all()
        # and edge pixels lie on such boundaries, or on an occlusion between two objects of the same part (depth jump)
        d = s["depth"]
        dx |= np.abs(d[:, 1:] - d[:, :-1]) > 0.05 * np.minimum(d[:, 1:], d[:, :-1])
        dy |= np.abs(d[1:] - d[:-1]) > 0.05 * np.minimum(d[1:], d[:-1])
        nb = np.zeros_like(e)
        nb[:, 1:] |= dx
        nb[:, :-1] |= dx
        nb[1:] |= dy
        nb[:-1] |= dy
        assert not (e & ~nb).any()
        assert e.mean() < 0.25


def test_dataset_cache_and_format(tmp_path):
    ds = SyntheticMultiTask("val", n=6, img_size=32, seed=3, cache_dir=tmp_path)
    path = cache_path(tmp_path, "val", 6, 32, 3)
    assert path.exists() and len(ds) == 6
    assert not list(tmp_path.glob("*.tmp"))
    ds2 = SyntheticMultiTask("val", n=6, img_size=32, seed=3, cache_dir=tmp_path)
    for k in ds.arrays:
        np.testing.assert_array_equal(ds.arrays[k], ds2.arrays[k])
    s = ds[2]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["semseg"].shape == (32, 32) and s["semseg"].dtype == torch.int64
    assert s["human_parts"].dtype == torch.int64
    for k, c in (("sal", 1), ("depth", 1), ("edge", 1), ("normals", 3)):
        assert s[k].shape == (c, 32, 32) and s[k].dtype == torch.float32
    assert s["meta"] == {"id": "synthetic/val/00002", "size": (32, 32)}
    torch.testing.assert_close(s["sal"][0], (s["semseg"] > 0).float())
    # stored labels match the renderer (depth to 1 mm, normals to float16 precision)
    r = render_sample(3, "val", 2, 32)
    np.testing.assert_allclose(s["depth"][0].numpy(), r["depth"], atol=6e-4)
    np.testing.assert_allclose(s["normals"].numpy().transpose(1, 2, 0), r["normals"], atol=2e-3)
    np.testing.assert_array_equal(s["semseg"].numpy(), r["semseg"])
    # image is ImageNet normalised
    assert -2.2 < s["image"].min() and s["image"].max() < 2.7
    # a different seed is a different cache file
    SyntheticMultiTask("val", n=6, img_size=32, seed=4, cache_dir=tmp_path)
    assert cache_path(tmp_path, "val", 6, 32, 4).exists()
    # a smaller split is served from the cached larger one (samples are a prefix)
    small = SyntheticMultiTask("val", n=4, img_size=32, seed=3, cache_dir=tmp_path)
    assert not cache_path(tmp_path, "val", 4, 32, 3).exists()
    np.testing.assert_array_equal(small.arrays["image"], ds.arrays["image"][:4])
    # a corrupt cache file is re-rendered
    cache_path(tmp_path, "val", 6, 32, 4).write_bytes(b"garbage")
    again = SyntheticMultiTask("val", n=6, img_size=32, seed=4, cache_dir=tmp_path)
    assert again.arrays["image"].shape == (6, 32, 32, 3)


def test_dataset_tasks_and_errors(tmp_path):
    ds = SyntheticMultiTask("test", n=2, img_size=16, tasks=["semseg", "depth"], cache_dir=tmp_path)
    assert set(ds[0]) == {"image", "semseg", "depth", "meta"}
    with pytest.raises(MtbenchError, match="valid"):
        SyntheticMultiTask("test", n=2, img_size=16, tasks=["foo"], cache_dir=tmp_path)
    with pytest.raises(MtbenchError, match="upstream"):
        SyntheticMultiTask("holdout", n=2, cache_dir=tmp_path)


def test_train_aug_flip(tmp_path):
    plain = SyntheticMultiTask("train", n=2, img_size=16, cache_dir=tmp_path)
    aug = SyntheticMultiTask("train", n=2, img_size=16, cache_dir=tmp_path, train_aug=True)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(12):
        a, p = aug[0], plain[0]
        if torch.equal(a["image"], p["image"]):
            continue
        flipped += 1
        torch.testing.assert_close(a["image"], p["image"].flip(-1))
        torch.testing.assert_close(a["semseg"], p["semseg"].flip(-1))
        torch.testing.assert_close(a["normals"][0], -p["normals"][0].flip(-1))
        torch.testing.assert_close(a["normals"][1:], p["normals"][1:].flip(-1))
    assert 0 < flipped < 12


def test_hflip_keeps_invalid_normals():
    n = torch.tensor([[[0.6, IGNORE_INDEX]], [[0.0, IGNORE_INDEX]], [[0.8, IGNORE_INDEX]]])  # [3,1,2]
    out = hflip_sample({"normals": n.clone()})["normals"]
    assert out[:, 0, 0].tolist() == [IGNORE_INDEX] * 3
    torch.testing.assert_close(out[:, 0, 1], torch.tensor([-0.6, 0.0, 0.8]))


def test_grid_presence():
    sem = torch.zeros(8, 8, dtype=torch.int64)
    sem[0:2, 0:2] = 1  # kind 1 in cell (0,0)
    sem[7, 7] = 4  # kind 4 in cell (3,3)
    sem[4, 0] = IGNORE_INDEX
    g = grid_presence(sem, NUM_KINDS, 4)
    assert g.shape == (NUM_KINDS, 4, 4) and g.dtype == torch.float32
    assert g.sum() == 2 and g[0, 0, 0] == 1 and g[3, 3, 3] == 1
    gb = grid_presence(torch.stack([sem, sem]), NUM_KINDS, 4)
    assert gb.shape == (2, NUM_KINDS, 4, 4)
    s = {"semseg": torch.from_numpy(render_sample(0, "upstream", 0, 32)["semseg"].astype(np.int64))}
    t = upstream_targets(s)
    assert t.shape == (NUM_KINDS, 4, 4)
    present = set(np.unique(s["semseg"].numpy())) - {0}
    assert {k + 1 for k in range(NUM_KINDS) if t[k].any()} == present


def test_save_preview(tmp_path):
    p = save_preview(tmp_path / "prev.png", n=2, img_size=32)
    assert p.exists() and Image.open(p).size[0] > 100


def test_build_dataset(tmp_path):
    sizes = {n: get_dataset(n).img_size for n in dataset_names()}
    assert sizes == {"synthetic": 64, "pascal_context": 448, "nyud": 448}
    ds = build_dataset("synthetic", "val", root=tmp_path, img_size=16, n=3)
    assert len(ds) == 3 and ds[0]["image"].shape == (3, 16, 16)
    with pytest.raises(MtbenchError, match="synthetic, pascal_context, nyud"):
        build_dataset("cityscapes", "train")
    with pytest.raises(MtbenchError, match="train, val, test"):
        build_dataset("nyud", "upstream", root=tmp_path)
    with pytest.raises(MtbenchError, match="not found"):
        build_dataset("pascal_context", "train", root=tmp_path / "nope")
    with pytest.raises(MtbenchError, match="human_parts|valid"):
        build_dataset("nyud", "train", root=tmp_path, tasks=["human_parts"])


def test_resize_normals_marks_invalid():
    n = np.zeros((4, 6, 3), np.float32)
    n[..., 2] = 1.0
    n[:, :2] = IGNORE_INDEX
    out = resize_normals(n, 8)
    assert out.shape == (8, 8, 3)
    assert (out[:, :2] == IGNORE_INDEX).all()
    np.testing.assert_allclose(out[:, -3:], np.broadcast_to([0, 0, 1], (8, 3, 3)), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# PASCAL-MT (fake on-disk dataset)
# ------------------------------------------------------------------------------------------------------------------

H, W = 20, 30


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _parts_struct(masks_by_part, extra_object=True):
    pdt = [("part_name", "O"), ("mask", "O")]
    odt = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    parts = np.zeros((1, len(masks_by_part)), dtype=pdt)
    for j, (name, m) in enumerate(masks_by_part.items()):
        parts[0, j] = (name, m.astype(np.uint8))
    objs = np.zeros((1, 2 if extra_object else 1), dtype=odt)
    objs[0, 0] = ("person", 15, np.ones((H, W), np.uint8), parts)
    if extra_object:  # a cat with a "head" part: must be ignored (not a person)
        cat_parts = np.zeros((1, 1), dtype=pdt)
        cat_parts[0, 0] = ("head", np.ones((H, W), np.uint8))
        objs[0, 1] = ("cat", 8, np.ones((H, W), np.uint8), cat_parts)
    return {"imname": "x", "objects": objs}


@pytest.fixture()
def pascal_root(tmp_path):
    root = tmp_path / "PASCAL_MT"
    ids = ["2008_000001", "2008_000002", "2008_000003"]
    rng = np.random.default_rng(0)
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets" / "Context" / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    (root / "ImageSets" / "Context" / "val.txt").write_text(ids[2] + "\n\n")
    for k, sid in enumerate(ids):
        _png(root / "JPEGImages" / f"{sid}.jpg", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        sem = np.zeros((H, W), np.uint8)
        sem[:, W // 2 :] = 15
        sem[0, 0] = 255
        sub = "VOC12" if k == 0 else "pascal-context"  # second/third use the fallback directory
        _png(root / "semseg" / sub / f"{sid}.png", sem)
        sal = np.full((H, W), 40, np.uint8)
        sal[:, W // 2 :] = 200
        _png(root / "sal_distill" / f"{sid}.png", sal)
        nrm = np.zeros((H, W, 3), np.uint8)
        nrm[...] = (128, 128, 255)  # ~ (0, 0, 1)
        nrm[:, :10] = (255, 128, 128)  # ~ (1, 0, 0)
        nrm[:, 20:] = (127, 128, 128)  # ~ zero vector: invalid
        _png(root / "normals_distill" / f"{sid}.png", nrm)
        lm = np.full((H, W), 22, np.uint16)  # context class 22 'bench': NYU-compatible, normals valid
        lm[-4:] = 7  # context class 7 'atrium': not in the NYU list, normals masked
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "pascal-context" / "trainval" / f"{sid}.mat", {"LabelMap": lm})
        (root / "human_parts").mkdir(exist_ok=True)
        if k == 0:
            head = np.zeros((H, W), bool)
            head[:5, :5] = True
            rleg = np.zeros((H, W), bool)
            rleg[10:, 10:15] = True
            anno = _parts_struct({"head": head, "rlleg": rleg})
        elif k == 1:  # simplified form: the part map itself
            anno = np.zeros((H, W), np.uint8)
            anno[:, :3] = 2
        else:  # a person without parts -> whole map ignored
            anno = _parts_struct({}, extra_object=False)
        scipy.io.savemat(root / "human_parts" / f"{sid}.mat", {"anno": anno})
    return root


def test_pascal_reader(pascal_root):
    ds = PascalMT(pascal_root, "train", img_size=16)
    assert len(ds) == 2
    s = ds[0]
    assert s["image"].shape == (3, 16, 16) and s["image"].dtype == torch.float32
    assert s["meta"] == {"id": "2008_000001", "size": (H, W)}
    assert s["semseg"].shape == (16, 16) and s["semseg"].dtype == torch.int64
    assert set(s["semseg"].unique().tolist()) <= {0, 15, 255}
    assert (s["semseg"][:, -4:] == 15).all() and (s["semseg"][1:, :4] == 0).all()
    assert s["semseg"][0, 0] == IGNORE_INDEX
    assert s["sal"].shape == (1, 16, 16) and set(s["sal"].unique().tolist()) == {0.0, 1.0}
    assert (s["sal"][0, :, -4:] == 1).all() and (s["sal"][0, :, :4] == 0).all()
    assert s["edge"].shape == (1, 16, 16) and s["edge"].sum() > 0
    assert set(s["edge"].unique().tolist()) <= {0.0, 1.0}
    # human parts from the PASCAL-Part structure: person parts mapped, the cat's "head" ignored
    hp = s["human_parts"]
    assert hp.dtype == torch.int64 and set(hp.unique().tolist()) == {0, 1, 6}
    assert hp[0, 0] == 1 and hp[-1, 6] == 6 and hp[8, -1] == 0
    # normals: decoded, renormalised, invalid -> 255
    n = s["normals"]
    assert n.shape == (3, 16, 16)
    torch.testing.assert_close(n[:, 8, 1], torch.tensor([1.0, 0.0, 0.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(n[:, 8, 8], torch.tensor([0.0, 0.0, 1.0]), atol=0.02, rtol=0)
    assert (n[:, :, -3:] == IGNORE_INDEX).all()
    assert (n[:, 13:] == IGNORE_INDEX).all() and (n[:, :12, :4] != IGNORE_INDEX).all()  # class mask (atrium rows)
    valid = n[0] != IGNORE_INDEX
    torch.testing.assert_close(n[:, valid].norm(dim=0), torch.ones(int(valid.sum())))
    # the simplified part-map form
    hp2 = ds[1]["human_parts"]
    assert set(hp2.unique().tolist()) == {0, 2}


def test_pascal_splits_tasks_and_errors(pascal_root):
    val = PascalMT(pascal_root, "test", tasks=["human_parts", "sal"], img_size=12)
    s = val[0]
    assert set(s) == {"image", "human_parts", "sal", "meta"}
    assert (s["human_parts"] == IGNORE_INDEX).all()  # no part pixel -> ignored
    assert len(PascalMT(pascal_root, "val", tasks=["sal"])) == 1  # no val_select.txt -> val.txt
    (pascal_root / "ImageSets" / "Context" / "val_select.txt").write_text("2008_000001\n")
    assert PascalMT(pascal_root, "val", tasks=["sal"]).ids == ["2008_000001"]
    assert len(PascalMT(pascal_root, "train", n=1)) == 1
    with pytest.raises(MtbenchError, match=r"PASCAL_MT split 'train' has 2 images \(.*train.txt\); asked for the "
                                           r"first 3$"):
        PascalMT(pascal_root, "train", n=3)  # --train-size beyond the split: an error, not a smaller run
    with pytest.raises(MtbenchError, match="not found"):
        PascalMT(pascal_root / "missing", "train")
    with pytest.raises(MtbenchError, match="train.txt"):
        (pascal_root / "ImageSets" / "Context" / "train.txt").unlink()
        PascalMT(pascal_root, "train")
    with pytest.raises(MtbenchError, match="depth"):
        PascalMT(pascal_root, "test", tasks=["depth"])
    (pascal_root / "sal_distill" / "2008_000003.png").unlink()
    with pytest.raises(MtbenchError, match="2008_000003.png"):
        PascalMT(pascal_root, "test", tasks=["sal"])
    PascalMT(pascal_root, "test", tasks=["semseg"])  # only requested tasks' files are needed


def test_pascal_via_build_dataset(pascal_root):
    ds = build_dataset("pascal_context", "train", root=pascal_root, tasks=["semseg"], img_size=24, train_aug=True)
    assert ds[0]["semseg"].shape == (24, 24)


def test_decode_human_parts_rejects_garbage():
    with pytest.raises(MtbenchError):
        decode_human_parts("nonsense", (H, W))


# ------------------------------------------------------------------------------------------------------------------
# NYUD-MT (fake on-disk dataset)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def nyud_root(tmp_path):
    root = tmp_path / "NYUD_MT"
    ids = ["img_5001", "img_5002"]
    rng = np.random.default_rng(1)
    (root / "gt_sets").mkdir(parents=True)
    (root / "gt_sets" / "train.txt").write_text("\n".join(ids) + "\n")
    (root / "gt_sets" / "val.txt").write_text(ids[1] + "\n")
    for d in ("depth", "normals", "edge"):
        (root / d).mkdir()
    for k, sid in enumerate(ids):
        ext = ".jpg" if k == 0 else ".png"
        _png(root / "images" / f"{sid}{ext}", rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
        seg = np.full((H, W), 5, np.uint8)
        seg[:, :10] = 0
        seg[:, 20:] = 40
        _png(root / "segmentation" / f"{sid}.png", seg)
        depth = np.full((H, W), 2.5, np.float32)
        depth[:5] = 0.0
        np.save(root / "depth" / f"{sid}.npy", depth if k == 0 else depth[..., None])
        nrm = np.zeros((H, W, 3), np.float32)
        nrm[..., 1] = -1.0
        nrm[H // 2 :] = (0.0, 0.0, 0.0)  # invalid
        np.save(root / "normals" / f"{sid}.npy", nrm)
        edge = np.zeros((H, W), np.float32)
        edge[:, 10] = 1.0
        np.save(root / "edge" / f"{sid}.npy", edge)
    return root


def test_nyud_reader(nyud_root):
    ds = NYUDMT(nyud_root, "train", img_size=16)
    assert len(ds) == 2
    for i in range(2):
        s = ds[i]
        assert s["image"].shape == (3, 16, 16)
        assert s["meta"]["size"] == (H, W)
        sem = s["semseg"]
        assert sem.dtype == torch.int64 and sem.shape == (16, 16)
        assert set(sem.unique().tolist()) == {255, 4, 39}
        assert (sem[:, :4] == 255).all() and (sem[:, 8] == 4).all() and (sem[:, -3:] == 39).all()
        d = s["depth"]
        assert d.shape == (1, 16, 16) and d.dtype == torch.float32
        assert (d[0, :3] == IGNORE_INDEX).all() and (d[0, -8:] == 2.5).all()
        n = s["normals"]
        torch.testing.assert_close(n[:, 2, 5], torch.tensor([0.0, -1.0, 0.0]))
        assert (n[:, -6:] == IGNORE_INDEX).all()
        e = s["edge"]
        assert e.shape == (1, 16, 16) and set(e.unique().tolist()) == {0.0, 1.0}
    raw_img, raw = ds.load_raw(0)
    assert raw_img.shape == (H, W, 3) and raw["semseg"][0, 12] == 4 and raw["semseg"][0, 0] == 255


def test_nyud_splits_and_errors(nyud_root):
    assert NYUDMT(nyud_root, "test").ids == ["img_5002"]
    assert NYUDMT(nyud_root, "val").ids == ["img_5002"]
    with pytest.raises(MtbenchError, match="NYUD_MT split 'train' has 2 images .*; asked for the first 5$"):
        NYUDMT(nyud_root, "train", n=5)
    s = NYUDMT(nyud_root, "train", tasks=["depth"], img_size=8)[0]
    assert set(s) == {"image", "depth", "meta"}
    with pytest.raises(MtbenchError, match="not found"):
        NYUDMT(nyud_root / "nope", "train")
    with pytest.raises(MtbenchError, match="sal"):
        NYUDMT(nyud_root, "train", tasks=["sal"])
    with pytest.raises(MtbenchError, match="unknown nyud split"):
        NYUDMT(nyud_root, "upstream")
    (nyud_root / "depth" / "img_5001.npy").unlink()
    with pytest.raises(MtbenchError, match="img_5001.npy"):
        NYUDMT(nyud_root, "train")
    (nyud_root / "gt_sets" / "val.txt").unlink()
    with pytest.raises(MtbenchError, match="val.txt"):
        NYUDMT(nyud_root, "test")
    ds = build_dataset("nyud", "train", root=nyud_root, tasks=["semseg", "normals"], img_size=10)
    assert ds[1]["normals"].shape == (3, 10, 10)
