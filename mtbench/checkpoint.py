"""Resumable training checkpoints: written atomically beside the result, read back to continue a run.

A run whose result goes to ``.../seed0.json`` checkpoints into the directory ``.../seed0.ckpt/``:

- ``step{N}.safetensors``: tensors — the trainable parameters and persistent buffers (BatchNorm statistics) of the
  model now (``model.*``) and of the best-so-far state (``best.*``);
- ``step{N}.pt`` (``torch.save``, read with ``weights_only=True``): optimiser, gradient-scaler and scheduler state,
  the RNG states (Python, NumPy, torch CPU and CUDA, and the training loader's generator as of the epoch's start),
  epoch, batch within the epoch, optimiser step, best-so-far score and epoch, history and timings;
- ``latest.json``: names the newest complete pair. It is replaced (``os.replace``) only after both files of a pair
  are on disk, so a run killed at any moment leaves a readable checkpoint; older pairs are then deleted.

``fit`` writes a checkpoint after every evaluation and every ``every_minutes`` of training, and when it is asked to
stop (Ctrl-C / SIGTERM, :class:`StopRequest`). A finished run deletes its checkpoint directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtbench.errors import MtbenchError


def checkpoint_dir(result_path: str | Path) -> Path:
    """``seed0.json`` -> ``seed0.ckpt/`` (never committed)."""
    p = Path(result_path)
    return p.with_name(p.stem + ".ckpt")


class Interrupted(Exception):
    """Raised by ``fit`` after it has written a checkpoint because a stop was requested (Ctrl-C, SIGTERM)."""


def capture_rng() -> dict[str, Any]:
    """The RNG states of Python, NumPy, torch (CPU) and every CUDA device, in a form ``torch.load(weights_only=True)``
    reads back."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunCheckpoint:
    """The checkpoint directory of one run.

    Args:
        result_path: the run's result file; the checkpoint lives in :func:`checkpoint_dir` of it.
        every_minutes: also write one every this many minutes of training (0 = only after evaluations and on stop).
    """

    def __init__(self, result_path: str | Path, every_minutes: float = 10.0):
        self.dir = checkpoint_dir(result_path)
        self.every_s = float(every_minutes) * 60.0
        self.last_save = time.monotonic()

    @property
    def pointer(self) -> Path:
        return self.dir / "latest.json"

    def exists(self) -> bool:
        return self.pointer.is_file()

    def due(self) -> bool:
        """True when the periodic interval has passed since the last save."""
        return self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        """Write one checkpoint atomically (see the module docstring); returns the pointer path."""
        from safetensors.torch import save_file

        from mtbench.results import atomic_write_text, default_mode

        self.dir.mkdir(parents=True, exist_ok=True)
        tag = f"step{int(state['step'])}_{int(time.time() * 1000)}_{os.getpid()}"
        tens = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        for name, writer in ((f"{tag}.safetensors", lambda p: save_file(tens, p)),
                             (f"{tag}.pt", lambda p: torch.save(state, p))):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.dir)
            os.close(fd)
            try:
                writer(tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, default_mode())
                os.replace(tmp, self.dir / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        atomic_write_text(self.pointer, json.dumps({"tag": tag, "epoch": state.get("epoch"),
                                                    "batch": state.get("batch"), "step": state.get("step")}) + "\n")
        for p in self.dir.iterdir():  # older pairs
            if p.name != "latest.json" and not p.name.startswith(tag) and not p.name.startswith("."):
                p.unlink(missing_ok=True)
        self.last_save = time.monotonic()
        return self.pointer

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """``(tensors, state)`` of the newest checkpoint, or None when there is none.

        Raises:
            MtbenchError: the pointer names files that are missing or unreadable.
        """
        from safetensors.torch import load_file

        if not self.exists():
            return None
        try:
            tag = json.loads(self.pointer.read_text())["tag"]
            tensors = load_file(str(self.dir / f"{tag}.safetensors"))
            state = torch.load(self.dir / f"{tag}.pt", weights_only=True)
        except Exception as e:
            raise MtbenchError(f"unreadable checkpoint in {str(self.dir)!r} ({str(e).splitlines()[0]}); pass "
                               "--restart to discard it") from None
        return tensors, state

    def remove(self) -> None:
        """Delete the checkpoint directory (a finished run)."""
        shutil.rmtree(self.dir, ignore_errors=True)


class StopRequest:
    """Context manager: while active, Ctrl-C (SIGINT) and SIGTERM set :attr:`requested` instead of raising, so the
    training loop stops at the next step boundary, writes a checkpoint and raises :class:`Interrupted`. A second
    Ctrl-C raises ``KeyboardInterrupt`` at once. Outside the main thread it does nothing."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.requested = False
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False
