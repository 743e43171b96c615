"""Checkpoint and resume, the library schedule and parameter groups, metric-state reduction, concurrent writes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from cli_entry import mtbench, mtbench_many
from torch.utils.data import Subset

from mtbench.errors import MtbenchError
from mtbench.checkpoint import Interrupted, RunCheckpoint, capture_rng, restore_rng
from mtbench.train import TrainConfig, build_optimizer, build_scheduler, fit, schedule_step


def handwritten_lr(step, lr, min_lr, warmup, total):
    """The schedule train.py and pretrain.py had before timm's scheduler replaced it."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("lr,min_lr,warmup,total", [(1e-3, 1e-5, 50, 300), (5e-4 * 32 / 512, 5e-6 * 32 / 512, 20, 60),
                                                    (2e-3, 0.0, 63, 63 * 30), (1e-3, 1e-5, 0, 17), (1e-3, 1e-5, 4, 4),
                                                    (1e-3, 1e-5, 1, 2)])
def test_timm_schedule_gives_the_same_lr_at_every_step(lr, min_lr, warmup, total):
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=lr)
    sched = build_scheduler(opt, min_lr, warmup, total)
    for step in range(total):
        schedule_step(sched, step)
        want = handwritten_lr(step, lr, min_lr, warmup, total)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(want, rel=1e-12, abs=1e-15), (step, g["lr"], want)


def test_param_groups_decay_exactly_the_multi_dimensional_parameters():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05))
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    expected = {id(p): (0.05 if p.ndim > 1 else 0.0) for p in model.parameters() if p.requires_grad}
    assert by_id == expected


def test_rng_states_round_trip():
    import random

    import numpy as np

    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def _tiny_setup():
    from mtbench.config import MethodSpec
    from mtbench.data import build_dataset
    from mtbench.registry import build_model, resolve, resolve_spec
    from mtbench.swin import create_backbone
    from mtbench.tasks import resolve_tasks

    tasks = resolve_tasks("synthetic")
    train = build_dataset("synthetic", "train", train_aug=True, tasks=[t.name for t in tasks], n=24)
    val = Subset(build_dataset("synthetic", "val", tasks=[t.name for t in tasks]), range(16))

    def model():
        torch.manual_seed(0)
        resolve("mtlora")
        return build_model(resolve_spec(MethodSpec("mtlora", {"r": "4"})), create_backbone("swin_embedded"), tasks)

    return tasks, train, val, model


class StopAfter:
    def __init__(self, steps):
        self.steps, self.seen = steps, 0

    @property
    def requested(self):
        return self.seen >= self.steps


@pytest.mark.parametrize("stop_step", [3, 4])  # mid-epoch (3 batches/epoch) and at an epoch boundary + evaluation
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, stop_step):
    """Stopping (as Ctrl-C does) writes a checkpoint; a new process-like fit from it ends bit-identical to a run
    that was never interrupted: same history, same selected state."""
    tasks, train, val, make_model = _tiny_setup()
    cfg = TrainConfig(epochs=3, batch_size=8, warmup_epochs=1.0, amp=False)
    dev = torch.device("cpu")

    torch.manual_seed(1)
    ref_model = make_model()
    ref = fit(ref_model, train, val, tasks, cfg, dev, seed=1)

    ckpt = RunCheckpoint(tmp_path / "seed1.json", every_minutes=0)
    stop = StopAfter(stop_step)
    torch.manual_seed(1)
    m1 = make_model()
    with pytest.raises(Interrupted):
        fit(m1, train, val, tasks, cfg, dev, seed=1, checkpoint=ckpt, stop=stop,
            on_step=lambda *a: setattr(stop, "seen", stop.seen + 1))
    assert ckpt.exists()
    torch.manual_seed(123)  # the resumed process starts from other RNG states: the checkpoint restores them
    m2 = make_model()
    resumed = fit(m2, train, val, tasks, cfg, dev, seed=1, checkpoint=ckpt)
    assert resumed.resumes and resumed.resumes[0]["step"] == stop_step
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["session"] for h in resumed.history] == ([0, 1, 1] if stop_step == 4 else [1, 1, 1])
    for a, b in zip(ref.history, resumed.history):
        assert a["train_loss"] == b["train_loss"] and a["val"] == b["val"]
    assert ref.best_epoch == resumed.best_epoch
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_checkpoint_pointer_names_a_complete_pair(tmp_path):
    ck = RunCheckpoint(tmp_path / "seed0.json", 0)
    assert ck.load() is None
    ck.save({"model.w": torch.ones(2)}, {"step": 1, "epoch": 1, "batch": 1})
    ck.save({"model.w": torch.full((2,), 2.0)}, {"step": 2, "epoch": 1, "batch": 2})
    tensors, state = ck.load()
    assert state["step"] == 2 and torch.equal(tensors["model.w"], torch.full((2,), 2.0))
    assert sorted(p.suffix for p in ck.dir.iterdir()) == [".json", ".pt", ".safetensors"]  # older pair deleted
    ck.remove()
    assert not ck.dir.exists()


def test_metric_states_reduce_to_the_whole_split():
    """Two shards' states summed with one packed reduction give the metrics of one process over everything."""
    from mtbench.distributed import reduce_metric_states
    from mtbench.metrics import MultiTaskMetrics
    from mtbench.tasks import resolve_tasks

    tasks = resolve_tasks("nyud") + [t for t in resolve_tasks("synthetic") if t.name in ("sal", "human_parts")]
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        out, preds = {}, {}
        for t in tasks:
            c = t.out_channels
            preds[t.name] = torch.randn(n, c, 8, 8, generator=gen)
            if t.name in ("semseg", "human_parts"):
                out[t.name] = torch.randint(0, c, (n, 8, 8), generator=gen)
            elif t.name in ("sal", "edge"):
                out[t.name] = (torch.rand(n, 1, 8, 8, generator=gen) > 0.6).float()
            elif t.name == "normals":
                out[t.name] = torch.nn.functional.normalize(torch.randn(n, 3, 8, 8, generator=gen), dim=1)
            else:
                out[t.name] = torch.rand(n, 1, 8, 8, generator=gen) * 5
        return preds, out

    batches = [batch(3) for _ in range(4)]
    whole = MultiTaskMetrics(tasks)
    shards = [MultiTaskMetrics(tasks), MultiTaskMetrics(tasks)]
    for i, (p, b) in enumerate(batches):
        whole.update(p, b)
        shards[i % 2].update(p, b)
    packed = []
    for s in shards:  # capture what each process would contribute
        reduce_metric_states(s, [1.0], all_reduce=lambda t: packed.append(t.clone()))
    total = packed[0] + packed[1]
    extra = reduce_metric_states(shards[0], [1.0], all_reduce=lambda t: t.copy_(total))
    assert extra == [2.0]
    want, got = whole.compute(), shards[0].compute()
    for task in want:
        for k, v in want[task].items():
            assert got[task][k] == pytest.approx(v, rel=1e-9, abs=1e-9, nan_ok=True), (task, k)


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from mtbench.results import atomic_write_text
    root, tag = Path(sys.argv[1]), sys.argv[2]
    for i in range(200):
        atomic_write_text(root / "synthetic" / "m" / f"seed{i}.json", '{"writer": "%s", "i": %d, "pad": "%s"}' % (tag, i, "x" * 20000))
        atomic_write_text(root / "synthetic" / tag / f"seed{i}.json", '{"i": %d}' % i)
""")


def test_two_processes_writing_one_results_directory_lose_nothing(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), tag]) for tag in ("a", "b")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    shared = sorted((tmp_path / "synthetic" / "m").iterdir())
    assert [p.name for p in shared] == sorted(f"seed{i}.json" for i in range(200))  # no temporary file left
    for p in shared:  # each file is one complete write of one writer, never a mix
        data = json.loads(p.read_text())
        assert data["writer"] in ("a", "b") and p.name == f"seed{data['i']}.json" and len(data["pad"]) == 20000
    for tag in ("a", "b"):
        own = list((tmp_path / "synthetic" / tag).glob("seed*.json"))
        assert len(own) == 200


RUN_FLAG_ERRORS = [
    (["--seeds", "0,x"], "--seeds '0,x' is not a comma-separated list"),
    (["--seeds", "1,1"], "lists a seed twice"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--resume", "--restart"], "exclude each other"),
    (["--launcher", "pbs"], "unknown --launcher 'pbs'"),
    (["--launcher", "slurm"], "--launcher slurm needs --partition"),
    (["--launcher", "local", "--time", "soon"], "--time 'soon' is not HH:MM"),
    (["--seeds", "0,,1"], "--seeds '0,,1' is not a comma-separated list"),
    (["--seed", "-1"], "a seed must be in 0..2**63-1 (torch's generator seed), got -1"),
    (["--seeds", "0,99999999999999999999"], "a seed must be in 0..2**63-1 (torch's generator seed), got 9999"),
    (["--lr", "inf"], "learning rate must be a finite number > 0, got inf"),
    (["--max-train-batches", "-1"], "max train batches must be >= 0 (0 = no limit), got -1"),
    (["--partition", "gpu"], "--partition only applies with --launcher (slurm | local)"),
    (["--time", "01:00", "--wait"], "--time, --wait only apply with --launcher (slurm | local)"),
    (["--gpus-per-job", "0"], "--gpus-per-job only applies with --launcher"),
    (["--launcher", "local", "--time", "1:99"], "--time '1:99' is not HH:MM (MM 00-59) or whole minutes, > 0"),
    (["--launcher", "local", "--time=-1:30"], "--time '-1:30' is not HH:MM"),
    (["--launcher", "none"], "unknown --launcher 'none'; valid: slurm, local (or no --launcher)"),
    (["--init", "random", "--weights", "/etc/hostname"], "--init random and --weights exclude each other"),
    (["--checkpoint-minutes", "nan"], "--checkpoint-minutes must be a finite number >= 0, got nan"),
    (["--tasks", ""], "unknown task '' for dataset 'synthetic'"),
    (["--results-dir", ""], "--results-dir is empty; give a directory (default: results)"),
]


def test_run_flag_errors_are_one_line(tmp_path):
    """Each case through the installed entry point (one process for the batch: :func:`cli_entry.mtbench_many`)."""
    results = mtbench_many(*(["run", "--methods", "lora", "--results-dir", str(tmp_path), *args]
                             for args, _ in RUN_FLAG_ERRORS))
    for (args, message), res in zip(RUN_FLAG_ERRORS, results, strict=True):
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            (args, res.stderr)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_launcher_slurm_without_sbatch_is_refused_not_run_locally(tmp_path):
    """submitit's AutoExecutor falls back to local processes where SLURM is missing; mtbench refuses instead."""
    import os
    import sys

    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no sbatch on this PATH
    res = mtbench("run", "--methods", "lora", "--results-dir", str(tmp_path), "--launcher", "slurm", "--partition",
                  "gpu", env=env)
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: --launcher slurm needs SLURM's sbatch on PATH, and it is not there (--launcher local runs the jobs "
        "on this machine)"), res.stderr
    assert not list(tmp_path.rglob("*.json"))


def test_an_output_directory_that_is_a_file_fails_before_any_work(tmp_path):
    """Each case through the installed entry point (one process for the batch: :func:`cli_entry.mtbench_many`)."""
    afile = tmp_path / "afile"
    afile.write_text("")
    unwritable = "is not a file path that can be written (a directory, or under a file)"
    cases = [(args + [str(afile)], f"error: {args[-1]} '{afile}' is a file, not a directory")
             for args in (["run", "--methods", "lora", "--results-dir"], ["profile", "--methods", "lora",
                          "--results-dir"], ["table", "--out-dir"], ["plot", "--out-dir"])]
    cases += [(["pretrain", "--out", str(tmp_path)], f"error: --out '{tmp_path}' {unwritable}"),
              (["pretrain", "--out", str(afile / "w.safetensors")], f"error: --out '{afile / 'w.safetensors'}' "
                                                                      f"{unwritable}"),
              (["interaction-cost", "--out", str(afile / "ic")], f"error: --out '{afile / 'ic.json'}' {unwritable}"),
              (["pretrain", "--epochs", "0"], "error: --epochs must be >= 1, got 0"),
              (["pretrain", "--seed", "-1", "--out", str(tmp_path / "w.safetensors")],
               "error: a seed must be in 0..2**63-1 (torch's generator seed), got -1")]
    for (args, expected), res in zip(cases, mtbench_many(*(a for a, _ in cases)), strict=True):
        assert res.returncode == 2 and res.stderr.strip() == expected, (args, res.stderr)
    assert afile.read_text() == "" and sorted(tmp_path.iterdir()) == [afile]


def test_validation_loss_that_diverges_is_a_clear_error(monkeypatch):
    """A loss that stays finite in training but is NaN at validation stops the run with the divergence message
    (it used to end in a bare AssertionError after the last epoch)."""
    import mtbench.train

    tasks, train, val, make_model = _tiny_setup()
    monkeypatch.setattr(mtbench.train, "evaluate", lambda *a, **k: ({}, float("nan")))
    with pytest.raises(MtbenchError, match="training diverged: validation loss is nan at epoch 1"):
        fit(make_model(), train, val, tasks, TrainConfig(epochs=2, batch_size=8, amp=False), torch.device("cpu"))


def test_eval_and_status_errors(tmp_path):
    """Each case through the installed entry point (one process for the batch: :func:`cli_entry.mtbench_many`);
    ``expected`` is the whole stderr line, or (with a trailing ``...``) its start."""
    (tmp_path / "trunc.json").write_text('{"run": ')
    (tmp_path / "seed0.safetensors").write_bytes(b"\x80\xc0" * 64)
    (tmp_path / "empty.json").write_text("{}")
    cases: list[tuple[list[str], str]] = [
        (["eval", "--result", str(tmp_path / "nope.json")], f"error: result file not found: '{tmp_path / 'nope.json'}'"),
    ]
    for name, message in [("trunc.json", "Invalid JSON: EOF while parsing"),
                          ("seed0.safetensors", "not a text file (a result is the seed*.json a run writes)"),
                          ("empty.json", "run: Field required (and 6 more)")]:
        for cmd in ("eval", "attention"):
            why = "cannot read" if name.endswith("safetensors") else "invalid"
            cases.append(([cmd, "--result", str(tmp_path / name)],
                          f"error: {why} result file {str(tmp_path / name)!r}: ...{message}"))
    cases += [
        (["eval", "--result", str(tmp_path / "empty.json"), "--data-root", str(tmp_path / "nope")],
         f"error: data root not found: {str(tmp_path / 'nope')!r}"),
        (["attention", "--result", str(tmp_path / "empty.json"), "--out", str(tmp_path / "maps.txt")],
         f"error: --out {str(tmp_path / 'maps.txt')!r}: the figure is a PNG; give a path ending in .png"),
        (["eval", "--result", str(tmp_path / "empty.json"), "--batch-size", "0"],
         "error: --batch-size must be >= 1, got 0"),
        (["status", "--sweep", str(tmp_path / "empty.json")], f"error: '{tmp_path / 'empty.json'}' is not a sweep..."),
        (["status", "--results-dir", str(tmp_path)], "error: no sweep recorded..."),
    ]
    for cmd in ("eval", "attention"):
        cases += [([cmd, "--result", ""], "error: --result is empty;..."),
                  ([cmd, "--result", str(tmp_path)],
                   f"error: --result {str(tmp_path)!r} is a directory; give one of its seed{{S}}.json files")]
    for i, runs in enumerate((5, "abc", [{}], [{"path": "/x/seed0.json"}], [{"path": "/x/seed0.json", "label": "a"}])):
        bad = tmp_path / f"sweep{i}.json"
        bad.write_text(json.dumps({"runs": runs}))
        cases.append((["status", "--sweep", str(bad)],
                      f"error: '{bad}' is not a sweep file (JSON with a 'runs' list of {{label, seed, path, ...}}, "
                      "written by `mtbench run` under RESULTS_DIR/sweeps)"))
    for (args, expected), res in zip(cases, mtbench_many(*(a for a, _ in cases)), strict=True):
        line = res.stderr.strip()
        assert res.returncode == 2 and "\n" not in line, (args, res.stderr)
        if "..." in expected:
            head, _, tail = expected.partition("...")
            assert line.startswith(head) and tail in line, (args, line)
        else:
            assert line == expected, (args, line)
    assert not (tmp_path / "nope").exists()


def test_eval_and_attention_without_the_trained_state_name_it_and_take_state(tmp_path):
    """A result file copied without its git-ignored ``seed0.safetensors`` (a clean clone of results/reference) is a
    one-line error pointing to --state, which both commands take."""
    import shutil
    from pathlib import Path

    src = Path(__file__).parents[1] / "results/reference/synthetic/tadformer/default/seed0.json"
    result = tmp_path / "seed0.json"
    shutil.copy(src, result)
    for cmd in ("eval", "attention"):
        res = mtbench(cmd, "--result", str(result), "--out" if cmd == "attention" else "--split",
                      str(tmp_path / "a.png") if cmd == "attention" else "test")
        assert res.returncode == 2 and res.stderr.strip() == (
            f"error: no trained state beside {str(result)!r} (expected seed0.safetensors); rerun with --existing "
            "overwrite, or pass --state PATH"), (cmd, res.stderr)
        res = mtbench(cmd, "--result", str(result), "--state", str(tmp_path / "nope.safetensors"))
        assert res.returncode == 2 and res.stderr.strip() == (
            f"error: state file not found: {str(tmp_path / 'nope.safetensors')!r}"), (cmd, res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0.json"]


def test_a_state_of_another_configuration_is_a_one_line_error(tmp_path):
    """A state file whose tensors have the model's names but other shapes (a state of another rank) is refused
    naming the first such tensor, instead of torch's size-mismatch traceback."""
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from mtbench.runner import load_trained

    src = Path(__file__).parents[1] / "results/reference/synthetic/lora/default/seed0.json"
    result = tmp_path / "seed0.json"
    shutil.copy(src, result)
    data = json.loads(result.read_text())
    data["run"]["options"]["r"] = 8  # the state below is of r=4; read as a result of r=8
    result.write_text(json.dumps(data))
    from mtbench.config import MethodSpec
    from mtbench.registry import build_model, resolve_spec
    from mtbench.swin import create_backbone
    from mtbench.tasks import resolve_tasks

    model = build_model(resolve_spec(MethodSpec("lora", {})), create_backbone(data["run"]["backbone"],
                        pretrained=False), resolve_tasks("synthetic", data["run"]["tasks"]))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(tmp_path / "seed0.safetensors"))
    with pytest.raises(MtbenchError) as e:
        load_trained(result)
    msg = str(e.value)
    assert "does not fit lora" in msg and "lora_A" in msg and ", 32], the model's is [8, 32]" in msg, msg


def test_a_result_recording_an_option_without_effect_still_loads(tmp_path):
    """A result written before such options were refused (``vmt_adapter`` with ``lite_scale`` but not ``lite``) is
    rebuilt without the option (the same model) instead of failing on the refusal."""
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    from mtbench.config import MethodSpec
    from mtbench.registry import build_model, resolve_spec
    from mtbench.runner import load_trained
    from mtbench.swin import create_backbone
    from mtbench.tasks import resolve_tasks

    src = Path(__file__).parents[1] / "results/reference/synthetic/vmt_adapter/default/seed0.json"
    result = tmp_path / "seed0.json"
    shutil.copy(src, result)
    data = json.loads(result.read_text())
    data["run"]["options"]["lite_scale"] = 5.0
    result.write_text(json.dumps(data))
    with pytest.raises(MtbenchError, match="lite_scale=5.0 has no effect with lite=false"):
        resolve_spec(MethodSpec("vmt_adapter", {"lite_scale": "5.0"}))
    torch.manual_seed(0)
    model = build_model(resolve_spec(MethodSpec("vmt_adapter", {})), create_backbone(data["run"]["backbone"],
                        pretrained=False), resolve_tasks("synthetic", data["run"]["tasks"]))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(tmp_path / "seed0.safetensors"))
    loaded, _ = load_trained(result)
    assert loaded.cfg.lite_scale == 0.1 and not loaded.cfg.lite
    for n, p in loaded.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, state[n]), n


def test_a_failed_runs_status_file_does_not_break_the_reports(tmp_path):
    """A failed run leaves ``seed{S}.status.json`` beside where its result would be; ``table`` and ``plot`` read only
    ``seed{S}.json`` files and still work."""
    import shutil
    from pathlib import Path

    from mtbench.launch import write_status
    from mtbench.results import is_result_name, load_results

    root = tmp_path / "r"
    shutil.copytree(Path(__file__).parents[1] / "results/reference/synthetic/lora/default",
                    root / "synthetic/lora/default",
                    ignore=shutil.ignore_patterns("*.safetensors", "*.log"))
    write_status(root / "synthetic/lora/default/seed3.json", "failed", error="error: weights file not found")
    assert (root / "synthetic/lora/default/seed3.status.json").is_file()
    assert [p.name for p, _ in load_results(root)] == ["seed0.json", "seed1.json", "seed2.json"]
    assert is_result_name("seed12.json") and not is_result_name("seed0.status.json")
    for args in (["table"], ["plot", "--x", "tp"]):
        res = mtbench(*args, "--results-dir", str(root), "--out-dir", str(tmp_path / "o"))
        assert res.returncode == 0, (args, res.stderr)


def test_an_invalid_existing_result_is_not_skipped_nor_listed_as_done(tmp_path):
    """``--existing skip`` (the default) only skips a run whose result file is a valid result; ``status`` lists a
    corrupt one as failed, naming the problem."""
    from mtbench.launch import run_state
    from mtbench.runner import RunRequest, plan

    req = RunRequest(methods="lora", results_dir=str(tmp_path))
    path = plan(req)[1][0].path
    path.parent.mkdir(parents=True)
    path.write_text('{"run": ')  # truncated by hand: mtbench's own writes are atomic
    with pytest.raises(MtbenchError, match="invalid result file .*Invalid JSON.*; pass --existing overwrite"):
        plan(req)
    req.existing = "error"  # not "pass --existing skip", which would fail on it the same way
    with pytest.raises(MtbenchError, match=r"invalid result file .*Invalid JSON.*; pass --existing overwrite to run "
                                           r"it again$"):
        plan(req)
    state, detail = run_state(path)
    assert state == "failed" and "Invalid JSON" in detail
    req.existing = "overwrite"
    assert plan(req)[1][0].path == path


@pytest.mark.parametrize("message,what", [
    ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
     "12799999999872 bytes. Error code 12 (Cannot allocate memory)", "tried to allocate 12.8 TB"),
    ("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity)", "tried to allocate 2.00 GiB"),
    ("DefaultCPUAllocator: can't allocate memory", "out of memory"),
    ("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)", None),
])
def test_out_of_memory_is_recognised_and_sized(message, what):
    from mtbench.errors import out_of_memory

    assert out_of_memory(RuntimeError(message)) == what
    assert out_of_memory(MemoryError()) == "out of memory" and out_of_memory(ValueError("out of memory")) is None


def test_a_batch_too_large_for_memory_is_one_line_naming_the_run(tmp_path, monkeypatch):
    """Training that runs out of memory ends in an MtbenchError naming the run and its batch size (the CLI prints it
    as one line), and the run's status file says failed with that line."""
    import mtbench.runner as runner
    from mtbench.launch import run_state

    def fit(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 400000000000 bytes.")

    monkeypatch.setattr(runner, "fit", fit)
    req = runner.RunRequest(methods="lora:r=2", epochs=1, batch_size=4096, train_size=16, results_dir=str(tmp_path))
    with pytest.raises(MtbenchError) as e:
        runner.execute(req, log=lambda *a: None)
    msg = str(e.value)
    assert "lora (r=2)" in msg and "out of memory on cpu (tried to allocate 400 GB) at batch size 4096; lower " \
        "--batch-size or the method's sizes" in msg, msg
    path = runner.plan(req)[1][0].path
    state, detail = run_state(path)
    assert state == "failed" and detail.startswith("error: lora (r=2) [") and "tried to allocate 400 GB" in detail


def test_a_model_too_large_for_memory_is_one_line_through_the_entry_point(tmp_path):
    """``r = 10**13`` asks for petabytes: more than any address space, so the allocation fails at once everywhere."""
    res = mtbench("run", "--methods", "mtlora:r=10000000000000", "--results-dir", str(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip() == ("error: mtlora:r=10000000000000: building the model ran out of memory (tried to "
                                  "allocate 1.28 PB); lower its sizes"), res.stderr


def test_an_allocation_failure_anywhere_else_is_one_line(monkeypatch, capsys):
    """Where no run or model names the failing sizes (a profile's batch, say), ``mtbench.cli.main`` still prints one
    line and exits 2; other RuntimeErrors are not swallowed."""
    import mtbench.registry
    from mtbench.cli import main

    def oom():
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5000000000 bytes.")

    monkeypatch.setattr(mtbench.registry, "list_methods", oom)
    with pytest.raises(SystemExit) as e:
        main(["list"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: out of memory (tried to allocate 5 GB); lower --batch-size or the sizes "
                                       "in --methods\n")

    def other():
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(mtbench.registry, "list_methods", other)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["list"])


def test_a_failed_runs_status_line_reads_as_the_cli_error_or_names_the_bug():
    """A user error is recorded as the CLI prints it; anything else (a bug) with its exception type."""
    from mtbench.runner import failure_line

    assert failure_line(MtbenchError("weights file not found: w.pt\nsecond line")) == \
        "error: weights file not found: w.pt"
    assert failure_line(RuntimeError("shape mismatch")) == "RuntimeError: shape mismatch"
    assert failure_line(KeyboardInterrupt()) == "KeyboardInterrupt: "
