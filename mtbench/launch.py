"""Running many (method, seed) runs: separate local processes (``--jobs N``), cluster jobs through submitit
(``--launcher slurm|local``), and what ``mtbench status`` reports about them.

Every run is independent: it writes its own result file (atomically, through a uniquely named temporary file and
``os.replace``), its own checkpoint directory and its own status file, so concurrent runs in one results directory
never collide. A run started again (by hand, by ``--jobs`` or by a requeued SLURM job) resumes from its checkpoint.

Each ``mtbench run`` that starts more than nothing records a **sweep**: ``{results}/sweeps/{time}_{pid}.json`` lists
its runs (label, seed, result path, launcher, job id, log). ``mtbench status`` classifies each run of a sweep as
``done`` (result file), ``running`` (status file of a live run), ``interrupted`` (a checkpoint and no live run:
rerun to resume), ``failed`` (status file with the error, or a run whose process is gone) or ``missing``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from mtbench.errors import MtbenchError

LAUNCHERS = ("slurm", "local")


# ---- status files ------------------------------------------------------------------------------------------------

def status_path(result_path: str | Path) -> Path:
    """``seed0.json`` -> ``seed0.status.json``."""
    p = Path(result_path)
    return p.with_name(p.stem + ".status.json")


def write_status(result_path: str | Path, state: str | None, error: str | None = None) -> None:
    """Record a run's state (``running``, ``failed``, ``interrupted``) beside its result; ``None`` removes it."""
    from mtbench.results import atomic_write_text

    path = status_path(result_path)
    if state is None:
        path.unlink(missing_ok=True)
        return
    info = {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
            "job_id": os.environ.get("SLURM_JOB_ID"), "error": error,
            "updated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(path, json.dumps(info) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_state(result_path: str | Path) -> tuple[str, str]:
    """``(state, detail)`` of one run from its files: done, running, interrupted, failed or missing."""
    from mtbench.checkpoint import checkpoint_dir

    from mtbench.results import read_result

    p = Path(result_path)
    if p.is_file():
        try:
            read_result(p)
        except MtbenchError as e:
            return "failed", str(e)
        return "done", str(p)
    ckpt = (checkpoint_dir(p) / "latest.json").is_file()
    sp = status_path(p)
    info = json.loads(sp.read_text()) if sp.is_file() else None
    if info and info["state"] == "running":
        local = info.get("host") == socket.gethostname()
        if not local or _alive(int(info["pid"])):
            return "running", f"pid {info['pid']} on {info['host']}" + (f", job {info['job_id']}"
                                                                           if info.get("job_id") else "")
        if not ckpt:
            return "failed", f"process {info['pid']} ended without a result or checkpoint"
    if info and info["state"] == "failed":
        return "failed", info.get("error") or ""
    if ckpt:
        return "interrupted", "checkpoint present; run the same command again to resume"
    return "missing", ""


# ---- sweeps ------------------------------------------------------------------------------------------------------

def record_sweep(results_dir: str | Path, runs: list[dict[str, Any]], command: str | None, launcher: str) -> Path:
    """Write the sweep file of one ``mtbench run`` (see the module docstring); returns its path."""
    from mtbench.results import atomic_write_text

    now = _dt.datetime.now(_dt.timezone.utc)
    path = Path(results_dir) / "sweeps" / f"{now.strftime('%Y%m%dT%H%M%S')}_{os.getpid()}.json"
    atomic_write_text(path, json.dumps({"command": command, "launcher": launcher,
                                        "created_at": now.isoformat(timespec="seconds"), "runs": runs}, indent=2)
                      + "\n")
    return path


def sweep_status(results_dir: str | Path, sweep: str | None = None) -> tuple[Path, list[dict[str, Any]]]:
    """The runs of a sweep (the newest under ``results_dir`` unless ``sweep`` names a file) with their state.

    Raises:
        MtbenchError: no sweep recorded, or the named file does not exist or is not a sweep file.
    """
    if sweep is not None:
        path = Path(sweep)
        if not path.is_file():
            raise MtbenchError(f"sweep file not found: {sweep!r}")
    else:
        found = sorted((Path(results_dir) / "sweeps").glob("*.json"))
        if not found:
            raise MtbenchError(f"no sweep recorded under {str(results_dir)!r}; `mtbench run` records one")
        path = found[-1]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        runs = data["runs"]
        if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("path"), str)
                                                 and isinstance(r.get("label"), str) and isinstance(r.get("seed"), int)
                                                 for r in runs):
            raise TypeError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise MtbenchError(f"{str(path)!r} is not a sweep file (JSON with a 'runs' list of {{label, seed, path, ...}}, "
                           "written by `mtbench run` under RESULTS_DIR/sweeps)") from None
    rows = []
    for r in runs:
        state, detail = run_state(r["path"])
        rows.append({**r, "state": state, "detail": detail})
    return path, rows


# ---- local processes (--jobs N) ----------------------------------------------------------------------------------

def request_args(req) -> list[str]:
    """The ``mtbench run`` arguments that reproduce a :class:`mtbench.runner.RunRequest` (non-default fields only;
    a field ``foo_bar`` becomes ``--foo-bar``, so options added to both stay in step)."""
    from mtbench.runner import RunRequest

    default = RunRequest(methods="")
    args: list[str] = []
    for f in fields(RunRequest):
        value = getattr(req, f.name)
        if f.name in ("command",) or value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag)
        elif isinstance(value, list):
            args += [flag, ",".join(map(str, value))]
        else:
            args += [flag, str(value)]
    return args


def single_requests(req, runs) -> list:
    """One request per planned (method, seed) run."""
    from dataclasses import replace

    return [replace(req, methods=r.method.spec.label(), seed=r.seed, seeds=None) for r in runs]


def run_jobs(req, runs, jobs: int, log=print) -> int:
    """Run each planned (method, seed) as its own ``mtbench run`` process, at most ``jobs`` at a time.

    Each process writes its output to ``seedS.log`` beside its result. Ctrl-C reaches every process, which
    checkpoints and stops. Returns the number of runs that failed.
    """
    pending = list(zip(runs, single_requests(req, runs)))
    active: list[tuple[Any, subprocess.Popen, Any]] = []
    failed = 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run, single = pending.pop(0)
                logfile = run.path.with_name(run.path.stem + ".log")
                logfile.parent.mkdir(parents=True, exist_ok=True)
                fh = open(logfile, "w")
                cmd = [sys.executable, "-m", "mtbench.cli", "run", *request_args(single), "--no-record"]
                active.append((run, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env), fh))
                log(f"started {run.label} (pid {active[-1][1].pid}, log {logfile})")
            time.sleep(0.5)
            for item in list(active):
                run, proc, fh = item
                if proc.poll() is None:
                    continue
                fh.close()
                active.remove(item)
                if proc.returncode == 0:
                    log(f"done {run.label} -> {run.path}")
                else:
                    failed += 1
                    tail = [ln for ln in Path(fh.name).read_text().splitlines() if ln.strip()][-1:] or [""]
                    log(f"failed {run.label} (exit {proc.returncode}): {tail[0]}")
    except KeyboardInterrupt:
        for _, proc, _ in active:
            proc.wait()
        raise
    return failed


# ---- submitit (SLURM, or its local executor) ---------------------------------------------------------------------

class RunJob:
    """The submitit job of one (method, seed): runs it in-process (resuming from its checkpoint when there is one).

    On preemption or time-out submitit calls :meth:`checkpoint`, which requeues the same job; the run then resumes
    from its last checkpoint (written after every evaluation and every ``--checkpoint-minutes``). A job of several
    tasks (``--gpus-per-job`` > 1) trains with DistributedDataParallel, one task per GPU.
    """

    def __call__(self, request: dict[str, Any]) -> str:
        import submitit

        from mtbench.runner import RunRequest, execute

        if int(os.environ.get("SLURM_NTASKS", os.environ.get("SUBMITIT_LOCAL_NTASKS", "1")) or 1) > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        out = execute(RunRequest(**request), log=lambda m: print(m, flush=True))
        return "; ".join(str(r.path) for r, _ in out)

    def checkpoint(self, request: dict[str, Any]):
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(), request)


def parse_time(text: str) -> int:
    """``HH:MM`` (or minutes) -> minutes.

    Raises:
        MtbenchError: anything else.
    """
    h, colon, m = text.strip().partition(":")
    if not (h.isdigit() and (not colon or (m.isdigit() and len(m) == 2 and int(m) < 60))):
        minutes = 0
    else:
        minutes = int(h) * 60 + int(m) if colon else int(h)
    if minutes <= 0:
        raise MtbenchError(f"--time {text!r} is not HH:MM (MM 00-59) or whole minutes, > 0")
    return minutes


def submit(req, runs, launcher: str, partition: str | None, gpus_per_job: int, time_text: str,
           folder: str | Path | None = None, log=print) -> list:
    """Submit one job per planned (method, seed) through submitit; returns the jobs.

    Args:
        launcher: ``slurm`` (``sbatch`` through submitit's SLURM executor) or ``local`` (submitit's local executor,
            processes on this machine; used by the tests).
        partition: SLURM partition (required for ``slurm``).
        gpus_per_job: GPUs (and data-parallel tasks) per job; 0 for a CPU job of one task.
        time_text: wall-clock limit ``HH:MM``.
        folder: submitit's log folder (default ``{results}/submitit``).

    Raises:
        MtbenchError: unknown launcher, a missing partition, a bad time or GPU count.
    """
    import submitit

    if launcher not in LAUNCHERS:
        raise MtbenchError(f"unknown --launcher {launcher!r}; valid: {', '.join(LAUNCHERS)} (or no --launcher)")
    if launcher == "slurm" and not partition:
        raise MtbenchError("--launcher slurm needs --partition")
    if launcher == "slurm" and shutil.which("sbatch") is None:  # submitit would fall back to local processes
        raise MtbenchError("--launcher slurm needs SLURM's sbatch on PATH, and it is not there (--launcher local runs "
                           "the jobs on this machine)")
    if gpus_per_job < 0:
        raise MtbenchError(f"--gpus-per-job must be >= 0, got {gpus_per_job}")
    minutes = parse_time(time_text)
    folder = Path(folder or Path(req.results_dir) / "submitit")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=launcher)
    tasks = max(1, gpus_per_job)
    params: dict[str, Any] = {"timeout_min": minutes, "tasks_per_node": tasks, "nodes": 1, "name": "mtbench"}
    if gpus_per_job:
        params["gpus_per_node"] = gpus_per_job
    if launcher == "slurm":
        params.update(slurm_partition=partition, slurm_signal_delay_s=120)
    executor.update_parameters(**params)
    jobs = []
    for run, single in zip(runs, single_requests(req, runs)):
        job = executor.submit(RunJob(), asdict(single))
        log(f"submitted {run.label}: job {job.job_id} ({launcher})")
        jobs.append(job)
    return jobs
