"""Training and evaluation: one recipe for every method.

``fit`` trains a :class:`mtbench.model.MultiTaskModel` with AdamW (no weight decay on 1-D parameters), a linear
warm-up then cosine learning-rate schedule per iteration (timm's ``CosineLRScheduler`` as in MTLoRA's official
``lr_scheduler.py``), gradient clipping at 5.0 and mixed precision only on CUDA. After every ``eval_every`` epochs it
evaluates on the validation split and keeps the best state (checkpoint selection on validation, never on test):
the best validation Δm against the dataset's single-task references when they exist, otherwise the lowest weighted
validation loss. ``evaluate`` computes whole-split metrics.

Recipes: :data:`RECIPES` gives the per-dataset defaults. The papers' setting follows MTLoRA's official recipe
(``config.py`` defaults, README): 300 epochs, batch 32, base LR 5e-4 linearly scaled by batch/512, warm-up 20 epochs,
weight decay 0.05.
"""

from __future__ import annotations

import copy
import math
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

    def validate(self) -> None:
        if self.epochs < 1:
            raise MtbenchError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise MtbenchError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise MtbenchError(f"learning rate must be > 0, got {self.lr}")


#: Default recipe per dataset. Embedded: sized so that the main job runs in minutes on 2 CPU cores.
RECIPES = {
    "synthetic": TrainConfig(),
    "pascal_context": TrainConfig(epochs=300, batch_size=32, lr=5e-4 * 32 / 512, min_lr=5e-6 * 32 / 512,
                                  warmup_epochs=20, eval_every=5, num_workers=4),
    "nyud": TrainConfig(epochs=300, batch_size=32, lr=5e-4 * 32 / 512, min_lr=5e-6 * 32 / 512,
                        warmup_epochs=20, eval_every=5, num_workers=4),
}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Raises:
        MtbenchError: unknown name, or ``cuda`` asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MtbenchError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
        return torch.device(name)
    raise MtbenchError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=g,
                      drop_last=False, pin_memory=torch.cuda.is_available())


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on 1-D ones (MTLoRA's ``optimizer.py`` rule)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    if not decay and not no_decay:
        raise MtbenchError("the model has no trainable parameters")
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, tasks: list[TaskSpec], device: torch.device,
             amp: bool = False) -> tuple[dict[str, dict[str, float]], float]:
    """Whole-split metrics and mean weighted loss.

    Returns:
        ``({task: {metric: value}}, mean weighted loss per batch)``.
    """
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
            loss, _ = criterion(preds, batch)
            total += float(loss)
            batches += 1
            metrics.update(preds, batch)
    return metrics.compute(), total / max(batches, 1)


@dataclass
class FitResult:
    """What :func:`fit` returns. ``state`` is the best (selected) model state, already loaded into the model."""

    best_epoch: int
    selection: str
    history: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    images_per_s: float = 0.0
    state: dict | None = None


def _selection_score(val_metrics, val_loss, tasks, references) -> tuple[float, str]:
    """Higher is better."""
    if references and all(t.name in references for t in tasks):
        prim = primary_metrics(val_metrics, tasks)
        if all(math.isfinite(v) for v in prim.values()):
            return delta_m(prim, references, primary_higher_is_better(tasks)), "val_delta_m"
    return -val_loss, "val_loss"


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

    Returns:
        :class:`FitResult`.
    """
    cfg.validate()
    model.to(device)
    criterion = MultiTaskLoss(tasks)
    loader = make_loader(train_set, cfg.batch_size, True, cfg.num_workers, seed)
    val_loader = make_loader(val_set, cfg.batch_size, False, cfg.num_workers, seed)
    steps_per_epoch = len(loader) if not cfg.max_train_batches else min(len(loader), cfg.max_train_batches)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(model, cfg)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))

    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    trainable = [p for p in model.parameters() if p.requires_grad]
    best_score, best_epoch, best_state, selection = -math.inf, -1, None, "val_loss"
    history: list[dict] = []
    step, images, t_train = 0, 0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        running, seen = 0.0, 0
        for b, batch in enumerate(loader):
            if cfg.max_train_batches and b >= cfg.max_train_batches:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            batch = move_batch(batch, device)
            with torch.autocast(device.type, enabled=use_amp):
                preds, aux = model(batch["image"], return_aux=True)
            loss, _ = criterion({k: v.float() for k, v in preds.items()}, batch)
            if aux:  # auxiliary losses of the encoder hooks / interaction stage, weights recorded in the result
                weights = getattr(model, "aux_loss_weights", {})
                loss = loss + sum(weights.get(k, 1.0) * v.float() for k, v in aux.items())
            if not torch.isfinite(loss.detach()):
                raise MtbenchError(f"training diverged: loss is {float(loss.detach())} at epoch {epoch}, step {step}; "
                                   "lower the learning rate (--lr)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            n = batch["image"].shape[0]
            loss_value = float(loss.detach())
            step += 1
            images += n
            running += loss_value * n
            seen += n
            if on_step is not None:
                elapsed = t_train + time.perf_counter() - t0
                on_step(step, total_steps, loss_value, images / max(elapsed, 1e-9))
        t_train += time.perf_counter() - t0
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            val_metrics, val_loss = evaluate(model, val_loader, tasks, device, cfg.amp)
            score, selection = _selection_score(val_metrics, val_loss, tasks, references)
            row = {"epoch": epoch, "train_loss": running / max(seen, 1), "val_loss": val_loss,
                   "val_score": score, "val": val_metrics}
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            if score > best_score:
                best_score, best_epoch = score, epoch
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    assert best_state is not None
    model.load_state_dict(best_state)
    return FitResult(best_epoch, selection, history, t_train, images / max(t_train, 1e-9), best_state)


def recipe_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
