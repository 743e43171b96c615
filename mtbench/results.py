"""Result files: one immutable JSON per (dataset, method, variant, seed), with a typed schema.

Layout: ``results/{dataset}/{method}/{variant}/seed{S}.json`` where ``variant`` is ``default`` or the variant name
and non-default options (e.g. ``r=32``, ``mtlora_plus``). Files are written atomically (temporary file in the same
directory, then ``os.replace``), so an interrupted run never leaves a partial result. What happens to an existing
file is an explicit choice (:data:`EXISTING_POLICIES`).

The single-task references used for Δm live in ``mtbench/assets/single_task_references.json`` (the embedded
dataset, measured with mtbench's own ``single_task`` run, with provenance) and in
:data:`mtbench.metrics.SINGLE_TASK_REFERENCES` (the papers' PASCAL-Context numbers).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mtbench.errors import MtbenchError

SCHEMA_VERSION = 1
REFERENCE_FILE = Path(__file__).parent / "assets" / "single_task_references.json"
#: What ``run`` does when the result file exists: ``error`` (stop before training), ``skip`` (say so, keep the
#: file), ``overwrite`` (replace it once the new run has finished).
EXISTING_POLICIES = ("skip", "error", "overwrite")


class RunInfo(BaseModel):
    method: str
    variant: str
    label: str
    options: dict[str, Any]
    dataset: str
    tasks: list[str]
    seed: int
    backbone: str
    init: str = Field(description="pretrained | random | path of a local checkpoint")
    created_at: str
    git_commit: str | None = None
    git_dirty: bool | None = None
    command: str | None = None
    decoder: str | None = Field(default=None, description="decoder registry key (mtbench.decoders); None in files "
                                "written before the decoder registry (= the backbone's default)")
    aux_loss_weights: dict[str, float] = Field(default_factory=dict, description="weights of auxiliary losses")


class TrainInfo(BaseModel):
    recipe: dict[str, Any]
    best_epoch: int
    selection: str = Field(description="val_delta_m | val_loss: how the checkpoint was chosen on validation")
    history: list[dict[str, Any]]
    train_time_s: float
    images_per_s: float
    device: str


class DeltaM(BaseModel):
    value: float | None
    references: dict[str, float] | None = None
    reference_source: str | None = None


class RunResult(BaseModel):
    """The schema of a result file (``schema_version`` 1)."""

    schema_version: int = SCHEMA_VERSION
    run: RunInfo
    train: TrainInfo
    split: str = "test"
    metrics: dict[str, dict[str, float]]
    primary: dict[str, float]
    delta_m: DeltaM
    params: dict[str, Any]
    env: dict[str, Any]


def result_path(root: str | os.PathLike, dataset: str, method: str, variant: str, seed: int) -> Path:
    return Path(root) / dataset / method / variant / f"seed{seed}.json"


def default_mode() -> int:
    """Permissions of a new file under the current umask (temporary files are created 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file in the same directory + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_result(result: RunResult, path: Path) -> None:
    atomic_write_text(path, result.model_dump_json(indent=2) + "\n")


def load_results(root: str | os.PathLike, dataset: str | None = None) -> list[tuple[Path, RunResult]]:
    """Every result file under ``root`` (optionally of one dataset), sorted by path.

    Raises:
        MtbenchError: a file that is not a valid result (named in the message).
    """
    root = Path(root)
    base = root / dataset if dataset else root
    out = []
    for path in sorted(base.glob("**/seed*.json")):
        try:
            out.append((path, RunResult.model_validate_json(path.read_text())))
        except Exception as e:
            raise MtbenchError(f"invalid result file {path}: {str(e).splitlines()[0]}") from None
    return out


def load_references(dataset: str) -> tuple[dict[str, float] | None, str | None]:
    """Single-task references ``{task: primary metric}`` for Δm, and where they come from.

    Returns ``(None, None)`` when the dataset has none yet (run ``mtbench run --methods single_task`` then
    ``mtbench references``).
    """
    from mtbench.metrics import SINGLE_TASK_REFERENCES

    if REFERENCE_FILE.is_file():
        data = json.loads(REFERENCE_FILE.read_text())
        if dataset in data:
            entry = data[dataset]
            return {k: float(v) for k, v in entry["primary"].items()}, f"{REFERENCE_FILE.name}: {entry['source']}"
    if dataset in SINGLE_TASK_REFERENCES:
        return dict(SINGLE_TASK_REFERENCES[dataset]), "MTLoRA CVPR'24 / TADFormer CVPR'25 Table 1, single-task row"
    return None, None
