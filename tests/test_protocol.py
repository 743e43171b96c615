"""The papers' protocol on (miniature) real data: ScaleNRotate, the normals class mask, Laplacian+thin edges, the
dataset specs, ``mtbench data check``, one-line data errors during training, and ``--preset paper`` end to end.

The miniature PASCAL_MT / NYUD_MT folders (exact on-disk formats) come from the fixtures of ``test_data.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_entry import mtbench
from test_data import H, W, _png, nyud_root, pascal_root  # noqa: F401  (fixtures)

from mtbench.data import build_dataset
from mtbench.data.check import check_dataset
from mtbench.data.nyud import SCALE_ROTATE as NYUD_SR
from mtbench.data.pascal import NORMALS_CLASSES_FILE, PascalMT, normals_valid_classes
from mtbench.data.pascal import SCALE_ROTATE as PASCAL_SR
from mtbench.data.transforms import label_edges, scale_rotate
from mtbench.datasets import dataset_names, get_dataset, resolve_recipe
from mtbench.errors import MtbenchError
from mtbench.tasks import IGNORE_INDEX, TASK_KINDS, resolve_tasks

# ------------------------------------------------------------------------------------------------ ScaleNRotate


def _pattern(h=40, w=60):
    """A bright 5x5 square at rows 5..9, cols 35..39 in image, semseg (class 7) and depth; normals point right."""
    img = np.zeros((h, w, 3), np.uint8)
    img[5:10, 35:40] = 250
    sem = np.zeros((h, w), np.uint8)
    sem[5:10, 35:40] = 7
    depth = np.full((h, w), 2.0, np.float32)
    depth[5:10, 35:40] = 4.0
    nrm = np.zeros((h, w, 3), np.float32)
    nrm[..., 0] = 1.0
    return img, {"semseg": sem, "depth": depth, "normals": nrm}


def test_scale_rotate_moves_image_labels_and_normals_together():
    img, labels = _pattern()
    out_img, out = scale_rotate(img, labels, 90.0, 1.0)
    # OpenCV's getRotationMatrix2D convention about (W/2, H/2) = (30, 20), 90 degrees counter-clockwise on screen:
    # x' = y + 30 - 20, y' = -x + 30 + 20. Rows 5..9 -> cols 15..19; cols 35..39 -> rows 15..11.
    expect = np.zeros((40, 60), bool)
    expect[11:16, 15:20] = True
    assert ((out["semseg"] == 7) == expect).all()
    assert ((out_img[..., 0] > 128) == expect).all()  # the image moved exactly as the label
    assert (out["depth"][expect] == 4.0).all() and (out["depth"][5:10, 40:50] == 2.0).all()
    # a normal pointing right (+x) now points up (-y, image y is down); z unchanged
    valid = (out["normals"] != IGNORE_INDEX).all(-1)
    assert valid[expect].all()
    np.testing.assert_allclose(out["normals"][valid], np.tile([0.0, -1.0, 0.0], (int(valid.sum()), 1)), atol=1e-5)
    # outside the rotated source: image 0, semseg 0 (the official zero border), normals and depth invalid
    assert (out_img[:, :5] == 0).all() and (out["semseg"][:, :5] == 0).all()
    assert (out["normals"][:, :5] == IGNORE_INDEX).all() and (out["depth"][:, :5] == IGNORE_INDEX).all()


def test_scale_rotate_zoom_divides_depth_and_rotates_normals_by_the_angle():
    img, labels = _pattern()
    labels["semseg"] = np.roll(labels["semseg"], 10, axis=0)  # the square at rows 15..19, cols 35..39
    labels["depth"] = np.roll(labels["depth"], 10, axis=0)
    _, out = scale_rotate(img, labels, 0.0, 2.0)
    # zoom 2 about (30, 20): x' = 2x - 30, y' = 2y - 20 -> the square covers rows 10..18, cols 40..48; depth is
    # divided by the scale (4 -> 2 on the square, 2 -> 1 elsewhere)
    assert (out["semseg"][10:18, 40:48] == 7).all() and (out["semseg"][20:, :] == 0).all()
    assert (out["semseg"][:, :39] == 0).all() and (out["semseg"][:9] == 0).all()
    assert (out["depth"][10:18, 40:48] == 2.0).all() and (out["depth"][20:] == 1.0).all()
    _, out = scale_rotate(img, labels, 30.0, 1.0)
    valid = (out["normals"] != IGNORE_INDEX).all(-1)
    t = np.deg2rad(30.0)
    np.testing.assert_allclose(out["normals"][valid][:, :2], np.tile([np.cos(t), -np.sin(t)], (int(valid.sum()), 1)),
                               atol=1e-4)


def test_scale_rotate_draws_follow_the_papers_ranges():
    g = torch.Generator().manual_seed(0)
    draws = [PASCAL_SR.draw(g) for _ in range(200)]
    rots, scales = np.array([d[0] for d in draws]), np.array([d[1] for d in draws])
    assert rots.min() >= -20 and rots.max() <= 20 and rots.min() < -15 and rots.max() > 15
    assert scales.min() >= 0.75 and scales.max() <= 1.25
    nyud = {NYUD_SR.draw(g) for _ in range(100)}
    assert nyud == {(0.0, 1.0), (0.0, 1.2), (0.0, 1.5)}


def test_paper_augmentation_through_the_readers(pascal_root, nyud_root):  # noqa: F811
    torch.manual_seed(0)
    ds = build_dataset("pascal_context", "train", root=pascal_root, img_size=32, train_aug="paper")
    for i in range(2):
        s = ds[i]
        assert s["image"].shape == (3, 32, 32) and s["semseg"].shape == (32, 32)
        n = s["normals"]
        valid = (n != IGNORE_INDEX).all(0)
        torch.testing.assert_close(n[:, valid].norm(dim=0), torch.ones(int(valid.sum())), atol=1e-5, rtol=0)
    nd = build_dataset("nyud", "train", root=nyud_root, img_size=16, train_aug="paper")
    depths = set()
    for _ in range(12):
        d = nd[0]["depth"]
        depths |= set(d[d != IGNORE_INDEX].unique().tolist())
    allowed = np.float32([2.5, 2.5 / 1.2, 2.5 / 1.5])  # depth divided by the drawn scale
    assert all(np.isclose(allowed, v, rtol=1e-6).any() for v in depths) and len(depths) >= 2
    with pytest.raises(MtbenchError, match="'paper' augmentation"):
        build_dataset("synthetic", "train", train_aug="paper", n=2)


# ------------------------------------------------------------------------------------------------ label details


def test_normals_mask_follows_the_shipped_class_lists(tmp_path):
    data = json.loads(NORMALS_CLASSES_FILE.read_text())
    assert "astmt" in data["source"] and data["license"]
    ctx = data["context_classes"]
    valid = set(normals_valid_classes())
    assert ctx["bed"] in valid and ctx["chair"] in valid  # in both lists
    assert ctx["tvmonitor"] in valid and "tvmonitor" not in data["nyu_classes"]  # the custom addition
    assert ctx["aeroplane"] not in valid and ctx["sky"] not in valid  # not NYU classes
    # a sample whose LabelMap has one column block per class: normals survive exactly on the NYU-compatible ones
    root = tmp_path / "PASCAL_MT"
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets" / "Context" / "train.txt").write_text("a\n")
    _png(root / "JPEGImages" / "a.jpg", np.zeros((8, 16, 3), np.uint8))
    _png(root / "normals_distill" / "a.png", np.full((8, 16, 3), (128, 128, 255), np.uint8))
    lm = np.zeros((8, 16), np.uint16)
    names = ["bed", "aeroplane", "tvmonitor", "sky"]
    for k, name in enumerate(names):
        lm[:, 4 * k: 4 * k + 4] = ctx[name]
    import scipy.io

    (root / "pascal-context" / "trainval").mkdir(parents=True)
    scipy.io.savemat(root / "pascal-context" / "trainval" / "a.mat", {"LabelMap": lm})
    n = PascalMT(root, "train", tasks=["normals"], img_size=16).load_raw(0)[1]["normals"]
    ok = (n != IGNORE_INDEX).all(-1)
    assert ok[:, 0:4].all() and ok[:, 8:12].all() and not ok[:, 4:8].any() and not ok[:, 12:16].any()
    n = PascalMT(root, "train", tasks=["normals"], normals_mask=False).load_raw(0)[1]["normals"]
    assert (n != IGNORE_INDEX).all()  # the mask can be switched off


def test_edges_are_a_thinned_laplacian_of_the_label_map():
    lm = np.ones((6, 6), np.uint16)
    lm[:, 3:] = 2  # a vertical boundary between columns 2 and 3
    # Laplacian [[0,1,0],[1,-4,1],[0,1,0]] (reflect-101 border) is non-zero on both sides: columns 2 and 3, every
    # row; thinning keeps one pixel per row of that band (skimage.thin drops the band's end pixel at the border)
    expect = np.zeros((6, 6), np.uint8)
    expect[1:, 2] = 1
    np.testing.assert_array_equal(label_edges(lm), expect)
    # a 3x3 block: the two-pixel ring around its border thins to a closed one-pixel line around the centre pixel
    lm = np.ones((7, 7), np.uint16)
    lm[2:5, 2:5] = 3
    expect = np.zeros((7, 7), np.uint8)
    expect[2, 3] = expect[3, 2] = expect[3, 4] = expect[4, 3] = 1
    np.testing.assert_array_equal(label_edges(lm), expect)
    assert label_edges(np.full((5, 5), 4)).sum() == 0


def test_nyud_label_decoding(nyud_root):  # noqa: F811
    img, raw = build_dataset("nyud", "train", root=nyud_root).load_raw(0)
    assert raw["semseg"][0, 0] == IGNORE_INDEX and raw["semseg"][0, 12] == 4 and raw["semseg"][0, 25] == 39
    assert (raw["depth"][:5] == IGNORE_INDEX).all() and (raw["depth"][5:] == 2.5).all()


# ------------------------------------------------------------------------------------------------ specs


def test_dataset_specs_own_tasks_backbone_presets_and_references():
    assert set(dataset_names()) >= {"synthetic", "pascal_context", "nyud"}
    nyud = get_dataset("nyud")
    assert nyud.references == {"normals": 22.43, "depth": 0.814, "semseg": 36.73}
    assert "TDSS" in nyud.reference_source and "Table 2" in nyud.reference_source and "rmse" in nyud.reference_source
    assert {t.name: t.out_channels for t in resolve_tasks("nyud")} == {"semseg": 40, "depth": 1, "normals": 3}
    assert get_dataset("pascal_context").backbone == "swin_tiny_patch4_window7_224"
    assert get_dataset("synthetic").backbone == "swin_embedded"
    assert all(TASK_KINDS[t].loss_weight > 0 for t in TASK_KINDS)
    name, paper = resolve_recipe("pascal_context", "paper")
    assert name == "paper" and paper.epochs == 300 and paper.batch_size == 32 and paper.warmup_epochs == 20
    assert paper.lr == pytest.approx(5e-4 * 32 / 512) and paper.grad_clip == 5.0 and paper.eval_every == 5
    assert paper.weight_decay == 0.05 and paper.no_decay_position_tables and paper.augment == "paper"
    assert paper.num_workers > 0 and paper.persistent_workers and paper.pin_memory
    _, paper64 = resolve_recipe("nyud", "paper", batch_size=64)
    assert paper64.lr == pytest.approx(5e-4 * 64 / 512) and paper64.min_lr == pytest.approx(5e-6 * 64 / 512)
    name, emb = resolve_recipe("synthetic")
    assert name == "embedded" and emb.epochs == 6 and emb.num_workers == 0 and emb.augment == "flip"
    with pytest.raises(MtbenchError, match="unknown --preset 'paper' for dataset 'synthetic'; valid: embedded"):
        resolve_recipe("synthetic", "paper")


def test_paper_preset_exempts_position_tables_from_weight_decay():
    from mtbench.config import MethodSpec
    from mtbench.registry import build_model, resolve_spec
    from mtbench.swin import create_backbone
    from mtbench.train import build_optimizer

    rm = resolve_spec(MethodSpec("mtlora", {}))
    model = build_model(rm, create_backbone("swin_embedded"), resolve_tasks("synthetic"))
    tables = {id(p) for p in model.parameters() if p.requires_grad and model.param_category(p)[1] == "rel_pos"}
    assert tables
    for preset, decayed in (("paper", False), ("embedded", True)):
        cfg = resolve_recipe("pascal_context", preset)[1]
        opt = build_optimizer(model, cfg)
        in_decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert tables <= in_decay if decayed else not tables & in_decay  # all tables decayed, or none


# ------------------------------------------------------------------------------------------------ data check


def test_data_check_in_process_counts(pascal_root, nyud_root):  # noqa: F811
    rep = check_dataset("nyud", nyud_root, workers=2)
    assert rep.ok, rep.problems
    assert rep.ids == {"train": 2, "val": 1} and rep.expected == {"train": 795, "val": 654}
    assert rep.short == {"train": (2, 795), "val": (1, 654)}
    rep.ids["val"] = 654  # a complete split is not short
    assert rep.short == {"train": (2, 795)}
    assert rep.counts["train"] == {"image": 2, "semseg": 2, "depth": 2, "normals": 2, "edge": 2}
    with pytest.raises(MtbenchError, match="no files to check"):
        check_dataset("synthetic", None)


def test_data_check_cli_passes_then_names_each_broken_file(pascal_root):  # noqa: F811
    res = mtbench("data", "check", "--dataset", "pascal_context", "--data-root", str(pascal_root), "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert "4,998" in res.stdout and "5,105" in res.stdout and res.stderr == ""
    # the fixture lists a few ids per split: readable, but never reported as the full download
    assert "ok, partial: every file of" in res.stdout, res.stdout
    assert "train lists 2 of the full download's 4,998 ids, val lists 1 of the full download's 5,105 ids" in \
        " ".join(res.stdout.split()), res.stdout
    # break three files: a deleted label, a truncated JPEG, a saliency map of the wrong size
    (pascal_root / "normals_distill" / "2008_000002.png").unlink()
    jpg = pascal_root / "JPEGImages" / "2008_000003.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])
    _png(pascal_root / "sal_distill" / "2008_000001.png", np.zeros((H + 3, W, 3), np.uint8)[..., 0])
    res = mtbench("data", "check", "--dataset", "pascal_context", "--data-root", str(pascal_root))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert all(ln.startswith("error: ") for ln in lines) and "Traceback" not in res.stderr
    assert len(lines) == 4, res.stderr  # three problems and a summary
    assert any("missing file" in ln and "normals_distill/2008_000002.png" in ln for ln in lines)
    assert any("cannot read" in ln and "JPEGImages/2008_000003.jpg" in ln for ln in lines)
    assert any("sal_distill/2008_000001.png has size 23x30, its image has 20x30" in ln for ln in lines)


def test_data_check_nyud_names_broken_files(nyud_root, tmp_path):  # noqa: F811
    np.save(nyud_root / "depth" / "img_5002.npy", np.ones((H, W + 1), np.float32))
    (nyud_root / "edge" / "img_5001.npy").unlink()
    seg = np.full((H, W), 41, np.uint8)  # NYUD classes are 1..40 (0 unlabelled)
    _png(nyud_root / "segmentation" / "img_5001.png", seg)
    lines = check_dataset("nyud", nyud_root, workers=2).problems
    assert len(lines) == 4, lines
    # img_5002 is in train and val: its depth is named once per split
    assert sum("depth/img_5002.npy has size 20x31, its image has 20x30" in ln for ln in lines) == 2
    assert sum("missing file" in ln and "edge/img_5001.npy" in ln for ln in lines) == 1
    assert sum("segmentation/img_5001.png: segmentation values must be 0..40 or 255, found 41" in ln
               for ln in lines) == 1
    (nyud_root / "gt_sets" / "val.txt").unlink()
    assert any(ln.startswith("val: missing split file") for ln in check_dataset("nyud", nyud_root).problems)
    with pytest.raises(MtbenchError, match="data root not found"):
        check_dataset("nyud", tmp_path / "nope")


# ------------------------------------------------------------------------------------------------ training


def test_bad_training_file_is_one_line_through_the_cli(pascal_root, tmp_path):  # noqa: F811
    jpg = pascal_root / "JPEGImages" / "2008_000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated; the paper preset reads it in a DataLoader worker
    res = mtbench("run", "--methods", "decoder_only", "--dataset", "pascal_context", "--data-root", str(pascal_root),
                  "--preset", "paper", "--epochs", "1", "--init", "random", "--results-dir", str(tmp_path / "r"),
                  "--device", "cpu")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("error: cannot load data: PascalMT sample 1 (id 2008_000002): cannot read ")
    assert "JPEGImages/2008_000002.jpg" in lines[0]
    # no result file; only the run's bookkeeping (its sweep record and a "failed" status for `mtbench status`)
    written = list((tmp_path / "r").rglob("*.json")) if (tmp_path / "r").exists() else []
    assert not [p for p in written if p.name.startswith("seed") and not p.name.endswith(".status.json")], written


def test_a_missing_data_file_marks_the_recorded_runs_failed(pascal_root, tmp_path):  # noqa: F811
    """A file missing on disk is found once the run has started (after its sweep is recorded): one error line, no
    result, and ``mtbench status`` lists the run as failed with that line, not as missing."""
    missing = pascal_root / "sal_distill" / "2008_000002.png"
    missing.unlink()
    res = mtbench("run", "--methods", "decoder_only", "--dataset", "pascal_context", "--data-root", str(pascal_root),
                  "--epochs", "1", "--init", "random", "--results-dir", str(tmp_path / "r"), "--device", "cpu")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: PASCAL_MT: 1 file(s) missing for split 'train', first: ") and \
        lines[0].endswith("2008_000002.png"), lines[0]
    assert not list((tmp_path / "r").rglob("seed0.json"))
    res = mtbench("status", "--results-dir", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    row = " ".join(res.stdout.split())
    assert "decoder_only" in row and "failed" in row and "1 file(s) missing" in row and "missing " not in \
        row.replace("file(s) missing", ""), res.stdout


def test_run_bad_preset_and_eval_resolution_are_one_line(tmp_path):
    for args, msg in ((["--preset", "paper"], "unknown --preset 'paper' for dataset 'synthetic'; valid: embedded"),
                      (["--eval-resolution", "full"], "unknown --eval-resolution 'full'; valid: resized, original")):
        res = mtbench("run", "--methods", "lora", "--results-dir", str(tmp_path), *args)
        assert res.returncode == 2 and res.stderr.strip() == f"error: {msg}", res.stderr


@pytest.mark.slow
def test_paper_preset_end_to_end_on_miniature_pascal(pascal_root, tmp_path):  # noqa: F811
    res = mtbench("run", "--methods", "mtlora", "--dataset", "pascal_context", "--data-root", str(pascal_root),
                  "--preset", "paper", "--epochs", "1", "--init", "random", "--results-dir", str(tmp_path),
                  "--eval-resolution", "original", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    # the identity names every departure from the dataset's defaults in the path (mtbench.identity)
    key = "default_init=random_preset=paper_epochs=1_eval=original"
    path = tmp_path / "pascal_context" / "mtlora" / key / "seed0.json"
    r = json.loads(path.read_text())
    print(json.dumps({k: r[k] for k in ("run", "protocol", "delta_m", "primary")}, indent=1))
    assert r["run"]["preset"] == "paper" and r["train"]["recipe"]["augment"] == "paper"
    assert r["train"]["recipe"]["lr"] == pytest.approx(5e-4 * 32 / 512)
    assert r["protocol"]["label_resolution"] == "original"
    # the references and their source are recorded (Δm itself is null here: the one test image has no person, so
    # human_parts mIoU is undefined)
    assert "Table 1" in r["delta_m"]["reference_source"] and r["delta_m"]["references"]["semseg"] == 67.21
    assert set(r["metrics"]["sal"]) == {"mIoU", "maxF", "maxF_beta"}
