"""Data-parallel runs under ``torchrun``: process-group set-up, data sharding, and metric states reduced in one call.

``torchrun --nproc_per_node K -m mtbench run ...`` starts K processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
set; :func:`init_from_env` joins them into a process group (NCCL on CUDA, gloo on CPU) and pins each process to its
GPU. Training uses :class:`torch.nn.parallel.DistributedDataParallel` with a
:class:`torch.utils.data.DistributedSampler` (the recipe's batch size is the global batch, split evenly across the
processes). Evaluation shards a split without padding (process ``r`` takes images ``r, r+K, ...``), accumulates the
usual whole-split metric states per process, and sums them across processes with **one** ``all_reduce``
(:func:`reduce_metric_states`), so the metrics equal those of one process (integer states exactly; float sums up to
summation order). Only rank 0 writes files.

Every :class:`mtbench.metrics.TaskMetric` keeps additive state: what its ``reset`` assigns (tensors, numbers, lists
of numbers) is a sum over images, so the sum over processes is the state of the whole split. A state of another kind
raises ``TypeError`` here rather than being reduced wrongly.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset


def env_world_size() -> int:
    """``$WORLD_SIZE`` (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True in the process that writes files (rank 0, or the only process)."""
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; returns the device this process uses.

    On CUDA each process takes ``cuda:$LOCAL_RANK`` and the NCCL backend; on CPU the gloo backend.
    """
    if env_world_size() <= 1 or is_distributed():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_dt.timedelta(minutes=30))
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(dataset: Dataset) -> Dataset:
    """This process's share of an evaluation split, without padding: images ``rank, rank + K, ...``."""
    if not is_distributed():
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world_size()))  # type: ignore[arg-type]


def _state_names(metric: Any) -> list[str]:
    """The attributes a metric's ``reset`` assigns (its state), found by running ``reset`` on a recording proxy."""
    assigned: list[str] = []
    values = dict(vars(metric))
    cls = type(metric)

    class _Recorder:
        def __getattr__(self, name):
            if name in values:
                return values[name]
            attr = getattr(cls, name)
            return attr.__get__(self, cls) if hasattr(attr, "__get__") else attr

        def __setattr__(self, name, value):
            assigned.append(name)
            values[name] = value

    cls.reset(_Recorder())
    return list(dict.fromkeys(assigned))


def _flatten(value: Any, name: str) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.detach().reshape(-1).to(torch.float64).cpu()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor([float(value)], dtype=torch.float64)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return torch.tensor([float(v) for v in value], dtype=torch.float64)
    raise TypeError(f"metric state {name!r} of type {type(value).__name__} is not an additive number/tensor state")


def _unflatten(old: Any, flat: torch.Tensor) -> Any:
    if torch.is_tensor(old):
        if old.dtype.is_floating_point:
            return flat.to(old.dtype).reshape(old.shape)
        return flat.round().to(old.dtype).reshape(old.shape)
    if isinstance(old, int):
        return int(round(float(flat[0])))
    if isinstance(old, float):
        return float(flat[0])
    return type(old)(int(round(float(v))) if isinstance(o, int) else float(v) for o, v in zip(old, flat.tolist()))


def reduce_metric_states(metrics, extra: list[float] | None = None, all_reduce=None) -> list[float]:
    """Sum every task metric's state (and the numbers in ``extra``) across processes in one ``all_reduce``.

    Args:
        metrics: a :class:`mtbench.metrics.MultiTaskMetrics`; its states are replaced by the sums, in place.
        extra: further additive numbers (e.g. loss sum and batch count); their sums are returned.
        all_reduce: the reduction ``f(tensor) -> None`` (in place); default ``torch.distributed.all_reduce`` (SUM).
            Tests pass a fake to check the packing without processes.

    Integer counts travel as float64, exact below 2**53.

    Raises:
        TypeError: a metric state that is not a number, a list of numbers or a tensor.
    """
    extra = list(extra or [])
    layout, parts = [], []
    for task, metric in metrics.metrics.items():
        for name in _state_names(metric):
            flat = _flatten(getattr(metric, name), f"{task}.{name}")
            layout.append((metric, name, flat.numel()))
            parts.append(flat)
    parts.append(torch.tensor(extra, dtype=torch.float64))
    packed = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    (all_reduce or _all_reduce_sum)(packed)
    offset = 0
    for metric, name, n in layout:
        setattr(metric, name, _unflatten(getattr(metric, name), packed[offset:offset + n]))
        offset += n
    return packed[offset:].tolist()


def _all_reduce_sum(t: torch.Tensor, op=None) -> None:
    """In-place all-reduce of a CPU tensor (through the GPU under NCCL, which reduces CUDA tensors only)."""
    op = dist.ReduceOp.SUM if op is None else op
    if dist.get_backend() == "nccl":
        g = t.cuda()
        dist.all_reduce(g, op=op)
        t.copy_(g.cpu())
    else:
        dist.all_reduce(t, op=op)


def any_true(flag: bool) -> bool:
    """In a process group: True when any process says True (a stop request seen by one stops all)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    _all_reduce_sum(t, dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every process. DDP broadcasts them at the start of
    each training forward, so after the last step every process holds statistics updated by its own batch;
    evaluation and the saved state use rank 0's."""
    if not is_distributed():
        return
    for b in model.buffers():
        if dist.get_backend() == "nccl" or b.device.type == "cpu":
            dist.broadcast(b.data, 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
