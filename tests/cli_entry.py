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
