"""The installed ``mtbench`` console script, run in a subprocess as a user types it (one helper for every CLI test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: The console script ``pip install -e .`` puts next to this interpreter.
SCRIPT = Path(sys.executable).parent / "mtbench"


def mtbench(*args: str, cwd: str | Path | None = None, timeout: float = 900,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``mtbench ARGS`` through the installed entry point; stdout and stderr captured as text.

    Raises:
        AssertionError: no console script (the package is not installed in this interpreter's environment).
    """
    assert SCRIPT.is_file(), f"no mtbench console script at {SCRIPT}: install the package (pip install -e .)"
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


_DRIVER = r"""
import contextlib, io, json, sys, traceback
from importlib.metadata import entry_points

main = next(ep for ep in entry_points(group="console_scripts") if ep.name == "mtbench").load()
results = []
for argv in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = ["mtbench", *argv]
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the console script would print: a traceback, exit code 1
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
sys.stdout.write(json.dumps(results))
"""


def mtbench_many(*cases: list[str], cwd: str | Path | None = None, timeout: float = 900,
                 env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``mtbench ARGS`` for each ``ARGS`` in ``cases``, one after another in one subprocess, through the installed
    console script's entry point (``mtbench.cli:main`` as the package metadata names it), each with its own
    ``sys.argv``, stdout, stderr and exit code. For batches of bad-input checks that stop before any work: one torch
    import (about 2 s) instead of one per case. :func:`mtbench` runs the console script file itself.

    Raises:
        AssertionError: the driver itself failed (its stderr is in the message).
    """
    import json

    res = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps([list(c) for c in cases])], capture_output=True,
                         text=True, cwd=cwd, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr
    return [subprocess.CompletedProcess(["mtbench", *c], r["returncode"], r["stdout"], r["stderr"])
            for c, r in zip(cases, json.loads(res.stdout))]
