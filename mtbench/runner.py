"""The main job: train, select on validation, evaluate on test and store one result per method.

Data flows one way: ``mtbench.data`` -> ``mtbench.train`` (the method's model, losses, metrics) -> result files.
Everything a run needs is validated before the first one starts, so bad input fails fast with one line and leaves
no file behind.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mtbench.config import parse_method_specs
from mtbench.decoders import resolve_decoder
from mtbench.errors import MtbenchError
from mtbench.measure import count_params
from mtbench.metrics import delta_m, primary_higher_is_better, primary_metrics
from mtbench.registry import ResolvedMethod, build_model, resolve_spec
from mtbench.results import (
    EXISTING_POLICIES, DeltaM, RunInfo, RunResult, TrainInfo, default_mode, load_references, result_path, save_result,
)
from mtbench.swin import create_backbone
from mtbench.tasks import TaskSpec, resolve_tasks
from mtbench.train import RECIPES, TrainConfig, evaluate, fit, make_loader, recipe_dict, resolve_device

#: Backbone of each dataset's setting.
DATASET_BACKBONE = {"synthetic": "swin_embedded", "pascal_context": "swin_tiny_patch4_window7_224",
                    "nyud": "swin_tiny_patch4_window7_224"}


@dataclass
class RunRequest:
    """Everything ``mtbench run`` was asked for (CLI-independent)."""

    methods: str
    dataset: str = "synthetic"
    tasks: list[str] | None = None
    seed: int = 0
    device: str = "auto"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    max_train_batches: int = 0
    data_root: str | None = None
    weights: str | None = None
    init: str = "pretrained"
    results_dir: str = "results"
    existing: str = "skip"
    train_size: int | None = None
    command: str | None = None
    decoder: str | None = None


@dataclass
class PlannedRun:
    method: ResolvedMethod
    path: Path


def git_info() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the source tree mtbench runs from, or ``(None, None)`` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment(device: torch.device) -> dict:
    import timm

    import mtbench

    env = {"mtbench": mtbench.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "timm": timm.__version__, "platform": platform.platform(), "device": str(device),
           "threads": torch.get_num_threads(), "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def plan(req: RunRequest) -> tuple[list[TaskSpec], list[PlannedRun], TrainConfig]:
    """Validate the whole request and work out every result path, without training.

    Raises:
        MtbenchError: unknown method/option/task/dataset, bad values, missing weights or data root, or an existing
            result with ``existing='error'``.
    """
    if req.existing not in EXISTING_POLICIES:
        raise MtbenchError(f"unknown --existing {req.existing!r}; valid: {', '.join(EXISTING_POLICIES)}")
    if req.dataset not in DATASET_BACKBONE:
        raise MtbenchError(f"unknown dataset {req.dataset!r}; valid: {', '.join(DATASET_BACKBONE)}")
    if req.init not in ("pretrained", "random"):
        raise MtbenchError(f"unknown --init {req.init!r}; valid: pretrained, random")
    if req.weights is not None and not Path(req.weights).is_file():
        raise MtbenchError(f"weights file not found: {req.weights!r}")
    if req.data_root is not None and not Path(req.data_root).is_dir():
        raise MtbenchError(f"data root not found: {req.data_root!r}")
    tasks = resolve_tasks(req.dataset, req.tasks)
    decoder = resolve_decoder(req.decoder, DATASET_BACKBONE[req.dataset]).name
    default_decoder = resolve_decoder(None, DATASET_BACKBONE[req.dataset]).name
    recipe = RECIPES[req.dataset]
    overrides = {k: v for k, v in (("epochs", req.epochs), ("batch_size", req.batch_size), ("lr", req.lr))
                 if v is not None}
    recipe = replace(recipe, max_train_batches=req.max_train_batches, **overrides)
    recipe.validate()
    runs = []
    for spec in parse_method_specs(req.methods):
        rm = resolve_spec(spec)
        variant = rm.variant_key
        if req.init == "random":
            variant += "_init=random"
        if req.tasks:
            variant += "_tasks=" + "+".join(t.name for t in tasks)
        if decoder != default_decoder:
            variant += f"_decoder={decoder}"
        path = result_path(req.results_dir, req.dataset, rm.name, variant, req.seed)
        if path.exists() and req.existing == "error":
            raise MtbenchError(f"result exists: {path}; pass --existing skip or --existing overwrite")
        runs.append(PlannedRun(rm, path))
    seen = set()
    for r in runs:
        if r.path in seen:
            raise MtbenchError(f"method {r.method.spec.label()!r} is listed twice")
        seen.add(r.path)
    return tasks, runs, recipe


def build_datasets(req: RunRequest, tasks: list[TaskSpec]):
    from mtbench.data import build_dataset

    names = [t.name for t in tasks]
    kw = dict(root=req.data_root, tasks=names, seed=0)
    train_kw = dict(kw)
    if req.train_size is not None:
        train_kw["n"] = req.train_size
    return (build_dataset(req.dataset, "train", train_aug=True, **train_kw),
            build_dataset(req.dataset, "val", **kw), build_dataset(req.dataset, "test", **kw))


def run_one(req: RunRequest, tasks: list[TaskSpec], planned: PlannedRun, recipe: TrainConfig, datasets,
            device: torch.device, progress=None) -> RunResult:
    """Train and evaluate one method; write its result file atomically and return it."""
    torch.manual_seed(req.seed)
    backbone_name = DATASET_BACKBONE[req.dataset]
    init = req.weights or req.init
    backbone = create_backbone(backbone_name, pretrained=(req.init == "pretrained"), weights=req.weights)
    model = build_model(planned.method, backbone, tasks, decoder=req.decoder)
    params = count_params(model)
    references, ref_source = load_references(req.dataset)
    train_set, val_set, test_set = datasets
    on_step = on_epoch = None
    if progress is not None:
        on_step, on_epoch = progress.callbacks(planned.method.label, recipe)
    fitted = fit(model, train_set, val_set, tasks, recipe, device, seed=req.seed, references=references,
                 on_step=on_step, on_epoch=on_epoch)
    test_metrics, _ = evaluate(model, make_loader(test_set, recipe.batch_size, False, recipe.num_workers, 0), tasks,
                               device, recipe.amp)
    prim = primary_metrics(test_metrics, tasks)
    dm = None
    if references and all(t.name in references for t in tasks):
        dm = delta_m(prim, references, primary_higher_is_better(tasks))
    commit, dirty = git_info()
    rm = planned.method
    result = RunResult(
        run=RunInfo(method=rm.name, variant=planned.path.parent.name,
                    label=rm.label + (" [random init]" if req.init == "random" else ""), options=rm.config.to_dict(),
                    dataset=req.dataset, tasks=[t.name for t in tasks], seed=req.seed, backbone=backbone_name,
                    init=str(init), created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    git_commit=commit, git_dirty=dirty, command=req.command, decoder=model.decoder_name,
                    aux_loss_weights=dict(model.aux_loss_weights)),
        train=TrainInfo(recipe=recipe_dict(recipe), best_epoch=fitted.best_epoch, selection=fitted.selection,
                        history=fitted.history, train_time_s=round(fitted.train_time_s, 2),
                        images_per_s=round(fitted.images_per_s, 2), device=str(device)),
        metrics=test_metrics, primary=prim,
        delta_m=DeltaM(value=dm, references=references if dm is not None else None,
                       reference_source=ref_source if dm is not None else None),
        params=params.to_dict(), env=environment(device),
    )
    save_checkpoint(model, checkpoint_path(planned.path))
    save_result(result, planned.path)
    return result


def checkpoint_path(result_path: Path) -> Path:
    """The trained-state file beside a result file (``seed0.json`` -> ``seed0.safetensors``; never committed)."""
    return result_path.with_suffix(".safetensors")


def save_checkpoint(model, path: Path) -> None:
    """Save the trained state: every trainable parameter and every persistent buffer (BatchNorm statistics), written
    atomically. The frozen backbone is not stored; :func:`load_trained` rebuilds it from the recorded init."""
    from safetensors.torch import save_file

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
             if k in trainable or k in buffers}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, default_mode())
    os.replace(tmp, path)


def load_trained(result_file: str | Path):
    """Rebuild the model of a result file and load its trained state.

    Returns:
        ``(model in eval mode, RunResult)``.

    Raises:
        MtbenchError: missing result or checkpoint file, or a checkpoint that does not fit the model.
    """
    from safetensors.torch import load_file

    from mtbench.config import MethodSpec

    path = Path(result_file)
    if not path.is_file():
        raise MtbenchError(f"result file not found: {str(path)!r}")
    result = RunResult.model_validate_json(path.read_text())
    ckpt = checkpoint_path(path)
    if not ckpt.is_file():
        raise MtbenchError(f"no trained state beside {str(path)!r} (expected {ckpt.name}); rerun with --existing "
                           "overwrite")
    opts = {k: ("+".join(v) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in result.run.options.items()}
    rm = resolve_spec(MethodSpec(result.run.method, opts))
    init = result.run.init
    backbone = create_backbone(result.run.backbone, pretrained=(init == "pretrained"),
                               weights=None if init in ("pretrained", "random") else init)
    model = build_model(rm, backbone, resolve_tasks(result.run.dataset, result.run.tasks), decoder=result.run.decoder)
    state = load_file(str(ckpt))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise MtbenchError(f"checkpoint {str(ckpt)!r} lacks {len(missing)} trained tensors, e.g. {missing[0]!r}")
    model.load_state_dict(state, strict=False)
    return model.eval(), result


def default_command() -> str:
    return " ".join(["mtbench"] + sys.argv[1:]) if sys.argv else "mtbench"


def set_threads() -> None:
    """Use every core for intra-op parallelism on CPU (torch defaults to physical cores, often fewer), unless
    ``$OMP_NUM_THREADS`` says otherwise."""
    n = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))


__all__ = ["RunRequest", "plan", "run_one", "build_datasets", "DATASET_BACKBONE", "resolve_device", "default_command",
           "set_threads", "load_trained", "save_checkpoint"]
