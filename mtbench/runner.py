"""The main job: train, select on validation, evaluate on test and store one result per method.

Data flows one way: ``mtbench.data`` -> ``mtbench.train`` (the method's model, losses, metrics) -> result files.
Everything a run needs is validated before the first one starts, so bad input fails fast with one line and leaves
no file behind.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mtbench.config import parse_method_specs
from mtbench.cpu import APPLIED as CPU_SETTINGS, configure_cpu
from mtbench.data import check_data_root
from mtbench.decoders import resolve_decoder
from mtbench.encoder import check_activation_checkpoint
from mtbench.errors import MtbenchError, out_of_memory
from mtbench.identity import RunIdentity, make_identity
from mtbench.measure import count_params
from mtbench.metrics import delta_m, primary_higher_is_better, primary_metrics
from mtbench.registry import ResolvedMethod, build_model, resolve, resolve_spec
from mtbench.results import (
    EXISTING_POLICIES, DeltaM, RunInfo, RunResult, TrainInfo, check_output_dir, default_mode, load_references,
    read_result, save_result,
)
from mtbench.datasets import get_dataset, resolve_recipe
from mtbench.swin import check_weights_file, create_backbone
from mtbench.tasks import TaskSpec, resolve_tasks
from mtbench.train import TrainConfig, eval_loader, evaluate, fit, recipe_dict, resolve_device

#: ``--eval-resolution`` values: ``resized`` evaluates on the labels resized to the input size (MTLoRA's online
#: evaluation); ``original`` on the labels at their stored resolution, predictions upsampled to it (ASTMT /
#: MTI-Net's evaluation, the older literature's protocol).
EVAL_RESOLUTIONS = ("resized", "original")

#: What the edge numbers are, recorded in every result that has the edge task.
EDGE_PROTOCOL = ("maxF is a pixel-exact proxy (no boundary tolerance, no NMS), not the ODS-F of the edge "
                 "literature, which needs the external SEISM / BSDS tooling")


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
    #: recipe preset of the dataset spec (None: the dataset's default, ``embedded`` or ``paper``)
    preset: str | None = None
    #: ``--eval-resolution`` (:data:`EVAL_RESOLUTIONS`); the identity's evaluation protocol
    eval_resolution: str = "resized"
    #: decoder name (None = the dataset's default, :func:`mtbench.identity.setting_defaults`)
    decoder: str | None = None
    #: run every method once per seed (overrides ``seed``)
    seeds: list[int] | None = None
    #: discard an existing checkpoint instead of resuming from it (resuming is the default)
    restart: bool = False
    #: also checkpoint every this many minutes of training (0: only after evaluations and on stop)
    checkpoint_minutes: float = 10.0
    #: activation checkpointing of blocks (:data:`mtbench.encoder.ACTIVATION_CHECKPOINT`): memory for time, same
    #: numbers (recorded in the result's ``env``, not in its identity)
    activation_checkpoint: str = "none"


@dataclass
class PlannedRun:
    method: ResolvedMethod
    path: Path
    identity: RunIdentity | None = None
    seed: int = 0

    @property
    def label(self) -> str:
        return (self.identity.label() if self.identity else self.method.label) + f" seed {self.seed}"


def git_info() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the source tree mtbench runs from, or ``(None, None)`` outside git.

    A copy of a checkout without its ``.git`` (a remote machine, a container) can state them in
    ``$MTBENCH_GIT_COMMIT`` and ``$MTBENCH_GIT_DIRTY`` (``0``/``1``); they are used only when git cannot tell.
    """
    root = Path(__file__).resolve().parent.parent
    env_commit = os.environ.get("MTBENCH_GIT_COMMIT") or None
    env_dirty = None if "MTBENCH_GIT_DIRTY" not in os.environ else os.environ["MTBENCH_GIT_DIRTY"] not in ("", "0")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return env_commit, env_dirty if env_commit else None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return env_commit, env_dirty if env_commit else None


def environment(device: torch.device) -> dict:
    import timm

    import mtbench

    env = {"mtbench": mtbench.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "timm": timm.__version__, "platform": platform.platform(), "device": str(device),
           "threads": torch.get_num_threads(), "cuda": torch.version.cuda, "cpu_settings": dict(CPU_SETTINGS)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def plan(req: RunRequest) -> tuple[list[TaskSpec], list[PlannedRun], TrainConfig]:
    """Validate the whole request and work out every result path, without training.

    Raises:
        MtbenchError: unknown method/option/task/dataset, bad values, missing weights or data root, or an existing
            result with ``existing='error'``.
    """
    resolve_device(req.device)  # an unknown or absent device is bad input too: fail before anything is written
    if req.existing not in EXISTING_POLICIES:
        raise MtbenchError(f"unknown --existing {req.existing!r}; valid: {', '.join(EXISTING_POLICIES)}")
    spec = get_dataset(req.dataset)
    check_activation_checkpoint(req.activation_checkpoint)
    if req.eval_resolution not in EVAL_RESOLUTIONS:
        raise MtbenchError(f"unknown --eval-resolution {req.eval_resolution!r}; valid: {', '.join(EVAL_RESOLUTIONS)}")
    if req.eval_resolution == "original" and spec.data_dir is None:
        raise MtbenchError(f"--eval-resolution original needs a dataset read from files; {req.dataset!r} is rendered "
                           "at its input size")
    if req.init not in ("pretrained", "random"):
        raise MtbenchError(f"unknown --init {req.init!r}; valid: pretrained, random")
    if req.weights is not None and req.init == "random":
        raise MtbenchError("--init random and --weights exclude each other (--weights initialises the backbone from "
                           "that checkpoint)")
    check_weights_file(req.weights)
    check_data_root(req.data_root)
    tasks = resolve_tasks(req.dataset, req.tasks)
    req.preset, recipe = resolve_recipe(req.dataset, req.preset, epochs=req.epochs, batch_size=req.batch_size,
                                        lr=req.lr, max_train_batches=req.max_train_batches)
    if not str(req.results_dir).strip():
        raise MtbenchError("--results-dir is empty; give a directory (default: results)")
    check_output_dir(req.results_dir, "--results-dir")
    if req.train_size is not None and req.train_size < 1:
        raise MtbenchError(f"--train-size must be >= 1, got {req.train_size}")
    seeds = list(req.seeds) if req.seeds else [req.seed]
    check_seeds(seeds)
    if len(set(seeds)) != len(seeds):
        raise MtbenchError(f"--seeds lists a seed twice: {','.join(map(str, seeds))}")
    if not 0 <= req.checkpoint_minutes < math.inf:
        raise MtbenchError(f"--checkpoint-minutes must be a finite number >= 0, got {req.checkpoint_minutes}")
    backbone = get_dataset(req.dataset).backbone
    if req.decoder is not None:  # validated before anything runs; None keeps each method's own default decoder
        resolve_decoder(req.decoder, backbone)
    runs = []
    for spec in parse_method_specs(req.methods):
        rm = resolve_spec(spec)
        ident = run_identity(req, rm, tasks, recipe)
        for seed in seeds:
            path = ident.result_path(req.results_dir, seed)
            if path.is_dir():  # found before training, not when the result is written
                raise MtbenchError(f"the result path {str(path)!r} is a directory; move it away")
            if path.exists() and req.existing in ("error", "skip"):  # only a valid result may stand for the run
                try:
                    read_result(path)
                except MtbenchError as e:
                    raise MtbenchError(f"{e}; pass --existing overwrite to run it again") from None
                if req.existing == "error":
                    raise MtbenchError(f"result exists: {path}; pass --existing skip or --existing overwrite")
            runs.append(PlannedRun(rm, path, ident, seed))
    seen = set()
    for r in runs:
        if r.path in seen:
            raise MtbenchError(f"method {r.method.spec.label()!r} is listed twice")
        seen.add(r.path)
    return tasks, runs, recipe


def check_seeds(seeds) -> None:
    """Every seed in ``0..2**63-1``, the range of torch's generator seed.

    Raises:
        MtbenchError: the first seed outside it.
    """
    if bad := [s for s in seeds if not 0 <= s < 2**63]:
        raise MtbenchError(f"a seed must be in 0..2**63-1 (torch's generator seed), got {bad[0]}")


def run_identity(req: RunRequest, rm: ResolvedMethod, tasks: list[TaskSpec], recipe: TrainConfig) -> RunIdentity:
    """The identity of one planned run (:mod:`mtbench.identity`): everything that can change its numbers except
    the seed. New per-run choices enter here."""
    _, preset_recipe = resolve_recipe(req.dataset, req.preset)
    backbone = get_dataset(req.dataset).backbone
    decoder = None if req.decoder is None else resolve_decoder(req.decoder, backbone).name  # one name per decoder
    return make_identity(method=rm.name, variant=rm.variant, options=rm.config.to_dict(), dataset=req.dataset,
                         tasks=[t.name for t in tasks], init=req.init, weights=req.weights,
                         backbone=backbone, decoder=decoder, preset=req.preset,
                         eval_protocol=req.eval_resolution, recipe=recipe_dict(recipe),
                         preset_recipe=recipe_dict(preset_recipe), train_size=req.train_size)


def build_datasets(req: RunRequest, tasks: list[TaskSpec], recipe: TrainConfig | None = None):
    """``(train, val, test)`` datasets: train with the recipe's augmentation (``flip`` when no recipe is given),
    test with labels at ``req.eval_resolution``."""
    from mtbench.data import build_dataset

    names = [t.name for t in tasks]
    kw = dict(root=req.data_root, tasks=names, seed=0)
    train_kw = dict(kw)
    if req.train_size is not None:
        train_kw["n"] = req.train_size
    augment = recipe.augment if recipe is not None else "flip"
    return (build_dataset(req.dataset, "train", train_aug=augment, **train_kw),
            build_dataset(req.dataset, "val", **kw),
            build_dataset(req.dataset, "test", label_resolution=req.eval_resolution, **kw))


def evaluation_protocol(req: RunRequest, tasks: list[TaskSpec]) -> dict:
    """What the test metrics were computed on, recorded in the result file."""
    spec = get_dataset(req.dataset)
    out = {
        "split": "test",
        "label_resolution": req.eval_resolution,
        "description": (f"labels resized to {spec.img_size}x{spec.img_size} (nearest; MTLoRA's online evaluation)"
                        if req.eval_resolution == "resized" else
                        "labels at their stored resolution, predictions upsampled to it (nearest for segmentation, "
                        "bilinear otherwise; ASTMT / MTI-Net's evaluation)"),
        "source": "MTLoRA evaluation/ (scale-lab/MTLoRA), see mtbench.metrics",
    }
    if any(t.name == "edge" for t in tasks):
        out["edge"] = EDGE_PROTOCOL
    return out


def failure_line(e: BaseException) -> str:
    """The one line a failed run's status file records (``mtbench status`` shows it): a user error as the CLI prints
    it (``error: ...``), anything else (a bug) with its exception type, e.g. ``RuntimeError: ...``."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"error: {first}" if isinstance(e, MtbenchError) else f"{type(e).__name__}: {first}"


def run_one(req: RunRequest, tasks: list[TaskSpec], planned: PlannedRun, recipe: TrainConfig, datasets,
            device: torch.device, progress=None, stop=None, log=None) -> RunResult:
    """Train and evaluate one (method, seed); write its result file atomically and return it.

    Training resumes from the run's checkpoint when there is one (unless ``req.restart``), checkpoints as
    :func:`mtbench.train.fit` describes, and deletes the checkpoint once the result is written. A status file beside
    the result (``seedS.status.json``) says that the run is running, failed or was interrupted, for
    ``mtbench status``; it is removed with success. Under ``torchrun`` only rank 0 writes files.

    Raises:
        mtbench.checkpoint.Interrupted: ``stop`` was requested; the checkpoint has been written.
    """
    from mtbench import distributed
    from mtbench.checkpoint import Interrupted, RunCheckpoint
    from mtbench.launch import write_status

    seed = planned.seed
    main = distributed.is_main()
    ckpt = RunCheckpoint(planned.path, req.checkpoint_minutes)
    if req.restart and main:
        ckpt.remove()
    distributed.barrier()
    if ckpt.exists() and log is not None:
        log(f"resuming {planned.label} from its checkpoint in {ckpt.dir}")
    if main:
        write_status(planned.path, "running")
    try:
        torch.manual_seed(seed)
        backbone_name = get_dataset(req.dataset).backbone
        init = req.weights or req.init
        backbone = create_backbone(backbone_name, pretrained=(req.init == "pretrained"), weights=req.weights)
        model = build_model(planned.method, backbone, tasks, decoder=req.decoder)
        model.activation_checkpoint = req.activation_checkpoint
        params = count_params(model)
        references, ref_source = load_references(req.dataset)
        train_set, val_set, test_set = datasets
        on_step = on_epoch = None
        if progress is not None:
            on_step, on_epoch = progress.callbacks(planned.label, recipe)
        fitted = fit(model, train_set, val_set, tasks, recipe, device, seed=seed, references=references,
                     on_step=on_step, on_epoch=on_epoch, checkpoint=ckpt, stop=stop)
        original = req.eval_resolution == "original"  # labels of different sizes: one image per batch
        test_metrics, _ = evaluate(model, eval_loader(test_set, recipe, 1 if original else None), tasks, device,
                                   recipe.amp, match_target_size=original)
    except Interrupted:
        if main:
            write_status(planned.path, "interrupted")
        raise
    except BaseException as e:
        if (what := out_of_memory(e)) is not None:  # a batch too large for the machine: one line, not torch's
            e = MtbenchError(f"{planned.label}: out of memory on {device} ({what}) at batch size {recipe.batch_size}; "
                             "lower --batch-size or the method's sizes")
        if main:
            write_status(planned.path, "failed", error=failure_line(e))
        if isinstance(e, MtbenchError):
            raise e from None
        raise
    prim = primary_metrics(test_metrics, tasks)
    dm = None
    if references and all(t.name in references for t in tasks):
        dm = delta_m(prim, references, primary_higher_is_better(tasks))
    commit, dirty = git_info()
    rm = planned.method
    result = RunResult(
        run=RunInfo(method=rm.name, key=planned.path.parent.name,
                    label=planned.identity.label() if planned.identity else rm.label, options=rm.config.to_dict(),
                    dataset=req.dataset, tasks=[t.name for t in tasks], seed=seed, backbone=backbone_name,
                    init=str(init), preset=req.preset, created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    git_commit=commit, git_dirty=dirty, command=req.command, decoder=model.decoder_name,
                    aux_loss_weights=dict(model.aux_loss_weights)),
        train=TrainInfo(recipe=recipe_dict(recipe), best_epoch=fitted.best_epoch, selection=fitted.selection,
                        history=fitted.history, train_time_s=round(fitted.train_time_s, 2),
                        images_per_s=round(fitted.images_per_s, 2), device=str(device), resumes=fitted.resumes,
                        processes=distributed.world_size()),
        identity=planned.identity, metrics=test_metrics, primary=prim, protocol=evaluation_protocol(req, tasks),
        delta_m=DeltaM(value=dm, references=references, reference_source=ref_source),
        params=params.to_dict(),
        env={**environment(device), "activation_checkpoint": req.activation_checkpoint},
    )
    if main:
        save_checkpoint(model, checkpoint_path(planned.path))
        save_result(result, planned.path)
        ckpt.remove()
        write_status(planned.path, None)
    distributed.barrier()
    return result


def execute(req: RunRequest, log=print, progress=None) -> list[tuple[PlannedRun, RunResult | None]]:
    """``mtbench run`` in this process: plan, skip what exists (``--existing skip``), train the rest one after the
    other. Under ``torchrun`` every process calls this; they train each run together.

    Returns:
        ``[(planned run, result or None when skipped)]``.

    Raises:
        MtbenchError: bad input (before anything is trained or written).
        mtbench.checkpoint.Interrupted: Ctrl-C / SIGTERM; the current run's checkpoint has been written.
    """
    from mtbench import distributed
    from mtbench.checkpoint import StopRequest

    task_specs, runs, recipe = plan(req)
    dev = distributed.init_from_env(resolve_device(req.device))
    configure_cpu()
    out: list[tuple[PlannedRun, RunResult | None]] = []
    todo = []
    for r in runs:
        if r.path.exists() and req.existing == "skip":
            log(f"skip {r.label}: result exists at {r.path} (use --existing overwrite to replace it)")
            out.append((r, None))
        else:
            todo.append(r)
    if not todo:
        return out
    try:
        datasets = build_datasets(req, task_specs, recipe)
    except MtbenchError as e:  # files missing on disk: the sweep already lists these runs; `status` says why
        if distributed.is_main():
            from mtbench.launch import write_status

            for r in todo:
                write_status(r.path, "failed", error=failure_line(e))
        raise
    log(f"dataset {req.dataset} ({len(datasets[0])}/{len(datasets[1])}/{len(datasets[2])} train/val/test), tasks "
        f"{', '.join(t.name for t in task_specs)}, device {dev}"
        + (f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else "")
        + f", preset {req.preset}, {recipe.epochs} epochs x batch {recipe.batch_size}")
    with StopRequest() as stop:
        for r in todo:
            result = run_one(req, task_specs, r, recipe, datasets, dev, progress, stop=stop, log=log)
            dm = result.delta_m.value
            log(f"done {r.label}: " + ", ".join(f"{t} {v:.2f}" for t, v in result.primary.items())
                + (f", Δm {dm:+.2f}%" if dm is not None else "") + f", #TP {result.params['trainable']:,} -> "
                f"{r.path}")
            out.append((r, result))
    return out


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(state)}.tmp")  # unique: concurrent writers never collide
    try:
        save_file(state, str(tmp))
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_trained(result_file: str | Path, state_file: str | Path | None = None):
    """Rebuild the model of a result file and load its trained state (``state_file``, default the
    ``.safetensors`` beside the result; a state trained elsewhere must hold the same tensor names).

    Returns:
        ``(model in eval mode, RunResult)``.

    Raises:
        MtbenchError: missing result or checkpoint file, or a checkpoint that does not fit the model.
    """
    from safetensors.torch import load_file

    from mtbench.config import MethodSpec, option_text

    if not str(result_file).strip():
        raise MtbenchError("--result is empty; give a result file (results/{dataset}/{method}/{key}/seed{S}.json)")
    path = Path(result_file)
    if path.is_dir():
        raise MtbenchError(f"--result {str(path)!r} is a directory; give one of its seed{{S}}.json files")
    if not path.is_file():
        raise MtbenchError(f"result file not found: {str(path)!r}")
    result = read_result(path)
    if state_file is not None and not str(state_file).strip():
        raise MtbenchError("--state is empty; give a trained state file (.safetensors)")
    ckpt = Path(state_file) if state_file is not None else checkpoint_path(path)
    if state_file is not None and ckpt.is_dir():
        raise MtbenchError(f"--state {str(ckpt)!r} is a directory; give a trained state file (.safetensors)")
    if state_file is not None and not ckpt.is_file():
        raise MtbenchError(f"state file not found: {str(ckpt)!r}")
    if not ckpt.is_file():
        raise MtbenchError(f"no trained state beside {str(path)!r} (expected {ckpt.name}); rerun with --existing "
                           "overwrite, or pass --state PATH")
    recorded = dict(result.run.options)
    inert = resolve(result.run.method)[0].config_cls.from_options(recorded).inert_options()  # no effect: left out
    rm = resolve_spec(MethodSpec(result.run.method, {k: option_text(v) for k, v in recorded.items() if k not in inert}))
    init = result.run.init
    torch.manual_seed(result.run.seed)  # a random-init backbone is rebuilt exactly as run_one built it
    backbone = create_backbone(result.run.backbone, pretrained=(init == "pretrained"),
                               weights=None if init in ("pretrained", "random") else init)
    model = build_model(rm, backbone, resolve_tasks(result.run.dataset, result.run.tasks), decoder=result.run.decoder)
    try:
        state = load_file(str(ckpt))
    except Exception as e:
        raise MtbenchError(f"unreadable state file {str(ckpt)!r}: {str(e).splitlines()[0]}") from None
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise MtbenchError(f"checkpoint {str(ckpt)!r} lacks {len(missing)} trained tensors, e.g. {missing[0]!r}")
    own = model.state_dict()
    if wrong := [n for n, t in state.items() if n in own and tuple(t.shape) != tuple(own[n].shape)]:
        n = wrong[0]
        raise MtbenchError(f"checkpoint {str(ckpt)!r} does not fit {result.run.label}: {n!r} is "
                           f"{list(state[n].shape)}, the model's is {list(own[n].shape)} ({len(wrong)} such tensors; "
                           "a state of another method or option?)")
    model.load_state_dict(state, strict=False)
    return model.eval(), result


def default_command() -> str:
    return " ".join(["mtbench"] + sys.argv[1:]) if sys.argv else "mtbench"


__all__ = ["RunRequest", "plan", "run_one", "execute", "build_datasets", "evaluation_protocol", "EVAL_RESOLUTIONS",
           "resolve_device", "default_command",
           "load_trained", "save_checkpoint"]
