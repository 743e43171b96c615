"""The command line as a user runs it: errors, a tiny end-to-end run, the table, params and list."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from cli_entry import mtbench, mtbench_many


REPO = Path(__file__).parents[1]


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


RUN_BAD_INPUT = [
    (["--methods", "nosuch"], "unknown method 'nosuch'; valid:"),
    (["--methods", "mtlora:r=-4"], "mtlora: r must be > 0, got -4"),
    (["--methods", "lora:dropout=1"], "lora: dropout must be in [0, 1), got 1.0"),
    (["--methods", "lora", "--tasks", "semseg,nosuchtask"], "unknown task 'nosuchtask'"),
    (["--methods", "lora", "--weights", "/nonexistent/swin.pth"], "weights file not found"),
    (["--methods", "lora", "--weights", str(REPO)], f"--weights {str(REPO)!r} is a directory; give a checkpoint file"),
    (["--methods", "lora", "--data-root", str(REPO / "README.md")],
     f"data root {str(REPO / 'README.md')!r} is a file; give the dataset's directory"),
    (["--methods", "mtlora:rank=4"], "no option 'rank'"),
    (["--methods", "lora", "--device", "tpu"], "unknown device 'tpu'"),
    (["--methods", "lora", "--device", "cuda:abc"], "unknown device 'cuda:abc'; valid: auto, cpu, cuda, cuda:N"),
    (["--methods", "lora", "--decoder", "nope"], "unknown decoder 'nope'; valid: mtlora_hrnet, hrnet_270"),
    (["--methods", "ditask:r=1"], "ditask: r must be >= 2, got 1"),
    (["--methods", "vmt_adapter:reduction=0"], "vmt_adapter: reduction must be > 0, got 0"),
    (["--methods", "lora:targets=qkv++proj"], "lora: option targets='qkv++proj' has an empty item"),
    (["--methods", "lora:targets=qkv+"], "lora: option targets='qkv+' has an empty item"),
    (["--methods", "mtlora_plus:plus=false"],
     "the variant mtlora_plus is mtlora with plus=true; for plus=false use mtlora:plus=false"),
    (["--methods", "vpt_deep:deep=0"], "the variant vpt_deep is vpt with deep=true; for deep=0 use vpt:deep=0"),
    (["--methods", "lora:targets=qkv+qkv"], "lora: option targets='qkv+qkv' names an item twice"),
    (["--methods", "lora:scale=nan"], "lora: option scale='nan' is not a finite number"),
    (["--methods", "lora", "--decoder", "hrnet_270+"], "decoder 'hrnet_270+' is not a decoder name; valid: "),
    (["--methods", "lora", "--decoder", ""], "decoder '' is not a decoder name; valid: "),
    # an option without effect given the others: the same model under a second key, an ablation that did not run
    (["--methods", "tadformer:dtf=false,filter=static"], "tadformer:dtf=false,filter=static: filter=static has no "
     "effect with dtf=false (no filter in the TA-module); leave filter out"),
    (["--methods", "tadformer:prompts=false,skip=none"], "skip=none has no effect with prompts=false"),
    (["--methods", "tadformer:use_tpc=false,skip_layout=released"],
     "skip_layout=released has no effect with use_tpc=false"),
    (["--methods", "tadformer:skip=none,skip_layout=released"], "skip_layout=released has no effect with skip=none"),
    (["--methods", "vmt_adapter:lite_scale=5"], "lite_scale=5.0 has no effect with lite=false"),
    (["--methods", "tdss:sre=false,skills=3"], "skills=3 has no effect with sre=false"),
]


def test_run_bad_input_is_one_line_exit_2(tmp_path):
    """Each case through the installed entry point (one process for the batch: :func:`cli_entry.mtbench_many`)."""
    results = mtbench_many(*(["run", *args, "--results-dir", str(tmp_path / "results")] for args, _ in RUN_BAD_INPUT))
    for (args, message), res in zip(RUN_BAD_INPUT, results, strict=True):
        assert res.returncode == 2, (args, res.stderr)
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert files_under(tmp_path / "results") == []


def test_end_to_end_tiny_run_then_table(tmp_path):
    results = tmp_path / "results"
    common = ["--epochs", "1", "--max-train-batches", "2", "--batch-size", "8", "--train-size", "16",
              "--results-dir", str(results)]
    res = mtbench("run", "--methods", "lora:r=2,mtlora,tadformer", *common)
    assert res.returncode == 0, res.stderr + res.stdout
    files = sorted(p.relative_to(results).as_posix() for p in files_under(results / "synthetic"))
    assert len(list((results / "sweeps").glob("*.json"))) == 1  # what `mtbench status` reads
    smoke = "epochs=1_batch-size=8_train-size=16_max-train-batches=2"  # every departure names the path
    assert files == [f"synthetic/{m}_{smoke}/seed0.{ext}" for m in ("lora/r=2", "mtlora/default", "tadformer/default")
                     for ext in ("json", "safetensors")]
    results_of = {m: results / f"synthetic/{m}/default_{smoke}/seed0.json" for m in ("mtlora", "tadformer")}
    data = json.loads(results_of["mtlora"].read_text())
    assert set(data["metrics"]) == {"semseg", "human_parts", "sal", "normals"}
    assert data["params"]["trainable"] == sum(data["params"]["backbone_unfrozen"].values()) + \
        data["params"]["method"] + data["params"]["decoders"]
    assert "requires_grad" in data["params"]["rule"]
    assert data["run"]["options"]["r"] == 16 and data["train"]["best_epoch"] == 1
    assert data["env"]["torch"] and data["train"]["device"] == "cpu"
    # an existing result is never silently overwritten
    again = mtbench("run", "--methods", "mtlora", *common)
    assert again.returncode == 0 and "skip" in again.stdout
    err = mtbench("run", "--methods", "mtlora", *common, "--existing", "error")
    assert err.returncode == 2 and "result exists" in err.stderr
    table = mtbench("table", "--results-dir", str(results), "--out-dir", str(tmp_path / "reports"))
    assert table.returncode == 0, table.stderr
    for needle in [f"lora (r=2) [smoke: {smoke.replace('_', ', ')}]", "mtlora [smoke", "SemSeg (mIoU ↑)", "Normals (mErr ↓)", "Δm (%)", "#TP (M)"]:
        assert needle in table.stdout
    md = (tmp_path / "reports" / "table_synthetic.md").read_text()
    assert "mtlora" in md and (tmp_path / "reports" / "table_synthetic.tex").is_file()
    # the saved trained state reproduces the stored test metrics
    from mtbench.data import build_dataset
    from mtbench.runner import load_trained
    from mtbench.train import evaluate, make_loader

    model, result = load_trained(results_of["tadformer"])
    test = build_dataset("synthetic", "test", tasks=result.run.tasks)
    from mtbench.tasks import resolve_tasks

    metrics, _ = evaluate(model, make_loader(test, 32, False, 0, 0), resolve_tasks("synthetic"), torch.device("cpu"))
    for task, value in result.primary.items():
        assert metrics[task][{"normals": "mErr"}.get(task, "mIoU")] == pytest.approx(value, abs=1e-4)
    # mtbench eval recomputes the stored test metrics from the saved state; a missing state is one clear line
    ev = mtbench("eval", "--result", str(results_of["tadformer"]))
    assert ev.returncode == 0 and "reproduced" in ev.stdout, ev.stdout + ev.stderr
    att = mtbench("attention", "--result", str(results_of["tadformer"]), "--n", "201", "--out", str(tmp_path / "a.png"))
    assert att.returncode == 2 and att.stderr == "error: --n 201: the synthetic test split has 200 images\n", att.stderr
    moved = tmp_path / "elsewhere" / "seed0.json"
    moved.parent.mkdir()
    moved.write_text(results_of["mtlora"].read_text())
    ev = mtbench("eval", "--result", str(moved))
    assert ev.returncode == 2 and ev.stderr.startswith("error: no trained state beside") and \
        len(ev.stderr.strip().splitlines()) == 1
    ev = mtbench("eval", "--result", str(moved), "--state", str(results_of["mtlora"].with_suffix(".safetensors")))
    assert ev.returncode == 0 and "reproduced" in ev.stdout, ev.stdout + ev.stderr
    fig = mtbench("attention", "--result", str(results_of["tadformer"]), "--n", "2",
                  "--out", str(tmp_path / "att.png"))
    assert fig.returncode == 0, fig.stderr
    assert (tmp_path / "att.png").stat().st_size > 10_000
    no_maps = mtbench("attention", "--result", str(results_of["mtlora"]))
    assert no_maps.returncode == 2 and "no task attention maps" in no_maps.stderr
    missing = str(tmp_path / "nope")
    no_root = mtbench("attention", "--result", str(results_of["tadformer"]), "--data-root", missing)
    assert no_root.returncode == 2 and no_root.stderr.strip() == f"error: data root not found: {missing!r}"


def test_params_prints_exact_counts():
    res = mtbench("params", "--methods", "mtlora,decoder_only")
    assert res.returncode == 0, res.stderr
    for n in ["4,953,146", "6,083,642", "8,344,634", "1,946,624"]:
        assert n in res.stdout
    assert "✘" not in res.stdout


def test_list_shows_methods_and_options():
    res = mtbench("list")
    assert res.returncode == 0
    for needle in ["mtlora", "mtlora_plus", "task_r", "decoder_only", "single_task", "lora", "scale-lab/MTLoRA"]:
        assert needle in res.stdout
    # defaults and presets as a user types them (booleans lower case, tuples joined by +)
    assert "vpt_shallow = vpt:deep=false; vpt_deep = vpt:deep=true" in res.stdout
    assert re.search(r"^\s+positions\s+attn\+mlp\s", res.stdout, re.M)
    assert "True" not in res.stdout and "False" not in res.stdout


def test_table_without_results_is_one_line_error(tmp_path):
    res = mtbench("table", "--results-dir", str(tmp_path))
    assert res.returncode == 2 and res.stderr.startswith("error: no result files")


def test_cuda_devices_are_checked_against_the_machine(monkeypatch):
    """``cuda:N`` beyond the GPUs present is one line listing them (CUDA faked: no test needs a GPU)."""
    from mtbench.errors import MtbenchError
    from mtbench.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(MtbenchError, match=r"^device 'cuda:2' requested but this machine has 2 CUDA device\(s\): "
                                           r"cuda:0, cuda:1$"):
        resolve_device("cuda:2")
    for bad in ("cuda:abc", "cuda:-1", "cuda: 0", "CUDA"):
        with pytest.raises(MtbenchError, match=f"^unknown device '{bad}'; valid: auto, cpu, cuda, cuda:N"):
            resolve_device(bad)


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    """Empty, non-UTF-8 and unwritable output paths (``/proc`` takes no new files, even for root) are one line before
    training or plotting; an empty ``pretrain --out`` is never read as the packaged weights."""
    ref = str(REPO / "results/reference")
    tad = str(REPO / "results/reference/synthetic/tadformer/default/seed0.json")
    bad_utf8 = str(tmp_path).encode() + b"/bad\xff"
    cases = [
        (["table", "--results-dir", ref, "--out-dir", ""], "error: --out-dir is empty; give a path"),
        (["plot", "--results-dir", ref, "--out-dir", "/proc/mtbench-x"],
         "error: --out-dir '/proc/mtbench-x' cannot be written ("),
        (["table", "--results-dir", ref, "--out-dir", "/proc/mtbench-x"],
         "error: --out-dir '/proc/mtbench-x' cannot be written ("),
        (["pretrain", "--epochs", "1", "--out", ""], "error: --out is empty; give a path"),
        (["pretrain", "--epochs", "1", "--out", "/proc/x.safetensors"],
         "error: --out '/proc/x.safetensors' cannot be written ("),
        (["attention", "--result", tad, "--out", "/proc/x.png"], "error: --out '/proc/x.png' cannot be written ("),
        (["eval", "--result", tad, "--state", ""], "error: --state is empty; give a trained state file"),
        (["eval", "--result", tad, "--state", str(tmp_path)], f"error: --state {str(tmp_path)!r} is a directory"),
        (["run", "--methods", "lora", "--results-dir", os.fsdecode(bad_utf8)],
         f"error: --results-dir {os.fsdecode(bad_utf8)!r} is not valid UTF-8; give a path in UTF-8"),
        (["run", "--methods", "lora:r=99999999999999999999999", "--results-dir", str(tmp_path / "r")],
         "error: lora: option r='99999999999999999999999' is out of range (|value| < 2**63)"),
        (["run", "--methods", "lora:r=0_8", "--results-dir", str(tmp_path / "r")],
         "error: lora: option r='0_8' is not a valid int"),
    ]
    packaged = REPO / "mtbench/assets/swin_embedded.safetensors"
    before = packaged.stat().st_mtime_ns
    for (args, message), res in zip(cases, mtbench_many(*(a for a, _ in cases)), strict=True):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), (args, res.stderr)
    assert packaged.stat().st_mtime_ns == before
    assert files_under(tmp_path / "r") == [] and not (tmp_path / "o").exists()


def test_a_result_path_that_is_a_directory_is_refused_before_training(tmp_path):
    from mtbench.errors import MtbenchError
    from mtbench.runner import RunRequest, plan

    req = RunRequest(methods="lora", results_dir=str(tmp_path), existing="overwrite")
    path = plan(req)[1][0].path
    path.mkdir(parents=True)
    with pytest.raises(MtbenchError, match="the result path .* is a directory; move it away"):
        plan(req)


def test_synthetic_train_size_beyond_the_split_is_refused():
    from mtbench.data import build_dataset
    from mtbench.errors import MtbenchError

    with pytest.raises(MtbenchError, match=r"^synthetic split 'train' has 1600 images; asked for the first 1601$"):
        build_dataset("synthetic", "train", n=1601)


def test_compacter_n_that_does_not_divide_the_widths_names_the_method():
    from mtbench.config import parse_method_specs
    from mtbench.errors import MtbenchError
    from mtbench.registry import build_model, resolve_spec
    from mtbench.swin import create_backbone
    from mtbench.tasks import resolve_tasks

    with pytest.raises(MtbenchError, match=r"^compacter: n=3 must divide every stage width of the backbone "
                                           r"\(32, 64, 128, 256\)$"):
        build_model(resolve_spec(parse_method_specs("compacter:n=3")[0]), create_backbone("swin_embedded"),
                    resolve_tasks("synthetic"))
