"""Training and evaluation: one recipe for every method.

``fit`` trains a :class:`mtbench.model.MultiTaskModel` with AdamW (no weight decay on 1-D parameters; timm's
``param_groups_weight_decay``), a linear warm-up then cosine learning-rate schedule per iteration (timm's
``CosineLRScheduler`` as in MTLoRA's official ``lr_scheduler.py``), gradient clipping at 5.0 and mixed precision only on CUDA. After every ``eval_every`` epochs it
evaluates on the validation split and keeps the best state (checkpoint selection on validation, never on test):
the best validation Δm against the dataset's single-task references when they exist, otherwise the lowest weighted
validation loss. ``evaluate`` computes whole-split metrics.

Recipes: every dataset's named presets (``embedded``, ``paper``) live in its spec
(:mod:`mtbench.datasets`, :func:`mtbench.datasets.resolve_recipe`). The papers' preset follows MTLoRA's official
recipe (``config.py`` defaults, README): 300 epochs, batch 32, base LR 5e-4 linearly scaled by batch/512, warm-up 20
epochs, weight decay 0.05.

Data errors: a sample that cannot be read (missing or corrupted file, wrong label size) reaches the training loop as
one :class:`MtbenchError` naming the file and the sample index, also from DataLoader worker processes
(:func:`make_loader` wraps the dataset in :class:`mtbench.data.SafeDataset`).
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtbench.errors import MtbenchError
from mtbench.losses import MultiTaskLoss
from mtbench.metrics import MultiTaskMetrics, delta_m, primary_higher_is_better, primary_metrics
from mtbench.tasks import TaskSpec


@dataclass
class TrainConfig:
    """Training recipe. All fields are recorded in every result file.

    Attributes:
        epochs: passes over the training split.
        batch_size: images per step.
        lr: peak learning rate (after warm-up).
        min_lr: final learning rate of the cosine schedule.
        warmup_epochs: linear warm-up length (fractional epochs allowed).
        weight_decay: AdamW decoupled weight decay (not applied to 1-D parameters: biases, norms, gates).
        grad_clip: max global gradient norm (0 disables).
        eval_every: validate every N epochs (and always after the last).
        num_workers: DataLoader workers.
        amp: mixed precision; only ever used on CUDA.
        max_train_batches: stop each epoch after this many batches (0 = no limit; for smoke tests).
        no_decay_position_tables: also exempt Swin's relative-position bias tables from weight decay (the papers'
            preset; Swin's ``no_weight_decay_keywords``). 1-D parameters (norms, biases) are always exempt.
        augment: training-split augmentation the runner builds the dataset with: ``flip`` (random horizontal flip)
            or ``paper`` (flip, then ScaleNRotate with the dataset's ranges; :mod:`mtbench.data.transforms`).
        pin_memory: page-locked host batches (only takes effect on CUDA).
        persistent_workers: keep DataLoader workers alive between epochs (only with ``num_workers > 0``).
        prefetch_factor: batches each worker loads ahead (None: torch's default; only with ``num_workers > 0``).
    """

    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    grad_clip: float = 5.0
    eval_every: int = 1
    num_workers: int = 0
    amp: bool = True
    max_train_batches: int = 0
    no_decay_position_tables: bool = False
    augment: str = "flip"
    pin_memory: bool = True
    persistent_workers: bool = False
    prefetch_factor: int | None = None

    def validate(self) -> None:
        if self.augment not in ("flip", "paper"):
            raise MtbenchError(f"unknown augment {self.augment!r}; valid: flip, paper")
        if self.epochs < 1:
            raise MtbenchError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise MtbenchError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 < self.lr < math.inf:
            raise MtbenchError(f"learning rate must be a finite number > 0, got {self.lr}")
        if self.max_train_batches < 0:
            raise MtbenchError(f"max train batches must be >= 0 (0 = no limit), got {self.max_train_batches}")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Raises:
        MtbenchError: unknown name (``cuda:N`` needs a GPU index N), ``cuda`` asked for where there is none, or a
            GPU index beyond the machine's devices.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise MtbenchError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
        index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise MtbenchError(f"device {name!r} requested but this machine has {count} CUDA device(s): "
                               f"{', '.join(f'cuda:{i}' for i in range(count))}")
        return torch.device(name)
    raise MtbenchError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N (N a GPU index)")


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors of a batch on ``device``.

    Raises:
        MtbenchError: the batch carries a data error from :class:`mtbench.data.SafeDataset` (one line naming the
            file and the sample index).
    """
    from mtbench.data import raise_batch_error

    raise_batch_error(batch)
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                cfg: TrainConfig | None = None, sampler=None, generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader over ``dataset`` wrapped in :class:`mtbench.data.SafeDataset` (data errors become one line).

    ``cfg`` supplies ``pin_memory`` (used only when CUDA is available), ``persistent_workers`` and
    ``prefetch_factor`` (used only with ``num_workers > 0``). ``num_workers`` is capped at the number of CPU cores.
    ``sampler`` (e.g. a ``DistributedSampler``) replaces shuffling; ``generator`` (default: seeded with ``seed``)
    draws the shuffle order, so a caller that keeps it can checkpoint and restore the data order.
    """
    import os

    from mtbench.data import SafeDataset, safe_collate

    num_workers = min(num_workers, os.cpu_count() or 1)
    g = generator
    if g is None:
        g = torch.Generator()
        g.manual_seed(seed)
    kw = {}
    if num_workers > 0 and cfg is not None:
        kw["persistent_workers"] = cfg.persistent_workers
        if cfg.prefetch_factor is not None:
            kw["prefetch_factor"] = cfg.prefetch_factor
    pin = torch.cuda.is_available() and (cfg.pin_memory if cfg is not None else True)
    return DataLoader(SafeDataset(dataset), batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=num_workers, generator=g, drop_last=False, pin_memory=pin, collate_fn=safe_collate, **kw)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters, grouped by timm's ``param_groups_weight_decay``: no weight decay on 1-D
    parameters and biases (MTLoRA's ``optimizer.py`` rule) and, with ``cfg.no_decay_position_tables``, none on the
    relative-position bias tables (role ``rel_pos`` of :meth:`mtbench.model.MultiTaskModel.param_category`; Swin's
    ``no_weight_decay_keywords``).

    Raises:
        MtbenchError: the model has no trainable parameter.
    """
    from timm.optim import param_groups_weight_decay

    category = getattr(model, "param_category", None) if cfg.no_decay_position_tables else None
    tables = () if category is None else tuple(
        n for n, p in model.named_parameters() if p.requires_grad and category(p)[1] == "rel_pos")
    groups = param_groups_weight_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=tables)
    if not groups:
        raise MtbenchError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, lr_min: float, warmup_steps: int, total_steps: int):
    """timm's ``CosineLRScheduler`` per optimiser step: linear warm-up from 0 over ``warmup_steps`` to the
    optimiser's learning rate, then one cosine decay to ``lr_min`` over the remaining steps (MTLoRA's
    ``lr_scheduler.py`` with ``warmup_prefix``). Drive it with :func:`schedule_step`."""
    import logging

    from timm.scheduler import CosineLRScheduler

    log = logging.getLogger("timm.scheduler.cosine_lr")
    level = log.level
    log.setLevel(logging.ERROR)  # its warning about a 1-step cosine is noise for smoke runs
    try:
        return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=lr_min,
                                 warmup_t=warmup_steps, warmup_lr_init=0.0, warmup_prefix=True, cycle_limit=1,
                                 t_in_epochs=False)
    finally:
        log.setLevel(level)


def schedule_step(scheduler, step: int) -> None:
    """Set the learning rate of optimiser step ``step`` (0-based): ``lr·(step+1)/warmup`` during warm-up, reaching
    the peak on its last step, then ``lr_min + ½(lr − lr_min)(1 + cos(π·(step − warmup)/(total − warmup)))``, which
    starts at the peak. timm's index is ``step + 1`` during warm-up and ``step`` afterwards."""
    scheduler.step_update(step + 1 if step < scheduler.warmup_t else step)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, tasks: list[TaskSpec], device: torch.device,
             amp: bool = False, match_target_size: bool = False) -> tuple[dict[str, dict[str, float]], float]:
    """Whole-split metrics and mean weighted loss.

    Args:
        match_target_size: bring each prediction ``[B,C,S,S]`` to its target's ``H,W`` first (nearest for
            segmentation logits, bilinear otherwise; :attr:`mtbench.tasks.TaskKind.upsample`): the evaluation at
            the original label resolution (then batches hold one image each).

    Under ``torchrun`` the loader holds this process's shard (:func:`eval_loader`); the metric states and the loss
    sums of all processes are summed in one reduction, so every process returns the whole split's numbers.

    Returns:
        ``({task: {metric: value}}, mean weighted loss per batch)``.
    """
    from mtbench import distributed
    from mtbench.lora import merged_lora

    model.eval()
    metrics = MultiTaskMetrics(tasks)
    criterion = MultiTaskLoss(tasks)
    total, batches = 0.0, 0
    with merged_lora(model):  # shared LoRA folded into the frozen weights; restored exactly afterwards
        for batch in loader:
            batch = move_batch(batch, device)
            with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
                preds = model(batch["image"])
            preds = {k: v.float() for k, v in preds.items()}
            if match_target_size:
                preds = resize_to_targets(preds, batch)
            loss, _ = criterion(preds, batch)
            total += float(loss)
            batches += 1
            metrics.update(preds, batch)
    if distributed.is_distributed():
        total, batches = distributed.reduce_metric_states(metrics, [total, float(batches)])
    return metrics.compute(), total / max(batches, 1)


def resize_to_targets(preds: dict[str, torch.Tensor], batch: dict) -> dict[str, torch.Tensor]:
    """Predictions ``[B,C,S,S]`` resized to their targets' ``H,W`` (``nearest`` or ``bilinear`` per task spec,
    ``align_corners=False``); predictions already at the target size are returned unchanged."""
    from mtbench.tasks import task_kind

    out = {}
    for k, v in preds.items():
        size = tuple(batch[k].shape[-2:]) if k in batch else tuple(v.shape[-2:])
        if size != tuple(v.shape[-2:]):
            mode = task_kind(k).upsample
            v = torch.nn.functional.interpolate(v, size=size, mode=mode,
                                                **({"align_corners": False} if mode == "bilinear" else {}))
        out[k] = v
    return out


def eval_loader(dataset: Dataset, cfg: TrainConfig, batch_size: int | None = None) -> DataLoader:
    """The loader of an evaluation split (this process's shard under ``torchrun``); ``batch_size`` defaults to the
    recipe's."""
    from mtbench import distributed

    return make_loader(distributed.shard(dataset), batch_size or cfg.batch_size, False, cfg.num_workers, 0, cfg)


@dataclass
class FitResult:
    """What :func:`fit` returns. ``state`` is the best (selected) model state, already loaded into the model."""

    best_epoch: int
    selection: str
    history: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    images_per_s: float = 0.0
    state: dict | None = None
    #: one ``{"epoch", "batch", "step", "at"}`` per resume from a checkpoint (history rows carry ``session``: the
    #: number of resumes before they were computed)
    resumes: list[dict] = field(default_factory=list)


def _selection_score(val_metrics, val_loss, tasks, references) -> tuple[float, str]:
    """Higher is better."""
    if references and all(t.name in references for t in tasks):
        prim = primary_metrics(val_metrics, tasks)
        if all(math.isfinite(v) for v in prim.values()):
            return delta_m(prim, references, primary_higher_is_better(tasks)), "val_delta_m"
    return -val_loss, "val_loss"


def saved_state_names(model: nn.Module) -> list[str]:
    """State-dict keys a checkpoint or trained state stores: trainable parameters and persistent buffers (the
    frozen backbone is rebuilt from its recorded initialisation)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return [k for k in model.state_dict() if k in trainable or k in buffers]


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    tasks: list[TaskSpec],
    cfg: TrainConfig,
    device: torch.device,
    *,
    seed: int = 0,
    references: dict[str, float] | None = None,
    on_step: Callable[[int, int, float, float], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint=None,
    stop=None,
) -> FitResult:
    """Train ``model`` and load the validation-selected state into it.

    Args:
        model: a built method model (trainability already applied).
        train_set, val_set: datasets in :data:`mtbench.tasks.SAMPLE_FORMAT`.
        tasks: task specs (loss weights inside).
        cfg: the recipe.
        device: where to train.
        seed: seeds the data order.
        references: single-task references ``{task: primary metric}`` for Δm-based selection, or None.
        on_step: ``callback(step, total_steps, loss, images_per_s)`` after each optimiser step (progress bars).
        on_epoch: ``callback(history_row)`` after each validation.
        checkpoint: a :class:`mtbench.checkpoint.RunCheckpoint`, or None. When it holds a checkpoint, training
            continues from it (model, best state, optimiser, scaler, scheduler, RNG states, position in the epoch,
            history); a checkpoint is written after every evaluation, every ``checkpoint.every_s`` seconds of
            training and when ``stop`` is requested.
        stop: an object with a boolean ``requested`` (:class:`mtbench.checkpoint.StopRequest`), polled after each
            step and each evaluation.

    Under ``torchrun`` the model is wrapped in ``DistributedDataParallel``, the training split is drawn through a
    ``DistributedSampler`` with ``cfg.batch_size / world size`` images per process, and only rank 0 writes
    checkpoints.

    Returns:
        :class:`FitResult`.

    Raises:
        MtbenchError: the loss diverged, or the batch size does not split across the processes.
        mtbench.checkpoint.Interrupted: a stop was requested; a checkpoint has been written.
    """
    from mtbench import distributed
    from mtbench.checkpoint import Interrupted, capture_rng, restore_rng

    cfg.validate()
    model.to(device)
    criterion = MultiTaskLoss(tasks)
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise MtbenchError(f"batch size {cfg.batch_size} does not split across {world} processes")
    g = torch.Generator()
    g.manual_seed(seed)
    sampler = None
    if world > 1:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(train_set, shuffle=True, seed=seed, drop_last=False)
    loader = make_loader(train_set, cfg.batch_size // world, True, cfg.num_workers, seed, cfg, sampler=sampler,
                         generator=g)
    val_loader = eval_loader(val_set, cfg)
    steps_per_epoch = len(loader) if not cfg.max_train_batches else min(len(loader), cfg.max_train_batches)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(model, cfg)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = build_scheduler(optimizer, cfg.min_lr, warmup, total_steps)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = saved_state_names(model)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    # the position and everything a checkpoint restores
    st = {"epoch": 1, "batch": 0, "step": 0, "images": 0, "t_train": 0.0, "running": 0.0, "seen": 0,
          "best_score": -math.inf, "best_epoch": -1, "selection": "val_loss", "history": [],
          "loader_rng": g.get_state(), "resumes": []}
    best_state: dict | None = None
    resumed_from = None
    loaded = checkpoint.load() if checkpoint is not None else None
    if loaded is not None:
        tensors, saved = loaded
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                              strict=False)
        best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        if best:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best_state.update(best)
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        scheduler.load_state_dict(saved["scheduler"])
        st.update(saved["progress"])
        g.set_state(st.pop("loader_rng_now"))
        restore_rng(saved["rng"])
        resumed_from = {"epoch": st["epoch"], "batch": st["batch"], "step": st["step"],
                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        st["resumes"] = list(st.get("resumes", [])) + [resumed_from]

    def save(reason: str) -> None:
        if checkpoint is None or not distributed.is_main():
            return
        sd = model.state_dict()
        tensors = {f"model.{k}": sd[k] for k in names}
        if best_state is not None:
            tensors.update({f"best.{k}": best_state[k] for k in names})
        progress = dict(st, loader_rng_now=g.get_state())
        checkpoint.save(tensors, {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                  "scheduler": scheduler.state_dict(), "progress": progress, "rng": capture_rng(),
                                  "reason": reason, "epoch": st["epoch"], "batch": st["batch"],
                                  "step": st["step"]})

    def check_stop(where: str) -> None:
        if distributed.any_true(bool(stop is not None and stop.requested)):
            save("stop")
            raise Interrupted(f"stopped {where}; checkpoint written at epoch {st['epoch']}, batch {st['batch']}"
                              f"/{steps_per_epoch}")

    while st["epoch"] <= cfg.epochs:
        epoch = st["epoch"]
        if st["batch"] < steps_per_epoch:
            net.train()
            if st["batch"] == 0:
                st["loader_rng"] = g.get_state()
                st["running"], st["seen"] = 0.0, 0
            else:  # resuming inside the epoch: replay its order, skip the done batches, then the saved RNG state
                g.set_state(st["loader_rng"])
                rng_now = capture_rng()
            if sampler is not None:
                sampler.set_epoch(epoch)
            it = iter(loader)
            if st["batch"]:
                for _ in range(st["batch"]):
                    next(it)
                restore_rng(rng_now)
            t0 = time.perf_counter()
            t_base = st["t_train"]
            for batch in it:
                if st["batch"] >= steps_per_epoch:
                    break
                step = st["step"]
                schedule_step(scheduler, step)
                batch = move_batch(batch, device)
                with torch.autocast(device.type, enabled=use_amp):
                    preds, aux = net(batch["image"], return_aux=True)
                loss, _ = criterion({k: v.float() for k, v in preds.items()}, batch)
                if aux:  # auxiliary losses of the encoder hooks / interaction stage, weights recorded in the result
                    weights = getattr(model, "aux_loss_weights", {})
                    loss = loss + sum(weights.get(k, 1.0) * v.float() for k, v in aux.items())
                if not torch.isfinite(loss.detach()):
                    raise MtbenchError(f"training diverged: loss is {float(loss.detach())} at epoch {epoch}, step "
                                       f"{step}; lower the learning rate (--lr)")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                n = batch["image"].shape[0] * world
                loss_value = float(loss.detach())
                st["step"] += 1
                st["batch"] += 1
                st["images"] += n
                st["running"] += loss_value * n
                st["seen"] += n
                st["t_train"] = t_base + time.perf_counter() - t0
                if on_step is not None:
                    on_step(st["step"], total_steps, loss_value, st["images"] / max(st["t_train"], 1e-9))
                if st["batch"] < steps_per_epoch:
                    check_stop("during training")
                    if checkpoint is not None and checkpoint.due():
                        save("periodic")
            st["batch"] = steps_per_epoch
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            check_stop("before validation")
            distributed.broadcast_buffers(model)
            val_metrics, val_loss = evaluate(net if world == 1 else model, val_loader, tasks, device, cfg.amp)
            score, st["selection"] = _selection_score(val_metrics, val_loss, tasks, references)
            if not math.isfinite(score):
                raise MtbenchError(f"training diverged: validation loss is {val_loss} at epoch {epoch}; lower the "
                                   "learning rate (--lr)")
            row = {"epoch": epoch, "train_loss": st["running"] / max(st["seen"], 1), "val_loss": val_loss,
                   "val_score": score, "val": val_metrics, "session": len(st["resumes"])}
            st["history"].append(row)
            if on_epoch is not None:
                on_epoch(row)
            if score > st["best_score"]:
                st["best_score"], st["best_epoch"] = score, epoch
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            st["epoch"], st["batch"] = epoch + 1, 0
            save("evaluation")
        else:
            st["epoch"], st["batch"] = epoch + 1, 0
    assert best_state is not None
    model.load_state_dict(best_state)
    return FitResult(st["best_epoch"], st["selection"], st["history"], st["t_train"],
                     st["images"] / max(st["t_train"], 1e-9), best_state, st["resumes"])


def recipe_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
