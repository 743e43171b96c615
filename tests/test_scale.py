"""Runs that scale (slow suite): torchrun with gloo on CPU, submitit's local executor, --jobs, Ctrl-C and status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_entry import SCRIPT
from cli_entry import mtbench as run_mtbench

TINY = ["--methods", "decoder_only", "--epochs", "1", "--max-train-batches", "2", "--batch-size", "8",
        "--train-size", "16", "--device", "cpu"]


def env1():
    return dict(os.environ, OMP_NUM_THREADS="1")


def mtbench(*args, timeout=900):
    return run_mtbench(*args, timeout=timeout, env=env1())


def only_result(root: Path) -> Path:
    found = sorted(root.rglob("seed*.json"))
    found = [p for p in found if not p.name.endswith(".status.json")]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_torchrun_gloo_two_processes_match_one_process(tmp_path):
    """Train with DDP in 2 CPU processes (gloo); the test metrics the 2 processes computed together on their shards
    equal a 1-process evaluation of the saved model."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "mtbench", "run", *TINY, "--results-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=env1())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    path = only_result(tmp_path)
    stored = json.loads(path.read_text())
    assert stored["train"]["processes"] == 2
    from mtbench.data import build_dataset
    from mtbench.runner import load_trained
    from mtbench.tasks import resolve_tasks
    from mtbench.train import evaluate, make_loader

    model, result = load_trained(path)
    test = build_dataset("synthetic", "test", tasks=result.run.tasks)
    one, _ = evaluate(model, make_loader(test, 8, False, 0, 0), resolve_tasks("synthetic"), torch.device("cpu"))
    for task, values in one.items():
        for name, v in values.items():
            assert stored["metrics"][task][name] == pytest.approx(v, rel=1e-6, abs=1e-6), (task, name)


@pytest.mark.slow
def test_submitit_local_executor_runs_one_job_per_seed_and_status_lists_them(tmp_path):
    res = mtbench("run", *TINY, "--seeds", "0,1", "--launcher", "local", "--gpus-per-job", "0", "--time", "00:15",
                  "--results-dir", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("submitted decoder_only") == 2 and res.stdout.count("done decoder_only") == 2
    results = sorted(p.name for p in tmp_path.rglob("seed?.json"))
    assert results == ["seed0.json", "seed1.json"]
    st = mtbench("status", "--results-dir", str(tmp_path))
    assert st.returncode == 0 and "2 done" in st.stdout, st.stdout


@pytest.mark.slow
def test_jobs_two_processes_one_results_directory(tmp_path):
    res = mtbench("run", *TINY, "--methods", "decoder_only,lora", "--jobs", "2", "--results-dir", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.relative_to(tmp_path).parts[1] for p in tmp_path.rglob("seed0.json"))
    assert files == ["decoder_only", "lora"]
    for p in tmp_path.rglob("seed0.json"):
        json.loads(p.read_text())
        assert not (p.parent / "seed0.ckpt").exists()  # a finished run removes its checkpoint
    assert not list(tmp_path.rglob("*.tmp"))
    st = mtbench("status", "--results-dir", str(tmp_path))
    assert "2 done" in st.stdout, st.stdout


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_the_same_command_resumes(tmp_path):
    args = ["run", "--methods", "decoder_only", "--epochs", "2", "--batch-size", "8", "--train-size", "48",
            "--device", "cpu", "--results-dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env1())
    deadline = time.time() + 600
    while time.time() < deadline and not list(tmp_path.rglob("seed0.status.json")):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith("interrupted: stopped"), err
    assert list(tmp_path.rglob("latest.json")) and not list(tmp_path.rglob("seed0.json"))
    st = mtbench("status", "--results-dir", str(tmp_path))
    assert "interrupted" in st.stdout, st.stdout
    again = mtbench(*args)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stdout + again.stderr
    result = json.loads(only_result(tmp_path).read_text())
    assert len(result["train"]["resumes"]) == 1
    assert [h["epoch"] for h in result["train"]["history"]] == [1, 2]
