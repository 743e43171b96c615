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


# ---------------------------------------------------------------------------------------------- FLOPs and latency
def _grid_sampler_flop(inputs, outputs) -> int:
    """fvcore handle of ``aten::grid_sampler``: bilinear sampling = 4 multiply-adds per output element
    (``[N, C, Hout, Wout]``), the count fvcore uses for one FLOP (one fused multiply-add)."""
    from fvcore.nn.jit_handles import get_shape

    return 4 * math.prod(get_shape(outputs[0]))


def _sdpa_flop(inputs, outputs) -> int:
    """fvcore handle of ``aten::scaled_dot_product_attention`` (q ``[..., Nq, d]``, k ``[..., Nk, d]``, v
    ``[..., Nk, dv]``): ``Q K^T`` and ``softmax(.) V`` = ``prod(batch) * Nq * Nk * (d + dv)`` multiply-adds (the
    softmax is not counted, as fvcore does not count elementwise ops)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


#: fvcore handles mtbench adds for ops fvcore 0.1.5 skips (it would warn and count 0).
EXTRA_FLOP_HANDLES = {"aten::grid_sampler": _grid_sampler_flop, "aten::scaled_dot_product_attention": _sdpa_flop}


def count_flops(module: nn.Module, inputs: tuple) -> int:
    """FLOPs of ``module(*inputs)`` as fvcore counts them (one fused multiply-add = 1 FLOP; elementwise ops,
    softmax and normalisation not counted), with :data:`EXTRA_FLOP_HANDLES` registered.

    Raises:
        MtbenchError: an operator that fvcore skipped (a count that would be silently low).
    """
    from fvcore.nn import FlopCountAnalysis

    from mtbench.errors import MtbenchError

    fca = FlopCountAnalysis(module, inputs).set_op_handle(**EXTRA_FLOP_HANDLES)
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    total = fca.total()
    skipped = {op: n for op, n in fca.unsupported_ops().items() if op in _COSTLY_OPS}
    if skipped:
        raise MtbenchError(f"fvcore skipped costly operators {skipped}; register a handle in EXTRA_FLOP_HANDLES")
    return int(total)


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
    """FLOPs and latency of a decoder's interaction stage alone, for ``num_tasks`` tasks, batch 1.

    The inputs are random neck outputs of the decoder's widths at the backbone's tap strides (8/16/32/32 for Swin-T:
    a 56x56 finest map at 448x448). Used by ``mtbench interaction-cost`` (the inter-task attention claim of Bohn et
    al. 2025, :mod:`mtbench.intertask`).

    Args:
        decoder: a name :func:`mtbench.decoders.resolve_decoder` accepts (e.g. ``inter_task_mha``).
        num_tasks: ``T``; img_size: ``(H, W)`` in pixels; device: torch device; repeats: timed calls (median).

    Returns:
        ``{"decoder", "tasks", "height", "width", "flops" (fvcore, 1 = one multiply-add), "latency_ms", "device"}``.

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
        flops = count_flops(flat, maps)
    latency = time_forward(flat, maps, repeats=repeats, warmup=1)
    return {"decoder": spec.name, "tasks": num_tasks, "height": img_size[0], "width": img_size[1], "flops": flops,
            "latency_ms": latency * 1e3, "device": str(device)}


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
