"""Usage errors of every command, through the installed ``mtbench`` entry point, as a user types them.

Whatever typer version pyproject allows (typer >= 0.26 vendors click as ``typer._click``), a usage error prints
click's short usage message and exits 2 without a traceback, and bare ``mtbench`` shows the help.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cli_entry import SCRIPT, mtbench, mtbench_many


def _commands() -> list[str]:
    from mtbench.cli import app

    return [c.name or c.callback.__name__ for c in app.registered_commands] + [g.name for g in app.registered_groups]


def test_entry_point_runs_this_checkout(tmp_path):
    """The console script imports this checkout's package: its imports run as the script's would, from a directory
    that holds no ``mtbench`` (the script's own ``sys.path[0]`` is its ``bin/``), so only the install can supply it."""
    assert "from mtbench.cli import main" in SCRIPT.read_text()
    res = subprocess.run([sys.executable, "-c", "import mtbench.cli as c; print(c.__file__)"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).resolve() == (Path(__file__).parents[1] / "mtbench" / "cli.py").resolve()


def test_bare_mtbench_shows_help_and_exits_2():
    res = mtbench()
    assert res.returncode == 2
    assert "Traceback" not in res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "Usage" in out and all(c in out for c in COMMANDS)


def test_unknown_command():
    res = mtbench("nosuch")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "nosuch" in res.stderr and "Usage" in res.stderr


COMMANDS = ["list", "run", "eval", "status", "table", "params", "references", "pretrain", "attention", "profile",
            "plot", "data", "interaction-cost", "train-memory"]


def test_unknown_flag_on_every_command():
    """Each command through the installed entry point (one process for the batch: :func:`cli_entry.mtbench_many`)."""
    argvs = [(["data", "check"] if command == "data" else [command]) + ["--nosuchflag"] for command in COMMANDS]
    for command, res in zip(COMMANDS, mtbench_many(*argvs), strict=True):
        assert command in _commands()
        assert res.returncode == 2, (command, res.stderr)
        assert "Traceback" not in res.stderr and "--nosuchflag" in res.stderr and "Usage" in res.stderr, command


def test_every_command_is_covered():
    assert sorted(_commands()) == sorted(COMMANDS)


BAD_VALUES = [
    (["run", "--methods", "mtlora", "--epochs", "abc"], "--epochs"),
    (["run", "--epochs", "3"], "--methods"),
    (["params", "--dataset"], "--dataset"),
    (["pretrain", "--epochs", "1.5"], "--epochs"),
    (["attention", "--n", "many"], "--n"),
    (["profile", "--methods", "mtlora", "--rounds", "abc"], "--rounds"),
    (["profile", "--methods", "mtlora", "--batch-size", "x2"], "--batch-size"),
    (["profile", "--rounds", "3"], "--methods"),
    (["plot", "--results-dir"], "--results-dir"),
    (["table", "--kind"], "--kind"),
    (["interaction-cost", "--repeats", "abc"], "--repeats"),
    (["train-memory", "--batch-size", "x"], "--batch-size"),
]


def test_bad_value_or_missing_argument():
    """click names the option whose value is bad or missing (typer >= 0.26 no longer repeats the value itself)."""
    for (args, bad), res in zip(BAD_VALUES, mtbench_many(*(a for a, _ in BAD_VALUES)), strict=True):
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr and bad in res.stderr, (args, res.stderr)
