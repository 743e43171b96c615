"""Result files: one immutable JSON per (dataset, method, key, seed), with a typed schema.

Layout: ``results/{dataset}/{method}/{key}/seed{S}.json`` where ``key`` names the run's identity: ``default`` for
the default everything, otherwise the variant, its non-default options and every other departure from the defaults
(``r=32``, ``default_epochs=1_train-size=256``; :mod:`mtbench.identity`). Files are written atomically (temporary file in the same
directory, then ``os.replace``), so an interrupted run never leaves a partial result. What happens to an existing
file is an explicit choice (:data:`EXISTING_POLICIES`).

The single-task references used for Δm live in ``mtbench/assets/single_task_references.json`` (the embedded
dataset, measured with mtbench's own ``single_task`` run, with provenance) and in each dataset's spec
(:attr:`mtbench.datasets.DatasetSpec.references`: the papers' PASCAL-Context and NYUD numbers, with their source).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from mtbench.errors import MtbenchError
from mtbench.identity import RunIdentity

SCHEMA_VERSION = 2
REFERENCE_FILE = Path(__file__).parent / "assets" / "single_task_references.json"
#: What ``run`` does when the result file exists: ``error`` (stop before training), ``skip`` (say so, keep the
#: file), ``overwrite`` (replace it once the new run has finished).
EXISTING_POLICIES = ("skip", "error", "overwrite")


class RunInfo(BaseModel):
    method: str
    key: str = Field(validation_alias=AliasChoices("key", "variant"),
                     description="the identity's path key (directory name); files written before issue 6's naming "
                                 "pass call it 'variant', which now means only a registered variant")
    label: str
    options: dict[str, Any]
    dataset: str
    tasks: list[str]
    seed: int
    backbone: str
    init: str = Field(description="pretrained | random | path of a local checkpoint")
    preset: str | None = Field(default=None, description="recipe preset (--preset): embedded | paper")
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
    resumes: list[dict[str, Any]] = Field(default_factory=list, description="one entry per resume from a checkpoint")
    processes: int = Field(1, description="data-parallel processes (torchrun)")


class DeltaM(BaseModel):
    value: float | None
    references: dict[str, float] | None = None
    reference_source: str | None = None


class RunResult(BaseModel):
    """The schema of a result file (``schema_version`` 2; version 1 files have no ``identity``, which
    :func:`mtbench.identity.identity_of` reconstructs)."""

    schema_version: int = SCHEMA_VERSION
    run: RunInfo
    identity: RunIdentity | None = None
    train: TrainInfo
    split: str = "test"
    metrics: dict[str, dict[str, float]]
    primary: dict[str, float]
    protocol: dict[str, Any] = Field(default_factory=dict,
                                     description="evaluation protocol: label resolution, edge proxy note")
    delta_m: DeltaM
    params: dict[str, Any]
    env: dict[str, Any]

    @field_validator("schema_version")
    @classmethod
    def _readable_version(cls, v: int) -> int:
        if not 1 <= v <= SCHEMA_VERSION:
            raise ValueError(f"schema_version {v} is not one this mtbench reads (1..{SCHEMA_VERSION}; a newer "
                             "mtbench wrote it?)")
        return v

    @model_validator(mode="after")
    def _what_reports_read(self) -> "RunResult":
        """The fields every report reads: a primary metric and metrics for each task of the run, and the #TP."""
        if not self.run.tasks:
            raise ValueError("run.tasks is empty")
        missing = [t for t in self.run.tasks if t not in self.primary or t not in self.metrics]
        if missing:
            raise ValueError(f"no primary metric or metrics for task {missing[0]!r} of run.tasks")
        trainable = self.params.get("trainable")
        if isinstance(trainable, bool) or not isinstance(trainable, int) or trainable < 0:
            raise ValueError(f"params.trainable must be a count >= 0, got {trainable!r}")
        return self


def result_path(root: str | os.PathLike, dataset: str, method: str, key: str, seed: int) -> Path:
    return Path(root) / dataset / method / key / f"seed{seed}.json"


def profile_path(root: str | os.PathLike, dataset: str, method: str, key: str, device: str,
                 activation_checkpoint: str = "none") -> Path:
    """Where ``mtbench profile`` writes a method's cost profile: beside its results,
    ``{root}/{dataset}/{method}/{key}/profile_{device}.json`` (``device`` = ``cpu`` or ``cuda``), or
    ``profile_{device}_ckpt-{mode}.json`` when measured with ``--activation-checkpoint mode`` (tables and plots read
    the default profiles)."""
    suffix = "" if activation_checkpoint == "none" else f"_ckpt-{activation_checkpoint}"
    return Path(root) / dataset / method / key / f"profile_{device}{suffix}.json"


def profile_for_result(result_file: str | os.PathLike, device: str | None = None) -> Path | None:
    """The profile file beside a result file: ``profile_{device}.json``, or with ``device=None`` the CUDA profile
    when there is one, else the CPU one; None when there is none."""
    folder = Path(result_file).parent
    for d in ([device] if device else ["cuda", "cpu"]):
        p = folder / f"profile_{d}.json"
        if p.is_file():
            return p
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _Median(_Strict):
    median_ms: float


class _ProfileLatency(_Strict):
    train_step: _Median
    inference_batch1: _Median


class _InferenceFlops(_Strict):
    gflops: float


class _ProfileFlops(_Strict):
    inference: _InferenceFlops


class _ProfileEnv(_Strict):
    device: str
    device_name: str
    threads: int


class _TrainMemory(_Strict):
    rss_step_mb: float | None = None
    allocated_step_mb: float | None = None
    what: str = ""


class _ProfileMemory(_Strict):
    train: _TrainMemory | None = None


class ProfileFields(_Strict):
    """The fields of a profile file (``mtbench.profile/1``, written by :func:`mtbench.measure.profile_methods`)
    that the reports read (``table --kind cost``, ``plot``), with their types: checked when a profile is loaded, so
    a hand-edited or truncated profile fails with the file and the field named instead of deep in pandas."""

    batch_size: int
    flops: _ProfileFlops
    latency: _ProfileLatency
    env: _ProfileEnv
    memory: _ProfileMemory | None = None


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """Read a profile file: the JSON as written, after checking the fields the reports read
    (:class:`ProfileFields`).

    Raises:
        MtbenchError: not valid JSON, not a profile, or a field the reports read missing or of the wrong type
            (one line naming the file and the first such field).
    """
    from pydantic import ValidationError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MtbenchError(f"invalid profile file {path}: {e}") from None
    if not isinstance(data, dict) or "schema" not in data:
        raise MtbenchError(f"invalid profile file {path}: no 'schema': 'mtbench.profile/1'")
    if data["schema"] != "mtbench.profile/1":
        raise MtbenchError(f"invalid profile file {path}: schema {data['schema']!r} is not one this mtbench reads "
                           "('mtbench.profile/1'; a newer mtbench wrote it?)")
    try:
        ProfileFields.model_validate(data)
    except ValidationError as e:
        raise MtbenchError(f"invalid profile file {path}: {_first_error(e)}") from None
    return data


def default_mode() -> int:
    """Permissions of a new file under the current umask (temporary files are created 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + ``os.replace``), e.g. a figure.

    Raises:
        MtbenchError: the directory cannot be created or written (one line naming the path and the reason).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # a parent that is a file, no permission, read-only file system, ...
        raise MtbenchError(f"cannot write {str(path)!r}: {e.strerror}: {e.filename!r}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
        MtbenchError: a file that is not a valid result, one of another dataset than the directory it lies in (with
            ``dataset``), or of another split than the test split the reports compare (named in the message).
    """
    root = Path(root)
    base = root / dataset if dataset else root
    out = []
    for path in sorted(base.glob("**/seed*.json")):
        if not is_result_name(path.name):
            continue
        result = read_result(path)
        if dataset and result.run.dataset != dataset:
            raise MtbenchError(f"result file {str(path)!r} is of dataset {result.run.dataset!r} but lies under "
                               f"{str(base)!r}")
        if result.split != "test":
            raise MtbenchError(f"result file {str(path)!r} holds {result.split!r} metrics; the reports compare the "
                               "test split")
        out.append((path, result))
    return out


def is_result_name(name: str) -> bool:
    """Whether a file name is a result file's, ``seed{S}.json`` (not the ``seed{S}.status.json`` a failed, running
    or interrupted run leaves beside it)."""
    return re.fullmatch(r"seed\d+\.json", name) is not None


def _check_path_text(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a Path when it is a non-empty path that can be written into a UTF-8 result file.

    Raises:
        MtbenchError: an empty path (it would mean the current directory), or one that is not valid UTF-8.
    """
    text = os.fsdecode(path)
    if not text.strip():
        raise MtbenchError(f"{flag} is empty; give a path")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MtbenchError(f"{flag} {text!r} is not valid UTF-8; give a path in UTF-8") from None
    return Path(text)


def _check_writable(directory: Path, flag: str, shown: Path) -> None:
    """Create and remove a temporary file in ``directory``'s nearest existing ancestor (nothing else is created).

    Raises:
        MtbenchError: the file system refuses it (read-only, no permission, a pseudo file system such as /proc).
    """
    existing = next((p for p in (directory, *directory.parents) if p.exists()), Path("."))
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".mtbench-write-check-"):
            pass
    except OSError as e:
        why = e.strerror or e
        raise MtbenchError(f"{flag} {str(shown)!r} cannot be written ({why} in {str(existing)!r})") from None


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Fail early, before any work, when an output directory option cannot be used: it is empty, not UTF-8, names an
    existing file, or lies where files cannot be written.

    Raises:
        MtbenchError: such a path.
    """
    path = _check_path_text(path, flag)
    if path.exists() and not path.is_dir():
        raise MtbenchError(f"{flag} {str(path)!r} is a file, not a directory")
    if any(p.exists() and not p.is_dir() for p in path.parents):
        raise MtbenchError(f"{flag} {str(path)!r} lies under a file, not a directory")
    _check_writable(path, flag, path)


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Fail early, before any work, when an output file option cannot be written: it is empty, not UTF-8, names a
    directory, lies under an existing file, or where files cannot be written.

    Raises:
        MtbenchError: such a path.
    """
    path = _check_path_text(path, flag)
    if path.is_dir() or any(p.exists() and not p.is_dir() for p in path.parents):
        raise MtbenchError(f"{flag} {str(path)!r} is not a file path that can be written (a directory, or under a "
                           "file)")
    _check_writable(path.parent, flag, path)


def read_result(path: str | os.PathLike) -> RunResult:
    """The result stored in ``path``.

    Raises:
        MtbenchError: the file cannot be read as text, or is not a valid result (truncated JSON, another kind of
            file, missing fields); the one-line message names the file and the first problem.
    """
    from pydantic import ValidationError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not a text file"
        raise MtbenchError(f"cannot read result file {str(path)!r}: {why} (a result is the seed*.json a run writes)"
                           ) from None
    try:
        return RunResult.model_validate_json(text)
    except ValidationError as e:
        raise MtbenchError(f"invalid result file {str(path)!r}: {_first_error(e)}") from None


def _first_error(e) -> str:
    """``field.path: message (and N more)`` of a pydantic ``ValidationError``'s first error."""
    first = e.errors()[0]
    where = ".".join(map(str, first["loc"]))
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
    return f"{where + ': ' if where else ''}{msg}{more}"


def load_references(dataset: str) -> tuple[dict[str, float] | None, str | None]:
    """Single-task references ``{task: primary metric}`` for Δm, and where they come from.

    Returns ``(None, None)`` when the dataset has none yet (run ``mtbench run --methods single_task`` then
    ``mtbench references``).
    """
    from mtbench.datasets import get_dataset

    if REFERENCE_FILE.is_file():
        data = json.loads(REFERENCE_FILE.read_text())
        if dataset in data:
            entry = data[dataset]
            return {k: float(v) for k, v in entry["primary"].items()}, f"{REFERENCE_FILE.name}: {entry['source']}"
    spec = get_dataset(dataset)
    if spec.references:
        return dict(spec.references), spec.reference_source
    return None, None
