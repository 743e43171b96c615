"""Measurement protocol shared by every command: trainable-parameter counts (#TP) and their breakdown.

No method counts itself: every number in a result file, a table or ``mtbench params`` comes from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from torch import nn

#: The counting rule, stated in every result file and printed by ``mtbench params``.
COUNTING_RULE = (
    "#TP = number of parameters with requires_grad=True after the method's structural freezing: unfrozen backbone "
    "parts + modules the method adds + all task decoders (including their 1x1 channel reducers). Buffers (BatchNorm "
    "statistics, relative-position indices) are not parameters; a parameter shared by several tasks counts once; "
    "the backbone's final LayerNorm and classifier are not part of the model."
)


@dataclass
class ParamBreakdown:
    """Parameter counts of a built model.

    Attributes:
        trainable: #TP, the sum of the three trainable groups below.
        total: all parameters of the model.
        backbone_frozen: frozen backbone parameters.
        backbone_unfrozen: trainable backbone parameters by structural role (``patch_embed``, ``norm``, ``rel_pos``,
            ``patch_merging``, ``bias``, ``weight``).
        method: parameters the method adds (LoRA, prompts, adapters, filters, gates, ...).
        decoders: task decoders.
        rule: :data:`COUNTING_RULE`.
    """

    trainable: int
    total: int
    backbone_frozen: int
    backbone_unfrozen: dict[str, int] = field(default_factory=dict)
    method: int = 0
    decoders: int = 0
    rule: str = COUNTING_RULE

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module) -> ParamBreakdown:
    """Count #TP and its breakdown for a :class:`mtbench.model.MultiTaskModel`.

    Raises:
        MtbenchError: a parameter of no known category (propagated from the model).
    """
    frozen = 0
    unfrozen: dict[str, int] = {}
    method = decoders = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        cat, role = model.param_category(p)
        if cat == "backbone":
            if p.requires_grad:
                unfrozen[role] = unfrozen.get(role, 0) + n
            else:
                frozen += n
        elif cat == "method":
            method += n if p.requires_grad else 0
        else:
            decoders += n if p.requires_grad else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == method + decoders + sum(unfrozen.values()), "breakdown does not add up"
    return ParamBreakdown(trainable, total, frozen, dict(sorted(unfrozen.items())), method, decoders)


# ====================================================================================================== cost
# FLOPs (fvcore, cross-checked against torch's FlopCounterMode), peak memory, latency. Every cost number in a profile
# file, a table or a figure comes from the functions below; no method measures itself.

import json as _json
import math as _math
import os as _os
import platform as _platform
import re as _re
import time as _time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from mtbench.cpu import APPLIED as CPU_SETTINGS

#: Relative difference above which fvcore and torch's counter are said to disagree (and the operators are named).
FLOP_TOLERANCE = 0.02

#: Operator families used to compare fvcore's and torch's per-operator counts (fvcore name / torch aten name).
_OP_FAMILY = {
    "linear": "matmul", "addmm": "matmul", "mm": "matmul", "matmul": "matmul", "bmm": "matmul", "baddbmm": "matmul",
    "einsum": "matmul", "conv": "conv", "convolution": "conv", "_convolution": "conv", "conv2d": "conv",
    "scaled_dot_product_attention": "attention", "_scaled_dot_product_flash_attention_for_cpu": "attention",
    "_scaled_dot_product_flash_attention": "attention", "_scaled_dot_product_efficient_attention": "attention",
    "_scaled_dot_product_cudnn_attention": "attention",
}


def _family(op: str) -> str:
    name = op.split("::")[-1].split(".")[-1] if "::" in op else op.split(".")[1] if op.startswith("aten.") else op
    return _OP_FAMILY.get(name, name)


def sdpa_macs(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """Multiply-accumulates of ``scaled_dot_product_attention(q, k, v)``: ``Q K^T`` plus ``softmax(.) V``.

    Args:
        q_shape: ``[..., L, E]``; k_shape: ``[..., S, E]``; v_shape: ``[..., S, Ev]`` (leading dims broadcast).

    Returns:
        ``prod(batch dims) * L * S * (E + Ev)``. The softmax, scaling and mask addition are elementwise and not
        counted (as fvcore counts no elementwise operator).
    """
    *batch, L, E = q_shape
    S, Ev = k_shape[-2], v_shape[-1]
    return int(_math.prod(batch) * L * S * (E + Ev))


def _fvcore_nn():
    """``fvcore.nn``, imported without the ``torch.jit.script`` FutureWarning that fvcore 0.1.5's focal-loss module
    (which mtbench does not use) raises at import under recent torch."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import fvcore.nn
    return fvcore.nn


def _fvcore_sdpa_handle(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    return sdpa_macs(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(inputs[2]))


@dataclass
class FlopCount:
    """Forward FLOPs of one input, by two counters.

    Attributes:
        macs: fvcore's total, in multiply-accumulates (GMACs = macs / 1e9; GFLOPs = 2 x GMACs).
        by_operator: fvcore's MACs per operator.
        skipped: operators fvcore did not count, with how often each ran (elementwise ops and anything without a
            handle); never dropped silently.
        torch_flops: ``torch.utils.flop_counter.FlopCounterMode`` total, in FLOPs (it counts 2 per MAC).
        torch_by_operator: torch's FLOPs per aten operator.
        mismatch: when ``|2 macs - torch_flops| > FLOP_TOLERANCE * 2 macs``, the operator families responsible,
            each ``{"operator", "fvcore_gflops", "torch_gflops"}``; else empty.
    """

    macs: int
    by_operator: dict[str, int]
    skipped: dict[str, int]
    torch_flops: int
    torch_by_operator: dict[str, int]
    mismatch: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        """GFLOPs = 2 x GMACs (fvcore)."""
        return 2 * self.macs / 1e9

    @property
    def torch_gflops(self) -> float:
        return self.torch_flops / 1e9

    @property
    def rel_diff(self) -> float:
        """``(torch FLOPs - 2 x fvcore MACs) / (2 x fvcore MACs)``."""
        return (self.torch_flops - 2 * self.macs) / max(2 * self.macs, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(gmacs=self.gmacs, gflops=self.gflops, torch_gflops=self.torch_gflops, rel_diff=self.rel_diff)
        return d


class _TupleOutput(nn.Module):
    """Wraps a model whose forward returns ``{task: tensor}`` so that it returns a tuple (fvcore's tracer)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *x):
        out = self.model(*x)
        if isinstance(out, dict):
            return tuple(out[k] for k in sorted(out))
        return out


def _compare(fv_by_op: dict[str, int], torch_by_op: dict[str, int]) -> list[dict[str, Any]]:
    fam_fv: dict[str, float] = {}
    fam_t: dict[str, float] = {}
    for op, macs in fv_by_op.items():
        fam_fv[_family(op)] = fam_fv.get(_family(op), 0) + 2 * macs
    for op, fl in torch_by_op.items():
        fam_t[_family(op)] = fam_t.get(_family(op), 0) + fl
    rows = []
    for fam in sorted(set(fam_fv) | set(fam_t)):
        a, b = fam_fv.get(fam, 0.0), fam_t.get(fam, 0.0)
        if a != b:
            rows.append({"operator": fam, "fvcore_gflops": a / 1e9, "torch_gflops": b / 1e9})
    return sorted(rows, key=lambda r: -abs(r["fvcore_gflops"] - r["torch_gflops"]))


def count_flops(model: nn.Module, inputs: torch.Tensor | tuple, *, train: bool = False) -> FlopCount:
    """Count the forward FLOPs of ``model(*inputs)`` with fvcore and with torch's ``FlopCounterMode``.

    Use ``train=False`` for models whose training-mode forward does not trace (e.g. dropout layers that reshape);
    the MACs of a training-mode forward differ only by elementwise operators, which fvcore does not count.

    fvcore traces the model (``torch.jit``) and counts multiply-accumulates per operator; attention through
    ``aten::scaled_dot_product_attention`` (timm's fused path and :func:`mtbench.swin.window_attention`), which
    fvcore has no handle for, is counted by :func:`sdpa_macs`. torch's counter counts at dispatch (FLOPs = 2 x MACs)
    and is the cross-check: where the two totals differ by more than :data:`FLOP_TOLERANCE`, the operator families
    that differ are listed in :attr:`FlopCount.mismatch` (typically norms and upsampling, which only fvcore counts).

    The model runs once untimed before it is counted, so that weights a method derives from its parameters once
    per evaluation and caches (DiTASK's warped weights) are counted as evaluation uses them: built, not rebuilt.

    Args:
        model: any module; a ``dict`` output is turned into a tuple for tracing.
        inputs: one tensor (e.g. an image ``[1,3,H,W]``) or a tuple of positional inputs.
        train: count in training mode (dropout, BatchNorm batch statistics) instead of eval mode.

    Returns:
        :class:`FlopCount`. The model's mode and ``requires_grad`` flags are restored.

    Source: fvcore ``FlopCountAnalysis`` (facebookresearch/fvcore), torch ``torch.utils.flop_counter``.
    """
    FlopCountAnalysis = _fvcore_nn().FlopCountAnalysis
    from torch.utils.flop_counter import FlopCounterMode

    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.train(train)
    try:
        for p, _ in flags:  # forward only: no autograd graph (torch's module tracker needs none)
            p.requires_grad_(False)
        with torch.no_grad():  # untimed call: what a method derives from its weights once per evaluation
            model(*inputs)     # (DiTASK's warped weights) is ready, as when evaluation runs the model
        fa = FlopCountAnalysis(_TupleOutput(model), inputs)
        fa.set_op_handle(**EXTRA_FLOP_HANDLES)  # attention (sdpa_macs), grid_sample and baddbmm
        fa.unsupported_ops_warnings(False)
        fa.uncalled_modules_warnings(False)
        with torch.no_grad():
            macs = int(fa.total())
            by_op = {k: int(v) for k, v in fa.by_operator().items() if v}
            skipped = {k: int(v) for k, v in sorted(fa.unsupported_ops().items())}
            with FlopCounterMode(display=False) as fc:
                model(*inputs)
        t_by_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items() if v}
        t_total = int(fc.get_total_flops())
    finally:
        for p, rg in flags:
            p.requires_grad_(rg)
        model.train(was_training)
    fc_ = FlopCount(macs, by_op, skipped, t_total, t_by_op)
    if abs(fc_.rel_diff) > FLOP_TOLERANCE:
        fc_.mismatch = _compare(by_op, t_by_op)
    return fc_


def conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: torch's formula (``torch.utils.flop_counter.conv_backward_flop``)
    with the weight gradient of a grouped convolution divided by ``groups``.

    torch counts that weight gradient as a dense convolution of all input with all output channels, ``groups``
    times too many (checked: a 3x3 depthwise conv of 64 channels on 56x56 counts 3.6 MFLOPs forward and 235
    MFLOPs backward, where the input gradient and the weight gradient cost 3.6 MFLOPs each). Its input-gradient
    term already counts groups through the weight's shape. For ``groups = 1`` this is torch's count.
    """
    from torch.utils import flop_counter

    conv_backward_flop = getattr(flop_counter.conv_backward_flop, "__wrapped__", flop_counter.conv_backward_flop)
    total = conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                               output_padding, groups, output_mask, out_shape, **kwargs)
    if groups == 1 or not output_mask[1]:
        return total
    input_part = conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                                    output_padding, groups, [output_mask[0], False, False], out_shape, **kwargs)
    return input_part + (total - input_part) // groups


def count_train_step_flops(forward: Callable[[], torch.Tensor]) -> tuple[int, int, dict[str, int]]:
    """FLOPs of one training step (forward, loss and backward; the optimizer update is elementwise and not
    counted) by torch's ``FlopCounterMode``, with :func:`conv_backward_flops` for grouped convolutions. fvcore
    traces forward graphs only, so this count has no fvcore twin.

    Args:
        forward: runs the forward pass and returns the scalar loss; this function calls ``backward()`` on it.

    Returns:
        ``(total FLOPs, forward FLOPs (loss included), FLOPs per aten operator over the whole step)``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    corrected = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=corrected) as fc:
        loss = forward()
        fwd = int(fc.get_total_flops())
        loss.backward()
    return (int(fc.get_total_flops()), fwd,
            {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items() if v})


# ------------------------------------------------------------------------------------------------------ timing
def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for all queued work on ``device``: ``torch.cuda.synchronize`` on CUDA; on CPU, where
    torch's operators return only when done, a no-op."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def time_once(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Wall time of ``fn()`` in milliseconds, with the device synchronised before the clock starts and before it
    stops (so asynchronous kernels are inside the measurement)."""
    sync()
    t0 = _time.perf_counter()
    fn()
    sync()
    return (_time.perf_counter() - t0) * 1e3


def minor_faults() -> int | None:
    """Minor page faults of this process so far (``getrusage``), or None where the ``resource`` module is missing
    (Windows). On CPU a timed call that faults in fresh pages (a heap still growing) is slower for reasons that
    are not the method's; :func:`profile_methods` records the faults of every timed call beside its time."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class LatencyStats:
    """Summary of timed iterations, in milliseconds: median, 10th and 90th percentile, count, and items/s at the
    median (``items`` = images per call)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    items_per_s: float

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], items: int = 1) -> "LatencyStats":
        """Raises ValueError on an empty sample list."""
        import numpy as np

        if not len(samples_ms):
            raise ValueError("no timing samples")
        a = np.asarray(samples_ms, dtype=float)
        med = float(np.median(a))
        return cls(med, float(np.percentile(a, 10)), float(np.percentile(a, 90)), len(a), items * 1e3 / med)


def ratio_stats(samples: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """Per-round ratios ``samples[i] / reference[i]`` (same round, so machine noise hits both alike):
    ``{"min", "median", "max"}``."""
    import numpy as np

    r = np.asarray(samples, dtype=float) / np.asarray(reference, dtype=float)
    return {"min": float(r.min()), "median": float(np.median(r)), "max": float(r.max())}


# ------------------------------------------------------------------------------------------------------ workloads
def synthetic_targets(tasks, batch: int, size: tuple[int, int], device, generator: torch.Generator | None = None):
    """Random targets in the on-tensor format of :data:`mtbench.tasks.SAMPLE_FORMAT` for each task (keyed by
    ``task.name``; a scaling copy such as ``semseg#2`` takes its kind from the part before ``#``)."""
    H, W = size
    out = {}
    for t in tasks:
        kind = t.name.split("#")[0]
        if kind in ("semseg", "human_parts"):
            out[t.name] = torch.randint(0, t.out_channels, (batch, H, W), generator=generator)
        elif kind in ("sal", "edge"):
            out[t.name] = (torch.rand(batch, 1, H, W, generator=generator) > 0.5).float()
        elif kind == "normals":
            n = torch.randn(batch, 3, H, W, generator=generator)
            out[t.name] = n / n.norm(dim=1, keepdim=True)
        else:
            out[t.name] = torch.rand(batch, 1, H, W, generator=generator) * 5 + 0.5
    return {k: v.to(device) for k, v in out.items()}


def scaled_tasks(dataset: str, n: int):
    """``n`` task specs made of the dataset's default tasks repeated as needed (``semseg``, ..., ``semseg#2``, ...),
    for the task-scaling measurement. Raises MtbenchError for n < 1."""
    from dataclasses import replace as _replace

    from mtbench.errors import MtbenchError
    from mtbench.tasks import resolve_tasks

    if n < 1:
        raise MtbenchError(f"number of tasks must be >= 1, got {n}")
    base = resolve_tasks(dataset)
    return [base[i % len(base)] if i < len(base) else _replace(base[i % len(base)], name=f"{base[i % len(base)].name}#{i // len(base) + 1}")
            for i in range(n)]


class Workload:
    """One method built in a dataset's setting with random inputs: an inference call at batch 1 and a training
    step (forward, the tasks' losses, backward, gradient clipping, AdamW step) at ``batch_size``.

    Built through the registry (:func:`mtbench.registry.build_model`) exactly as ``run`` and ``params`` build it;
    no data and no trained weights (the backbone is randomly initialised, which costs the same).

    Args:
        spec: a ``--methods`` item, e.g. ``"mtlora:r=32"``.
        dataset: ``synthetic | pascal_context | nyud`` (backbone and input size of its setting).
        batch_size: images per training step.
        device: where to run.
        tasks: task specs (default: the dataset's default tasks).
        seed: seed of the random inputs and initialisation.
        activation_checkpoint: :data:`mtbench.encoder.ACTIVATION_CHECKPOINT` mode of the training step.

    Raises:
        MtbenchError: unknown method, option, dataset or activation-checkpoint mode.
    """

    def __init__(self, spec: str, dataset: str, batch_size: int, device, tasks=None, seed: int = 0,
                 activation_checkpoint: str = "none"):
        from mtbench.config import parse_method_specs
        from mtbench.errors import MtbenchError
        from mtbench.losses import build_loss
        from mtbench.registry import build_model, resolve_spec
        from mtbench.datasets import get_dataset
        from mtbench.swin import create_backbone
        from mtbench.tasks import TaskSpec, resolve_tasks
        from mtbench.datasets import resolve_recipe
        from mtbench.encoder import check_activation_checkpoint
        from mtbench.train import build_optimizer

        backbone_name = get_dataset(dataset).backbone  # MtbenchError naming the registered datasets
        specs = parse_method_specs(spec)
        if len(specs) != 1:
            raise MtbenchError(f"one method expected, got {spec!r}")
        self.resolved = resolve_spec(specs[0])
        self.spec = spec
        self.device = torch.device(device)
        self.tasks = list(tasks) if tasks is not None else resolve_tasks(dataset)
        self.batch_size = batch_size
        torch.manual_seed(seed)
        self.model = build_model(self.resolved, create_backbone(backbone_name), self.tasks).to(self.device)
        self.model.activation_checkpoint = check_activation_checkpoint(activation_checkpoint)
        self.img_size = tuple(self.model.img_size)
        g = torch.Generator().manual_seed(seed)
        self.image1 = torch.randn(1, 3, *self.img_size, generator=g).to(self.device)
        self.images = torch.randn(batch_size, 3, *self.img_size, generator=g).to(self.device)
        self.targets = synthetic_targets(self.tasks, batch_size, self.img_size, self.device, g)
        self.losses = {t.name: (t.loss_weight, build_loss(TaskSpec(t.name.split("#")[0], t.out_channels,
                                                                   t.loss_weight)).to(self.device))
                       for t in self.tasks}
        self.recipe = resolve_recipe(dataset)[1]  # the dataset's default preset: its optimizer and clipping
        self.optimizer = build_optimizer(self.model, self.recipe)

    @property
    def label(self) -> str:
        return self.resolved.label

    def loss(self, preds: dict) -> torch.Tensor:
        return sum(w * fn(preds[name], self.targets[name]) for name, (w, fn) in self.losses.items())

    @torch.no_grad()
    def infer(self) -> None:
        """One forward pass at batch 1 in eval mode (as evaluated: call it inside :meth:`evaluated`)."""
        self.model.eval()
        self.model(self.image1)

    def evaluated(self):
        """Context manager: the model as evaluation runs it, the shared LoRA folded into the frozen weights
        (:func:`mtbench.lora.merged_lora`; restored exactly on exit). Inference FLOPs, inference memory and inference
        latency are all measured inside it. Yields the number of merged layers."""
        from mtbench.lora import merged_lora

        return merged_lora(self.model)

    def forward_loss(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """Training-mode forward and the weighted sum of the tasks' losses (scalar)."""
        self.model.train()
        return self.loss(self.model(self.images if images is None else images))

    def train_step(self) -> None:
        """One training step as ``mtbench.train.fit`` takes it (fp32): forward, loss, backward, clip, AdamW."""
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_loss().backward()
        if self.recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.recipe.grad_clip)
        self.optimizer.step()


# ------------------------------------------------------------------------------------------------------ memory
def _proc_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS by writing ``5`` to
    ``/proc/self/clear_refs`` (Linux >= 4.0). Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


#: text of a CPU memory record's ``what`` when the resident set followed live allocations (:func:`peak_memory`)
LIVE_MEMORY_MARK = "mtbench.cpu.track_live_memory"


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory of ``fn()`` on ``device``.

    CUDA: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` after ``reset_peak_memory_stats``, minus
    what was allocated just before (``*_step_mb``) and in total (``*_total_mb``). CPU (Linux): the process's peak
    resident set (VmHWM, after resetting it through ``/proc/self/clear_refs``) minus its resident set (VmRSS) just
    before ``fn`` (``rss_step_mb``), and the absolute peak (``rss_peak_mb``). Free blocks glibc keeps are first
    returned to the system (:func:`mtbench.cpu.release_free_memory`). Run it in a fresh process
    (:func:`measure_memory_isolated`) so that memory freed by earlier work and kept by the allocator does not hide
    this step's.

    Returns:
        a dict of MiB values plus ``"what"``, a sentence naming what was measured.

    Raises:
        OSError: on CPU where ``/proc/self/status`` is unavailable (not Linux).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before_alloc = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        mb = 2 ** 20
        return {"allocated_step_mb": (torch.cuda.max_memory_allocated(device) - before_alloc) / mb,
                "allocated_total_mb": torch.cuda.max_memory_allocated(device) / mb,
                "reserved_total_mb": torch.cuda.max_memory_reserved(device) / mb,
                "what": "torch.cuda.max_memory_allocated after reset_peak_memory_stats: peak allocated during the "
                        "step over the allocation just before it (allocated_step_mb) and in total; "
                        "max_memory_reserved in total (caching allocator)"}
    from mtbench.cpu import APPLIED, LIVE_MMAP_THRESHOLD, release_free_memory

    release_free_memory()  # blocks a tuned allocator kept would otherwise serve the step without growing the RSS
    before = _proc_status_kb("VmRSS")
    ok = reset_peak_rss()
    fn()
    peak = _proc_status_kb("VmHWM")
    live = (f"; glibc's mmap threshold fixed at {LIVE_MMAP_THRESHOLD // 1024} KiB, so the resident set follows live "
            f"allocations ({LIVE_MEMORY_MARK})") if APPLIED.get("live_memory") else ""
    return {"rss_step_mb": (peak - before) / 1024 if ok else float("nan"), "rss_peak_mb": peak / 1024,
            "rss_before_mb": before / 1024,
            "what": ("Linux VmHWM (peak resident set of the process) after resetting it via /proc/self/clear_refs, "
                     "minus VmRSS just before the step (rss_step_mb), in a fresh process with the model built"
                     if ok else "Linux VmHWM of the whole process (clear_refs unavailable: includes start-up)") + live}


def _train_memory(profile: dict[str, Any]) -> dict[str, Any]:
    """A profile's ``memory.train`` record, empty when no memory was measured."""
    return (profile.get("memory") or {}).get("train") or {}


def memory_method(profile: dict[str, Any]) -> str:
    """How a profile's training-step peak memory was measured, read from its ``memory.train`` record.

    Returns:
        ``cuda`` (torch's peak allocated bytes); ``cpu-live`` (peak RSS with glibc's mmap threshold fixed, so the
        resident set follows live allocations: profiles from commit c0fb989 on, whose ``what`` names
        :data:`LIVE_MEMORY_MARK`); ``cpu-heap`` (peak RSS under glibc's dynamic threshold, older profiles: freed
        tensors could stay resident and count toward the peak, e.g. MTLoRA 2157-2279 MB from run to run where the
        live peak is 1428 MB); ``none`` (no memory measured).
    """
    train = _train_memory(profile)
    if "allocated_step_mb" in train:
        return "cuda"
    if "rss_step_mb" not in train:
        return "none"
    return "cpu-live" if LIVE_MEMORY_MARK in train.get("what", "") else "cpu-heap"


def train_peak_mb(profile: dict[str, Any]) -> float:
    """A profile's training-step peak in MB (``allocated_step_mb`` on CUDA, ``rss_step_mb`` on CPU; NaN when no
    memory was measured); :func:`memory_method` says how it was measured."""
    train = _train_memory(profile)
    return train.get("allocated_step_mb", train.get("rss_step_mb", float("nan")))


def mixed_memory_warning(methods: Iterable[str]) -> str | None:
    """A one-line warning when CPU peaks of both kinds of :func:`memory_method` are compared (``cpu-heap`` ones read
    high by up to about half), else None."""
    if {"cpu-live", "cpu-heap"} <= set(methods):
        return ("memory: some CPU profiles predate mtbench.cpu.track_live_memory (marked 'RSS incl. freed heap'); "
                "their peaks count freed memory that stayed resident and read high: rerun mtbench profile for them")
    return None


def _memory_child(spec: str, dataset: str, batch_size: int, device: str, modes: list[str], threads: int,
                  n_tasks: int | None, activation_checkpoint: str = "none") -> dict:
    import gc

    from mtbench.cpu import configure_cpu, track_live_memory

    configure_cpu(allocator=False)  # denormals as the timed process; no kept blocks that would hide a peak
    track_live_memory()  # and no freed blocks that stay resident and add to it
    torch.set_num_threads(threads)
    tasks = None if n_tasks is None else scaled_tasks(dataset, n_tasks)
    w = Workload(spec, dataset, batch_size, device, tasks=tasks, activation_checkpoint=activation_checkpoint)
    out = {}
    for mode in modes:
        gc.collect()
        if mode == "inference":
            with w.evaluated():
                out[mode] = peak_memory(w.infer, w.device)
        else:
            out[mode] = peak_memory(w.train_step, w.device)
    return out


def measure_memory_isolated(spec: str, dataset: str, batch_size: int, device: torch.device,
                            modes: Sequence[str] = ("inference", "train"), n_tasks: int | None = None,
                            activation_checkpoint: str = "none") -> dict:
    """:func:`peak_memory` of one inference call (batch 1) and of one training step (``batch_size``; the first
    step, so gradients and AdamW's two moments are allocated inside it) of a method, in a fresh Python process
    (``sys.executable``) per method that builds the model and then measures the modes in order (inference first:
    its activations are freed and returned before the training step). On CPU the child fixes glibc's mmap threshold
    (:func:`mtbench.cpu.track_live_memory`): every tensor of at least 128 KiB is ``mmap``-ed and given back to the
    system when freed, so the peak resident set follows the live allocations.

    Args:
        modes: ``inference`` and/or ``train``.

    Returns:
        ``{mode: peak_memory(...)}``.

    Raises:
        MtbenchError: bad arguments (raised in the child, re-raised here).
    """
    import subprocess
    import sys

    from mtbench.errors import MtbenchError

    args = _json.dumps({"spec": spec, "dataset": dataset, "batch_size": batch_size, "device": str(device),
                        "modes": list(modes), "threads": torch.get_num_threads(), "n_tasks": n_tasks,
                        "activation_checkpoint": activation_checkpoint})
    res = subprocess.run([sys.executable, "-c", "from mtbench.measure import _child_main; _child_main()", args],
                         capture_output=True, text=True)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise MtbenchError(f"memory measurement of {spec!r} failed in its child process: {tail}")
    return _json.loads(lines[-1])


def _child_main() -> None:
    """Entry of the child process of :func:`measure_memory_isolated`: arguments as JSON in ``argv[1]``, the
    result as one JSON line on stdout."""
    import sys

    a = _json.loads(sys.argv[1])
    print(_json.dumps(_memory_child(a["spec"], a["dataset"], a["batch_size"], a["device"], a["modes"], a["threads"],
                                    a["n_tasks"], a.get("activation_checkpoint", "none"))))


# ------------------------------------------------------------------------------------------------------ profile
def environment_info(device: torch.device) -> dict[str, Any]:
    """Device name, threads, torch version and platform recorded in every profile."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (_platform.processor()
                                                                             or _platform.machine())
    try:
        with open("/proc/cpuinfo") as f:
            m = _re.search(r"model name\s*:\s*(.*)", f.read())
        cpu = m.group(1).strip() if m else name
    except OSError:
        cpu = name
    try:
        load = _os.getloadavg()
    except OSError:
        load = None
    return {"device": str(device), "device_name": name if device.type == "cuda" else cpu,
            "threads": torch.get_num_threads(), "cpu_count": _os.cpu_count(), "load_avg_1_5_15": load,
            "torch": torch.__version__, "platform": _platform.platform(), "cpu_settings": dict(CPU_SETTINGS)}


def profile_methods(specs: Sequence[str], dataset: str = "pascal_context", *, batch_size: int = 2,
                    device: str | torch.device = "cpu", rounds: int = 3, warmup: int = 2,
                    compare_to: str | None = None, tasks=None, memory: bool = True,
                    activation_checkpoint: str = "none",
                    log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Profile methods in a dataset's setting: FLOPs, peak memory, latency, and ratios to a reference method.

    Inference (FLOPs, memory and latency) is measured as evaluation runs the model, inside
    :meth:`Workload.evaluated` (the shared LoRA folded into the frozen weights; ``merged_lora_layers`` in the FLOPs
    record says how many layers were merged); the training step runs unmerged.

    FLOPs: :func:`count_flops` of one image (eval mode), plus :func:`count_train_step_flops` (forward, losses and
    backward of one image; torch's counter only). Memory: :func:`measure_memory_isolated` (one fresh process per
    method) for inference and a training step. Latency: all methods are built in this process and timed round-robin
    (``rounds`` rounds; in each round every method runs one inference at batch 1, after one untimed call so that
    weights derived once per evaluation are ready as in evaluation, and one training step at ``batch_size``),
    after ``warmup`` untimed round-robin rounds; ratios to ``compare_to`` are taken per round. The process's minor
    page faults during each timed call are recorded beside its time.

    Args:
        specs: ``--methods`` items, e.g. ``["mtl_full", "mtlora:r=32"]``.
        compare_to: a label among ``specs`` (e.g. ``mtl_full``) or None.
        tasks: task specs (default the dataset's; :func:`scaled_tasks` for the scaling measurement).
        memory: measure peak memory (fresh child processes).
        activation_checkpoint: :data:`mtbench.encoder.ACTIVATION_CHECKPOINT` mode of the training steps (recorded).
        log: progress messages.

    Returns:
        one dict per method (the content of its ``profile_{device}.json``).

    Raises:
        MtbenchError: bad method/options/dataset, rounds < 1, batch size < 1, or ``compare_to`` not among them.
    """
    from mtbench.errors import MtbenchError

    log = log or (lambda s: None)
    if rounds < 1:
        raise MtbenchError(f"--rounds must be >= 1, got {rounds}")
    if batch_size < 1:
        raise MtbenchError(f"--batch-size must be >= 1, got {batch_size}")
    device = torch.device(device)
    sync = synchronizer(device)
    works = []
    for s in specs:
        works.append(Workload(s, dataset, batch_size, device, tasks=tasks,
                              activation_checkpoint=activation_checkpoint))
    labels = [w.label for w in works]
    if len(set(labels)) != len(labels):
        raise MtbenchError(f"a method is listed twice in {', '.join(specs)}")
    if compare_to is not None and compare_to not in labels:
        from mtbench.config import parse_method_specs
        from mtbench.registry import resolve_spec

        want = resolve_spec(parse_method_specs(compare_to)[0]).label
        if want not in labels:
            raise MtbenchError(f"--compare-to {compare_to!r} is not among the profiled methods; valid: "
                               + ", ".join(labels))
        compare_to = want
    profiles: list[dict[str, Any]] = []
    for w in works:
        log(f"FLOPs: {w.label}")
        with w.evaluated() as merged:
            fl_inf = count_flops(w.model, w.image1, train=False)
        w.optimizer.zero_grad(set_to_none=True)
        saved_targets = w.targets
        w.targets = {k: v[:1] for k, v in saved_targets.items()}
        step_flops, fwd_flops, step_by_op = count_train_step_flops(lambda: w.forward_loss(w.image1))
        w.targets = saved_targets
        w.optimizer.zero_grad(set_to_none=True)
        pb = count_params(w.model)
        profiles.append({
            "schema": "mtbench.profile/1", "method": w.resolved.name, "key": w.resolved.method_key,
            "label": w.label, "options": w.resolved.config.to_dict(), "dataset": dataset,
            "tasks": [t.name for t in w.tasks], "input_size": list(w.img_size), "batch_size": batch_size,
            "precision": "float32", "activation_checkpoint": activation_checkpoint,
            "params": {"trainable": pb.trainable, "total": pb.total},
            "flops": {"unit_note": "fvcore counts multiply-accumulates (GMACs); GFLOPs = 2 x GMACs; torch's "
                                   "FlopCounterMode counts FLOPs; all per image (batch 1)",
                      "inference": {**fl_inf.to_dict(), "merged_lora_layers": merged},
                      "train_step": {"torch_gflops": step_flops / 1e9, "forward_torch_gflops": fwd_flops / 1e9,
                                     "backward_torch_gflops": (step_flops - fwd_flops) / 1e9,
                                     "torch_by_operator": step_by_op,
                                     "what": "torch FlopCounterMode over forward (train mode, LoRA unmerged) + "
                                             "losses + backward of one image; forward = up to the loss; the AdamW "
                                             "update is elementwise and not counted; fvcore traces forward graphs "
                                             "only, so it has no twin here"}},
        })
    if memory:
        for w, prof in zip(works, profiles):
            log(f"memory (fresh process): {w.label}")
            n_tasks = None if tasks is None else len(tasks)
            prof["memory"] = measure_memory_isolated(w.spec, dataset, batch_size, device, n_tasks=n_tasks,
                                                     activation_checkpoint=activation_checkpoint)
    log(f"latency: {warmup} warm-up + {rounds} round-robin rounds")
    for _ in range(warmup):  # round-robin like the timed rounds, so the allocator sees the same pattern
        for w in works:
            with w.evaluated():
                w.infer()
            w.train_step()
    sync()
    inf_ms = {w.label: [] for w in works}
    tr_ms = {w.label: [] for w in works}
    faults: dict[str, dict[str, list]] = {w.label: {"inference": [], "train": []} for w in works}

    def timed(fn, label: str, kind: str) -> float:
        f0 = minor_faults()
        ms = time_once(fn, sync)
        faults[label][kind].append(None if f0 is None else minor_faults() - f0)
        return ms

    for r in range(rounds):
        for w in works:
            with w.evaluated():  # inference as evaluation runs it: shared LoRA folded in (untimed merge)
                w.infer()  # untimed: weights derived once per evaluation (DiTASK) are built after the last step
                inf_ms[w.label].append(timed(w.infer, w.label, "inference"))
            tr_ms[w.label].append(timed(w.train_step, w.label, "train"))
        log(f"round {r + 1}/{rounds} done")
    env = environment_info(device)
    for w, prof in zip(works, profiles):
        inf = LatencyStats.from_samples(inf_ms[w.label], 1)
        tr = LatencyStats.from_samples(tr_ms[w.label], batch_size)
        prof["latency"] = {"inference_batch1": asdict(inf), "train_step": asdict(tr), "warmup": warmup,
                           "rounds": rounds, "samples_ms": {"inference": inf_ms[w.label], "train": tr_ms[w.label]},
                           "minor_page_faults": faults[w.label],
                           "what": "wall time with device synchronisation before and after each call; inference "
                                   "= one eval-mode forward at batch 1 under no_grad, after one untimed call; train "
                                   "= one step (forward, losses, backward, clip, AdamW) at batch_size; items_per_s "
                                   "= images/s; minor_page_faults: of the process during each timed call (None "
                                   "without getrusage)"}
        if compare_to is not None:
            ref = compare_to
            ref_flops = profiles[labels.index(ref)]["flops"]
            prof["ratios"] = {"reference": ref,
                              "inference_time": ratio_stats(inf_ms[w.label], inf_ms[ref]),
                              "train_time": ratio_stats(tr_ms[w.label], tr_ms[ref]),
                              # the arithmetic beside the time: a time ratio under its FLOP ratio needs the method
                              # to run its FLOPs faster than the reference runs its own (torch's counts, per image)
                              "inference_flops": (prof["flops"]["inference"]["torch_gflops"]
                                                  / ref_flops["inference"]["torch_gflops"]),
                              "train_flops": (prof["flops"]["train_step"]["torch_gflops"]
                                              / ref_flops["train_step"]["torch_gflops"])}
            if memory:
                ref_prof = profiles[labels.index(ref)]
                key = "allocated_step_mb" if device.type == "cuda" else "rss_step_mb"
                prof["ratios"]["train_memory"] = prof["memory"]["train"][key] / ref_prof["memory"]["train"][key]
                prof["ratios"]["inference_memory"] = (prof["memory"]["inference"][key]
                                                      / ref_prof["memory"]["inference"][key])
        prof["env"] = env
    return profiles


def write_profile(profile: dict[str, Any], path) -> None:
    """Write a profile as JSON atomically (temporary file + ``os.replace``)."""
    from pathlib import Path

    from mtbench.results import atomic_write_text

    atomic_write_text(Path(path), _json.dumps(profile, indent=2) + "\n")


def scaling_tasks(specs: Sequence[str], dataset: str, *, batch_size: int, device, rounds: int, warmup: int,
                  max_tasks: int, out_dir, memory: bool = True, log: Callable[[str], None] | None = None):
    """Cost against the number of tasks T = 1..``max_tasks`` (:func:`scaled_tasks`: the dataset's task kinds
    repeated), for each method: GFLOPs of inference (fvcore) and of a training step (torch), latency, training-step
    memory. Writes ``scaling_tasks_{dataset}.csv`` and ``scaling_tasks_{dataset}.png``/``.pdf`` (cost against T,
    one line per method) under ``out_dir`` atomically.

    Returns:
        ``(csv path, png path)``.

    Raises:
        MtbenchError: as :func:`profile_methods`.
    """
    import io
    from pathlib import Path

    import pandas as pd

    from mtbench.results import atomic_write_bytes, atomic_write_text

    log = log or (lambda s: None)
    rows = []
    for n in range(1, max_tasks + 1):
        log(f"T = {n} tasks")
        for p in profile_methods(specs, dataset, batch_size=batch_size, device=device, rounds=rounds, warmup=warmup,
                                 tasks=scaled_tasks(dataset, n), memory=memory):
            rows.append({"method": p["label"], "tasks": n, "tp_m": p["params"]["trainable"] / 1e6,
                         "gflops": p["flops"]["inference"]["gflops"],
                         "train_step_gflops": p["flops"]["train_step"]["torch_gflops"],
                         "inference_ms": p["latency"]["inference_batch1"]["median_ms"],
                         "train_step_ms": p["latency"]["train_step"]["median_ms"],
                         "train_memory_mb": train_peak_mb(p),
                         "device": p["env"]["device_name"], "batch_size": batch_size})
    df = pd.DataFrame(rows)
    out = Path(out_dir)
    csv = out / f"scaling_tasks_{dataset}.csv"
    atomic_write_text(csv, df.to_csv(index=False))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    panels = [("gflops", "GFLOPs per image, inference (2 x fvcore GMACs)"),
              ("train_step_gflops", "GFLOPs per image, training step (torch)"),
              ("inference_ms", "inference latency, batch 1 (ms)"),
              ("train_memory_mb" if memory else "train_step_ms",
               "training-step peak memory (MB)" if memory else f"training step, batch {batch_size} (ms)")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (col, label) in zip(axes.flat, panels):
        sns.lineplot(data=df, x="tasks", y=col, hue="method", style="method", markers=True, dashes=False, ax=ax)
        ax.set_xlabel("number of tasks T")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"cost against the number of tasks, {dataset} setting — {rows[0]['device']}", fontsize=10)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=100)
        paths.append(out / f"scaling_tasks_{dataset}.{ext}")
        atomic_write_bytes(paths[-1], buf.getvalue())
    plt.close(fig)
    return csv, paths[0]
# ---------------------------------------------------------------------------------------------- FLOPs and latency
def _grid_sampler_flop(inputs, outputs) -> int:
    """fvcore handle of ``aten::grid_sampler``: bilinear sampling = 4 multiply-adds per output element
    (``[N, C, Hout, Wout]``), the count fvcore uses for one FLOP (one fused multiply-add)."""
    from fvcore.nn.jit_handles import get_shape

    return 4 * math.prod(get_shape(outputs[0]))


def _baddbmm_flop(inputs, outputs) -> int:
    """fvcore handle of ``aten::baddbmm(input, batch1 [b, n, k], batch2 [b, k, m])``: ``b·n·k·m`` multiply-adds, as
    fvcore counts ``bmm`` (the added ``input`` is elementwise and not counted, as fvcore leaves out ``add``)."""
    from fvcore.nn.jit_handles import get_shape

    b, n, k = get_shape(inputs[1])
    return b * n * k * get_shape(inputs[2])[-1]


#: fvcore handles mtbench adds for ops fvcore 0.1.5 skips (it would warn and count 0); the attention handle is the
#: one the profile uses (:func:`sdpa_macs`).
EXTRA_FLOP_HANDLES = {"aten::grid_sampler": _grid_sampler_flop,
                      "aten::scaled_dot_product_attention": _fvcore_sdpa_handle,
                      "aten::baddbmm": _baddbmm_flop}


def count_macs(module: nn.Module, inputs: tuple) -> int:
    """fvcore's multiply-accumulates of ``module(*inputs)`` (:func:`count_flops`, with :data:`EXTRA_FLOP_HANDLES`
    registered; one fused multiply-add = 1; elementwise ops, softmax and normalisation not counted).

    Raises:
        MtbenchError: an operator of :data:`_COSTLY_OPS` that fvcore skipped (a count that would be silently low).
    """
    from mtbench.errors import MtbenchError

    fc = count_flops(module, inputs)
    skipped = {op: n for op, n in fc.skipped.items() if op in _COSTLY_OPS}
    if skipped:
        raise MtbenchError(f"fvcore skipped costly operators {skipped}; register a handle in EXTRA_FLOP_HANDLES")
    return fc.macs


#: Operators that must be counted (a skip of one of these would make a FLOP count wrong, not merely low by a norm).
_COSTLY_OPS = {"aten::grid_sampler", "aten::scaled_dot_product_attention", "aten::_convolution", "aten::mm",
               "aten::bmm", "aten::matmul", "aten::linear", "aten::einsum", "aten::baddbmm", "aten::addmm"}


def time_forward(module: nn.Module, inputs: tuple, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``module(*inputs)`` under ``torch.no_grad()`` (CUDA synchronised), after
    ``warmup`` untimed calls."""
    import statistics
    import time

    import torch

    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            module(*inputs)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interaction_cost(decoder: str, num_tasks: int, img_size: tuple[int, int], backbone: str = "swin_tiny_patch4_window7_224",
                     device: str = "cpu", repeats: int = 2) -> dict:
    """MACs (fvcore) and latency of a decoder's interaction stage alone, for ``num_tasks`` tasks, batch 1.

    The inputs are random neck outputs of the decoder's widths at the backbone's tap strides (8/16/32/32 for Swin-T:
    a 56x56 finest map at 448x448). Used by ``mtbench interaction-cost`` (the inter-task attention claim of Bohn et
    al. 2025, :mod:`mtbench.intertask`).

    Args:
        decoder: a name :func:`mtbench.decoders.resolve_decoder` accepts (e.g. ``inter_task_mha``).
        num_tasks: ``T``; img_size: ``(H, W)`` in pixels; device: torch device; repeats: timed calls (median).

    Returns:
        ``{"decoder", "tasks", "height", "width", "macs" (fvcore's count: multiply-accumulates), "gflops"
        (= 2 x macs / 1e9), "latency_ms", "device"}``.

    Raises:
        MtbenchError: unknown decoder.
    """
    import torch

    from mtbench.decoders import resolve_decoder

    spec = resolve_decoder(decoder, backbone)
    tasks = [f"task{i}" for i in range(num_tasks)]
    module = spec.make_interaction(tasks, spec.neck_channels).to(device).eval()
    strides = (8, 16, 32, 32)[:len(spec.neck_channels)]
    g = torch.Generator().manual_seed(0)
    maps = tuple(torch.randn(1, c, img_size[0] // s, img_size[1] // s, generator=g).to(device)
                 for t in tasks for c, s in zip(spec.neck_channels, strides))
    k = len(spec.neck_channels)

    class _Flat(nn.Module):  # fvcore traces tensors in, tensors out
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, *flat):
            out, _ = self.inner({t: list(flat[i * k:(i + 1) * k]) for i, t in enumerate(tasks)})
            return tuple(m for t in tasks for m in out[t])

    flat = _Flat()
    with torch.no_grad():
        macs = count_macs(flat, maps)
    latency = time_forward(flat, maps, repeats=repeats, warmup=1)
    return {"decoder": spec.name, "tasks": num_tasks, "height": img_size[0], "width": img_size[1], "macs": macs,
            "gflops": 2 * macs / 1e9, "latency_ms": latency * 1e3, "device": str(device)}


def train_step_memory(model: nn.Module, images, repeats: int = 1) -> dict:
    """Training-step cost of a model: the bytes autograd keeps for backward, the CUDA peak when on CUDA, and the
    step time.

    The saved-for-backward bytes are counted with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once;
    parameters excluded), a device-independent measure of the activation memory a training step needs: the part of
    training memory a lateral path (TDSS) saves by keeping backprop out of the frozen backbone.

    Args:
        model: a :class:`mtbench.model.MultiTaskModel` (trainability applied); images: ``[B,3,H,W]`` on its device.
        repeats: timed steps (median), after one untimed step.

    Returns:
        ``{"saved_mb", "cuda_peak_mb" (None on CPU), "step_seconds"}``.
    """
    import statistics
    import time

    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    cuda = images.is_cuda
    times, saved = [], 0.0
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        seen.clear()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            preds = model(images)
        sum(p.float().mean() for p in preds.values()).backward()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        saved = sum(seen.values()) / 2**20
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    model.zero_grad(set_to_none=True)
    return {"saved_mb": saved, "cuda_peak_mb": peak, "step_seconds": statistics.median(times)}
