"""Low-rank adaptation layers shared by every LoRA-based method (LoRA, MTLoRA, TADFormer, ...).

A :class:`LoRALinear` wraps a frozen ``nn.Linear`` ``W`` and adds a shared low-rank branch and, optionally, task
branches, applied per stream of the stacked batch (:mod:`mtbench.streams`):

* shared stream (MTLoRA's task-agnostic TA-LoRA, TADFormer's TS-module):  ``y = W x + b + s · B A dropout(x)``
* task stream ``t``, ``task_mode="own"`` (MTLoRA's task-specific TS-LoRA): ``y_t = W x_shared + b + s_t · B_t A_t x_t``
* task stream ``t``, ``task_mode="shared_ab"`` (TADFormer's TA-module): ``y_t = W x_shared + b + s · B mid_t(A x_t)``

``W`` acts on the *shared* stream's input when the layout has one (MTLoRA's "matrix" mode, official
``scale-lab/MTLoRA models/lora.py::MTLoRALinear``), else on each stream's own input. The task branches' inputs get no
dropout (official MTLoRA: dropout only on the shared branch's input); at a ``proj`` split
(:meth:`LoRALinear.split_forward`) the task inputs are derived from the shared branch's dropped-out input, so one
mask serves both, as in the official MTLoRA and TADFormer code.

``s`` is a raw multiplier (MTLoRA's ``SHARED_SCALE``), not ``alpha / r``; A is initialised kaiming-uniform
(a=√5), B zero, so every branch starts as the identity adaptation (Hu et al., ICLR 2022 §4.1).

:func:`inject_lora` replaces linears in a module tree by structure (module class and attribute name, as peft's
``target_modules`` suffix match), never by substring on parameter names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from mtbench.errors import MtbenchError
from mtbench.streams import (
    SHARED, StreamLayout, current_layout, first_and_rest, per_stream, repeat_streams, split_streams, stream_layout,
)


class LoRADropout(nn.Module):
    """Inverted dropout on LoRA inputs with probability ``p`` (Hu et al. 2022; MTLoRA ``lora_dropout`` 0.05).

    On CUDA this is ``F.dropout``. On CPU, where ``bernoulli_`` draws one random number per element and took a third
    of a training step, the keep-mask is drawn as 32-bit integers and compared with a threshold: the drop
    probability is ``round(2^32 p) / 2^32`` (exact to 2.4e-10; issue 6 replaced the 8-bit draw whose ``p`` was
    ``13/256`` for 0.05). The integers come from NumPy's PCG64 (two per 64-bit word, 3.7x faster than torch's
    Mersenne Twister ``randint`` on this CPU), seeded for every mask by one draw from torch's generator, so
    ``torch.manual_seed`` and the checkpointed torch RNG state still fix every mask. The mask stays boolean (no
    float copy); kept values are scaled by ``1 / (1 - p)``. ``p = 0`` is the identity and draws nothing.

    Shapes: any; output shape = input shape.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.threshold = int(round(self.p * 2**32)) - 2**31  # keep where the signed 32-bit draw >= threshold

    def keep_mask(self, shape: tuple[int, ...], device) -> torch.Tensor:
        """Boolean keep-mask of ``shape`` with ``P(keep) = 1 - p`` (CPU path)."""
        n = math.prod(shape)
        seed = int(torch.randint(0, 2**62, (1,)).item())  # from torch's generator: torch's seed fixes the mask
        raw = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((n + 1) // 2)
        return torch.from_numpy(raw.view(np.int32)[:n]).view(shape).to(device) >= self.threshold

    def mask(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float] | None:
        """``(keep, c)`` with ``dropout(x) = c · where(keep, x, 0)`` (``keep`` None: no dropout), or None where the
        dropout is not a boolean mask (CUDA's ``F.dropout``, ``p >= 1``)."""
        if not self.training or self.p == 0:
            return None, 1.0
        if x.is_cuda or self.p >= 1:
            return None
        return self.keep_mask(tuple(x.shape), x.device), 1.0 / (1.0 - self.p)

    def unscaled(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(y, c)`` with ``dropout(x) = c · y``: the scale is left for the caller to fold into a later product
        (one elementwise pass fewer)."""
        mask = self.mask(x)
        if mask is None:
            return nn.functional.dropout(x, self.p, True), 1.0
        keep, c = mask
        return (x if keep is None else torch.where(keep, x, 0.0)), c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, c = self.unscaled(x)
        return y if c == 1.0 else y.mul_(c)

    def extra_repr(self) -> str:
        return f"p={self.p}"


#: attribute a recomputable activation carries: ``(recipe, its version, its recipe tensors' versions)``
_SOURCE_ATTR = "_mtbench_lora_source"
_recompute_enabled = [False]  # set per forward by the encoder loop (--activation-checkpoint)


@contextmanager
def lora_input_recompute(enabled: bool) -> Iterator[None]:
    """Switch :func:`recompute_lora_inputs`'s recomputation on or off for the ``with`` block (off outside it; the
    encoder loop, :func:`mtbench.encoder.encode`, switches it on for every ``--activation-checkpoint`` mode but
    ``none``)."""
    before = _recompute_enabled[0]
    _recompute_enabled[0] = bool(enabled)
    try:
        yield
    finally:
        _recompute_enabled[0] = before


class Recipe:
    """How to recompute an activation ``x`` in backward from tensors that are kept anyway: ``x = fn(*tensors)``
    reshaped to ``shape``.

    Two kinds: ``rowwise`` (``fn`` a LayerNorm's or GELU's ``forward``, ``tensors = (its input,)``; any selection of
    rows of the input gives the same rows of ``x``) and ``low_rank`` (``fn`` = an activation of ``W x_shared + b +
    z_s up_s`` per stream ``s``, ``tensors = (base [1, N, out], z [S, N, R], up [S, R, out])``; a selection of streams
    selects rows of ``z`` and ``up``).

    Attributes:
        fn: ``(*tensors) -> tensor``; tensors: what ``fn`` reads; shape: ``x``'s shape;
        kind: ``rowwise`` | ``low_rank``.
    """

    def __init__(self, fn: Callable, tensors: Sequence[torch.Tensor], shape, kind: str):
        self.fn, self.tensors, self.shape, self.kind = fn, tuple(tensors), tuple(shape), kind

    def compute(self, *tensors: torch.Tensor) -> torch.Tensor:
        """``x`` from ``tensors`` (this recipe's, as saved for backward)."""
        return self.fn(*tensors).reshape(self.shape)

    def reshape(self, *shape: int) -> Recipe:
        return Recipe(self.fn, self.tensors, shape, self.kind)

    def first_and_rest(self, num_streams: int) -> tuple[Recipe, Recipe] | None:
        """Recipes of the first stream's rows and of the others' (as :func:`mtbench.streams.first_and_rest`), or
        None where the streams do not match."""
        m = self.shape[0] // num_streams
        rows = (m, self.shape[0] - m)
        if self.kind == "rowwise":
            first, rest = first_and_rest(self.tensors[0], num_streams)
            return (Recipe(self.fn, (first,), first.shape, self.kind), Recipe(self.fn, (rest,), rest.shape, self.kind))
        base, z, up = self.tensors
        if z.shape[0] != num_streams:
            return None
        return tuple(Recipe(self.fn, (base, z[sl], up[sl]), (n, *self.shape[1:]), self.kind)
                     for sl, n in ((slice(0, 1), rows[0]), (slice(1, None), rows[1])))


def _tag(x: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Mark ``x`` as recomputable by ``recipe`` (while neither ``x`` nor the recipe's tensors change in place)."""
    setattr(x, _SOURCE_ATTR, (recipe, x._version, tuple(t._version for t in recipe.tensors)))
    return x


def _recording() -> bool:
    return _recompute_enabled[0] and torch.is_grad_enabled()


def _tag_source(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    """Forward hook: mark ``output`` as ``module(inputs[0])``, recomputable in backward from the input, which the
    module's own backward keeps anyway (LayerNorm and GELU save their input). An output its module marked itself
    (:class:`LowRankGELU`) keeps that mark."""
    if (_recording() and isinstance(output, torch.Tensor) and output.requires_grad
            and getattr(output, _SOURCE_ATTR, None) is None):
        _tag(output, Recipe(module.forward, (inputs[0],), output.shape, "rowwise"))


def _source_of(x: torch.Tensor) -> Recipe | None:
    """The :class:`Recipe` of ``x`` when ``x`` is exactly what it recomputes (neither ``x`` nor the recipe's tensors
    changed in place since), else None."""
    tag = getattr(x, _SOURCE_ATTR, None)
    if tag is None or not _recompute_enabled[0]:
        return None
    recipe, version, versions = tag
    if x._version != version or tuple(t._version for t in recipe.tensors) != versions:
        return None
    if math.prod(recipe.shape) != x.numel():
        return None
    return recipe


class _RecomputedDown(torch.autograd.Function):
    """``z = where(keep, x, 0) @ A^T`` (``A`` ``[r, in]`` on ``x`` ``[N, in]``, or ``[T, r, in]`` on ``[T, N, in]``)
    that saves a :class:`Recipe`'s tensors instead of ``x`` and recomputes ``x`` from them in backward.

    The recipe's tensors are kept for backward anyway (a LayerNorm's or GELU's input, or a split block's ``W x + b``
    and low-rank factors), so the LoRA input costs no memory for backward; without this, a float copy of every LoRA'd
    ``fc1``, ``fc2`` and PatchMerging input (every task stream's too) is kept, about a quarter of MTLoRA's saved
    activations. Gradients: ``grad_x = keep · (grad_z A)``, ``grad_A = grad_z^T (keep · x)`` (per task stream for a
    3-D ``A``).
    """

    @staticmethod
    def forward(ctx, x, weight, keep, recipe, *tensors):
        d = x if keep is None else torch.where(keep, x, 0.0)
        ctx.save_for_backward(weight, keep, *tensors)
        ctx.recipe = Recipe(recipe.fn, (), recipe.shape, recipe.kind)  # no tensor references outside the saved ones
        return torch.matmul(d, weight.transpose(-1, -2))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        weight, keep, *tensors = ctx.saved_tensors
        grad_x = grad_w = None
        # under autocast (AMP) z and grad_z are half precision while the recipe's tensors and weight may be float32:
        # compute in grad_z's dtype, as autocast's matmul backward does; autograd casts the gradients back
        weight = weight.to(grad_z.dtype)
        if ctx.needs_input_grad[1]:  # first: the recomputed input is freed before grad_x is allocated
            d = ctx.recipe.compute(*tensors).to(grad_z.dtype)
            if keep is not None:
                d.mul_(keep)  # in place: one buffer, not two
            if weight.dim() == 2:
                grad_w = grad_z.reshape(-1, weight.shape[0]).t() @ d.reshape(-1, weight.shape[1])
            else:
                grad_w = torch.bmm(grad_z.transpose(1, 2), d)
            del d
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_z, weight)
            if keep is not None:
                grad_x.mul_(keep)
        return (grad_x, grad_w, None, None) + (None,) * len(tensors)


def low_rank_down(x: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor | None = None,
                  source: Recipe | None = None) -> torch.Tensor:
    """The down-projection of a LoRA branch, ``where(keep, x, 0) @ weight^T``.

    Args:
        x: ``[N, in]`` (``weight`` ``[r, in]``) or ``[T, N, in]`` (``weight`` ``[T, r, in]``, one per task stream).
        keep: boolean dropout keep-mask shaped as ``x``, or None.
        source: a :class:`Recipe` of ``x`` (from :func:`recompute_lora_inputs`'s marks): ``x`` is then recomputed
            in backward instead of saved.

    Returns:
        ``[N, r]`` or ``[T, N, r]``.
    """
    if source is None or not torch.is_grad_enabled() or not weight.requires_grad:
        d = x if keep is None else torch.where(keep, x, 0.0)
        return torch.matmul(d, weight.transpose(-1, -2))
    return _RecomputedDown.apply(x, weight, keep, source.reshape(*x.shape), *source.tensors)


def _low_rank_sum(base: torch.Tensor, z: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``base + z up`` per stream in the dtype of ``z`` (autocast's, when recomputed outside it)."""
    return torch.baddbmm(base.to(z.dtype), z, up.to(z.dtype))


class _GELUOfLowRank(torch.autograd.Function):
    """``GELU(h)`` for ``h = base + z up`` (a split block's stacked ``fc1`` output) that saves ``base, z, up`` (one
    stream of ``W x + b`` and rank-R factors) instead of ``h`` (every stream) and recomputes ``h`` in backward."""

    @staticmethod
    def forward(ctx, h, approximate, base, z, up):
        ctx.save_for_backward(base, z, up)
        ctx.approximate = approximate
        return nn.functional.gelu(h, approximate=approximate)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_g):
        base, z, up = ctx.saved_tensors
        h = _low_rank_sum(base, z, up).reshape(grad_g.shape).to(grad_g.dtype)
        return torch.ops.aten.gelu_backward(grad_g, h, approximate=ctx.approximate), None, None, None, None


class LowRankGELU(nn.GELU):
    """timm's MLP activation (``nn.GELU``, the same function and no parameters) that, when its input is a split
    block's stacked ``fc1`` output ``h = W x_shared + b + z_s up_s`` (:meth:`LoRALinear._stacked_forward`, marked
    there), keeps for backward one stream of ``W x + b`` and the rank-R factors instead of ``h`` for every stream,
    and marks its output as recomputable from them for ``fc2``'s LoRA. Otherwise plain ``nn.GELU``. Installed by
    :func:`recompute_lora_inputs`; active under :func:`lora_input_recompute` in training."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        recipe = _source_of(h) if _recording() and h.requires_grad else None
        if recipe is None or recipe.kind != "low_rank":
            return super().forward(h)
        g = _GELUOfLowRank.apply(h, self.approximate, *recipe.tensors)
        act = self.approximate
        return _tag(g, Recipe(lambda b, z, u: nn.functional.gelu(_low_rank_sum(b, z, u), approximate=act),
                              recipe.tensors, g.shape, "low_rank"))


class WrappedLinear(nn.Module):
    """Base of the layers that wrap a frozen ``nn.Linear`` (:class:`LoRALinear`, DiTASK's ``DiTASKLinear``): keeps it
    as ``self.base`` and exposes its ``weight``, ``bias``, ``in_features`` and ``out_features``, so code that reads a
    linear's attributes (timm's init, fvcore, parameter counting by role) sees the pretrained layer.

    Args:
        base: the pretrained ``nn.Linear``.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias


class LoRALinear(WrappedLinear):
    """A frozen linear layer with a shared LoRA branch and optional task branches, applied per stream.

    Args:
        base: the pretrained ``nn.Linear`` (kept as ``self.base``; its parameters stay where the backbone had them).
        r: rank of the shared branch (0 disables it).
        scale: raw multiplier ``s`` of the shared branch.
        dropout: dropout probability on the shared branch's input.
        task_ranks: ``{task: rank}`` of task-specific branches (``task_mode="own"``), or None.
        task_scale: multiplier of the task branches (MTLoRA uses the shared scale for them).

    Attributes:
        task_mode: ``"none"`` (task streams get the shared formula) | ``"own"`` (per-task ``A_t, B_t``) |
            ``"shared_ab"`` (the shared ``A, B`` with ``task_mid`` between them).
        task_mid: callable ``[T*M, ..., r] -> [T*M, ..., r]`` on the task streams' down-projections (run under the
            tasks-only :class:`mtbench.streams.StreamLayout`); not registered as a submodule, the method owns it.

    Shapes: input ``[S*M, ..., in_features]`` stacked per :func:`mtbench.streams.current_layout`, output
    ``[S*M, ..., out_features]``.

    Raises:
        MtbenchError: a negative rank.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        scale: float = 4.0,
        dropout: float = 0.05,
        task_ranks: Mapping[str, int] | None = None,
        task_scale: float | None = None,
    ):
        if r < 0 or any(v <= 0 for v in (task_ranks or {}).values()):
            raise MtbenchError(f"LoRA rank must be >= 0 (task ranks > 0), got r={r}, task ranks={task_ranks}")
        super().__init__(base)
        self.r = int(r)
        self.scale = float(scale)
        self.task_scale = float(scale if task_scale is None else task_scale)
        self.lora_dropout = LoRADropout(dropout)  # p = 0: the identity, and no random draw
        if self.r > 0:
            self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.task_A = nn.ParameterDict()
        self.task_B = nn.ParameterDict()
        for task, rt in (task_ranks or {}).items():
            a = nn.Parameter(torch.empty(int(rt), self.in_features))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.task_A[task] = a
            self.task_B[task] = nn.Parameter(torch.zeros(self.out_features, int(rt)))
        self.task_mode = "own" if task_ranks else "none"
        self.__dict__["task_mid"] = None
        self.__dict__["_unmerged_weight"] = None

    @property
    def tasks(self) -> list[str]:
        return list(self.task_A.keys())

    def set_task_mid(self, mid) -> None:
        """Task streams use the shared ``A, B`` with ``mid`` between them (TADFormer's TA-module); ``mid`` None
        = nothing between them."""
        self.task_mode = "shared_ab"
        self.__dict__["task_mid"] = mid

    def lora_parameters(self) -> list[nn.Parameter]:
        """The parameters this wrapper adds (shared and task branches), not the base layer's."""
        own = [self.lora_A, self.lora_B] if self.r > 0 else []
        return own + list(self.task_A.values()) + list(self.task_B.values())

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """Shared down-projection ``A dropout(x)``: ``[..., in]`` -> ``[..., r]``."""
        return self.lora_dropout(x) @ self.lora_A.t()

    def up(self, z: torch.Tensor) -> torch.Tensor:
        """Shared up-projection with scale ``s · B z``: ``[..., r]`` -> ``[..., out]``."""
        return (z @ self.lora_B.t()) * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Shared low-rank update ``s · B A dropout(x)``."""
        if self.r == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        return self.up(self.down(x))

    def _shared_down(self, x: torch.Tensor, source=None) -> tuple[torch.Tensor, float]:
        """``(z, c)`` with ``A dropout(x) = c · z``, ``z`` ``[N, r]`` over the rows of ``x`` ``[..., in]``; ``source``:
        see :func:`low_rank_down`."""
        mask = self.lora_dropout.mask(x)
        if mask is None:  # CUDA's F.dropout: no boolean mask to keep
            d, c = self.lora_dropout.unscaled(x)
            return d.reshape(-1, self.in_features) @ self.lora_A.t(), c
        keep, c = mask
        flat = (lambda t: None if t is None else t.reshape(-1, self.in_features))
        return low_rank_down(flat(x), self.lora_A, flat(keep), source), c

    def _shared_forward(self, x: torch.Tensor, out: torch.Tensor | None = None, source=None) -> torch.Tensor:
        """``W x + b + s · B A dropout(x)`` with the dropout scale and ``s`` folded into one ``addmm``; ``out``:
        ``W x + b`` when already computed; ``source``: see :func:`low_rank_down`."""
        out = self.base(x) if out is None else out
        if self.r == 0:
            return out
        z, c = self._shared_down(x, source)
        out2 = torch.addmm(out.reshape(-1, self.out_features), z, self.lora_B.t(), alpha=self.scale * c)
        return out2.view(out.shape)

    def task_delta(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Task ``task``'s update ``s_t · B_t A_t x`` (``task_mode="own"``; no dropout, as the official code)."""
        return (x @ self.task_A[task].t() @ self.task_B[task].t()) * self.task_scale

    def task_deltas(self, x: torch.Tensor, tasks: tuple[str, ...], source=None) -> torch.Tensor:
        """Updates of the task streams ``x`` ``[T*M, ..., in]`` (tasks stacked in ``tasks`` order); ``source``: see
        :func:`low_rank_down`."""
        layout = StreamLayout(tasks, 0)
        if self.task_mode == "own":
            return per_stream(x, lambda t, part: self.task_delta(part, t), layout)
        z = low_rank_down(x.reshape(-1, self.in_features), self.lora_A, None, source).view(*x.shape[:-1], self.r)
        if self.task_mid is not None:
            with stream_layout(layout):
                z = self.task_mid(z)
        return self.up(z)

    def task_outputs(self, x: torch.Tensor, tasks: tuple[str, ...], base: torch.Tensor,
                     source=None) -> torch.Tensor:
        """The task streams' outputs ``base + update_t(x_t)``, one batched ``baddbmm`` for all tasks.

        Args:
            x: task rows ``[T*M, ..., in]`` (tasks stacked in ``tasks`` order).
            tasks: the task of each stream.
            base: ``W x_shared + b`` ``[M, ..., out]``, shared by every task stream (MTLoRA's "matrix" mode).
            source: see :func:`low_rank_down`.

        Returns:
            ``[T*M, ..., out]``.
        """
        if not self._equal_task_ranks(tasks):
            # unequal task ranks (one matmul per task), or the shared B after task_mid (TADFormer's proj split,
            # whose task inputs come from the TPC; its fc1/fc2 go through _stacked_forward)
            delta = split_streams(self.task_deltas(x, tasks, source), len(tasks))
            return (delta + base).view(*x.shape[:-1], self.out_features)
        z, up = self._task_factors(x, tasks, source)
        return self._add_task_updates(base, z, up, x.shape[:-1])

    def _add_task_updates(self, base: torch.Tensor, z: torch.Tensor, up: torch.Tensor, lead: tuple) -> torch.Tensor:
        """``base + s_t · z_t up_t`` for every task in one ``baddbmm``: ``base`` ``[M, ..., out]`` (``N`` rows),
        ``z`` ``[T, N, r]``, ``up`` ``[T, r, out]``; returns ``[*lead, out]`` (``lead`` the task rows' shape)."""
        out = torch.baddbmm(base.reshape(1, -1, self.out_features), z, up, alpha=self.task_scale)
        return out.view(*lead, self.out_features)

    def _task_ups(self, tasks: tuple[str, ...]) -> torch.Tensor:
        """The tasks' up-projections stacked, ``[T, r_t, out]`` (unscaled; equal task ranks)."""
        return torch.stack([self.task_B[t] for t in tasks]).transpose(1, 2)

    def _equal_task_ranks(self, tasks: tuple[str, ...]) -> bool:
        """``task_mode="own"`` with one rank for every task in ``tasks`` (the batched ``bmm`` paths)."""
        return self.task_mode == "own" and len({self.task_A[t].shape[0] for t in tasks}) == 1

    def _task_factors(self, x: torch.Tensor, tasks: tuple[str, ...], source=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Down-projections of the task rows ``x`` ``[T*M, ..., in]`` in one ``bmm``, ``z`` ``[T, N, r_t]``, and the
        up-projections ``[T, r_t, out]`` (unscaled; :meth:`_equal_task_ranks` must hold); ``source``: see
        :func:`low_rank_down`."""
        z = low_rank_down(x.reshape(len(tasks), -1, self.in_features), torch.stack([self.task_A[t] for t in tasks]),
                          None, source)
        return z, self._task_ups(tasks)

    def _task_low_rank(self, xt: torch.Tensor, tasks: tuple[str, ...],
                       source=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The task streams' updates as scaled rank factors: ``update_t = z_t up_t`` with ``z`` ``[T, N, r_t]`` and
        ``up`` ``[T, r_t, out]``, for ``task_mode="own"`` with equal task ranks (``s_t A_t x_t``, ``B_t^T``) or
        ``"shared_ab"`` (``s · task_mid(A x_t)``, the shared ``B^T`` for every task: TADFormer's TA-module, whose
        filter acts on the rank-r down-projection). ``source``: see :func:`low_rank_down`."""
        if self.task_mode == "own":
            z, up = self._task_factors(xt, tasks, source)
            return z * self.task_scale, up
        z = low_rank_down(xt.reshape(-1, self.in_features), self.lora_A, None, source).view(*xt.shape[:-1], self.r)
        if self.task_mid is not None:
            with stream_layout(StreamLayout(tasks, 0)):
                z = self.task_mid(z)
        return (z * self.scale).reshape(len(tasks), -1, self.r), self.lora_B.t().expand(len(tasks), -1, -1)

    def _stacked_forward(self, xs: torch.Tensor, xt: torch.Tensor, tasks: tuple[str, ...],
                         sources: tuple | None = None) -> torch.Tensor:
        """Shared stream and task streams (``task_mode="own"`` with equal task ranks, or ``"shared_ab"``:
        :meth:`_task_low_rank`) in one ``baddbmm`` that writes the stacked output directly (no concatenation of
        full-width outputs): every stream adds its low-rank update to ``W x_shared + b``; the ranks are zero-padded
        to the larger one (exact: padded terms add 0).

        Args:
            xs: shared rows ``[M, ..., in]``; xt: task rows ``[T*M, ..., in]``.
            sources: the shared and task rows' ``source`` (:func:`low_rank_down`), or None.

        Returns:
            ``[(1+T)*M, ..., out]``.
        """
        T, n = len(tasks), xs.numel() // self.in_features
        base = self.base(xs)
        src_shared, src_tasks = sources if sources is not None else (None, None)
        z_shared, c = self._shared_down(xs, src_shared)
        z_shared = z_shared * (self.scale * c)
        z_tasks, up_tasks = self._task_low_rank(xt, tasks, src_tasks)
        R = max(self.r, up_tasks.shape[1])
        z = torch.cat([nn.functional.pad(z_shared, (0, R - self.r)).unsqueeze(0),
                       nn.functional.pad(z_tasks, (0, R - up_tasks.shape[1]))])
        up = torch.cat([nn.functional.pad(self.lora_B.t(), (0, 0, 0, R - self.r)).unsqueeze(0),
                        nn.functional.pad(up_tasks, (0, 0, 0, R - up_tasks.shape[1]))])
        base = base.reshape(1, n, self.out_features)
        out = torch.baddbmm(base, z, up).view((T + 1) * xs.shape[0], *xs.shape[1:-1], self.out_features)
        if _recording() and out.requires_grad:  # recomputable from one stream of W x + b and rank-R factors
            _tag(out, Recipe(_low_rank_sum, (base, z, up), out.shape, "low_rank"))
        return out

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    @torch.no_grad()
    def merge(self) -> bool:
        """Fold the shared branch into the frozen weight, ``W <- W + s B A``, for inference (eval mode only).

        Only layers whose task streams do not use the shared weight differently (``task_mode="none"``) are merged:
        in MTLoRA's "matrix" mode a task stream adds no shared LoRA term. Returns whether the layer was merged.
        """
        if self.merged or self.r == 0 or self.task_mode != "none":
            return False
        self.__dict__["_unmerged_weight"] = self.base.weight.detach().clone()
        self.base.weight.add_((self.lora_B @ self.lora_A) * self.scale)
        return True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the frozen weight bit-exactly (the pre-merge copy)."""
        if self.merged:
            self.base.weight.copy_(self._unmerged_weight)
            self.__dict__["_unmerged_weight"] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b + s · B A dropout(x)`` on a single stream; per stream (class docstring) on stacked streams.

        Raises:
            MtbenchError: a merged layer in training mode (its LoRA would get no gradient).
        """
        if self.merged:
            if self.training:
                raise MtbenchError("a merged LoRA layer cannot train; call unmerge() first")
            return self.base(x)
        layout = current_layout()
        source = _source_of(x) if self.training else None
        if layout is None or layout.names == (SHARED,) or self.task_mode == "none":
            return self._shared_forward(x, source=source)
        if layout.has_shared:
            if layout.names[0] != SHARED:
                raise MtbenchError(f"the shared stream must come first, got {layout.names}")
            xs, xt = first_and_rest(x, layout.size)
            parts = None if source is None else source.first_and_rest(layout.size)
            ss, st = (None, None) if parts is None else parts
            if self.r > 0 and (self._equal_task_ranks(layout.tasks) or self.task_mode == "shared_ab"):
                return self._stacked_forward(xs, xt, layout.tasks, (ss, st))
            base = self.base(xs)
            return torch.cat([self._shared_forward(xs, base, ss), self.task_outputs(xt, layout.tasks, base, st)])
        return self.base(x) + self.task_deltas(x, layout.tasks, source)

    def split_forward(self, x: torch.Tensor, skip_rows: int,
                      make_task_inputs: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer at a split point: shared stream and task streams from one shared input (MTLoRA and TADFormer
        ``proj`` in the last block of each stage).

        One dropout mask: the task inputs are ``make_task_inputs(dropout(x)[:, skip_rows:])`` (official MTLoRA
        ``models/lora.py``, official TADFormer ``models/lora.py``: the TPC reads the dropped-out input).

        Args:
            x: shared input ``[M, L, in]``.
            skip_rows: leading rows of dim 1 (prompt tokens) that only the shared stream keeps.
            make_task_inputs: ``[M, L - skip_rows, in] -> [T*M, L - skip_rows, in]``. None, or a callable whose
                attribute ``repeats_shared_input`` is true (the encoder's default split): every task stream reads the
                shared stream's dropped-out input (MTLoRA). Then the task branches' down-projections are one matmul
                on that input with the tasks' ``A`` stacked, and no per-task copy of it is made or kept for backward.

        Returns:
            ``(shared output [M, L, out], task outputs [T*M, L - skip_rows, out])``.
        """
        layout = current_layout()
        base = self.base(x)
        if self.r > 0:
            d = self.lora_dropout(x)
            shared = base + self.up(d @ self.lora_A.t())
        else:
            d, shared = x, base
        rows = d[:, skip_rows:]
        same = make_task_inputs is None or getattr(make_task_inputs, "repeats_shared_input", False)
        if same and self._equal_task_ranks(layout.tasks):
            T, rank = len(layout.tasks), self.task_A[layout.tasks[0]].shape[0]
            a = torch.cat([self.task_A[t] for t in layout.tasks])  # [T*r, in]
            z = (rows.reshape(-1, self.in_features) @ a.t()).view(-1, T, rank).transpose(0, 1)  # [T, N, r]
            lead = (T * rows.shape[0], *rows.shape[1:-1])
            return shared, self._add_task_updates(base[:, skip_rows:], z, self._task_ups(layout.tasks), lead)
        task_in = repeat_streams(rows, len(layout.tasks)) if same else make_task_inputs(rows)
        if self.task_mode == "none":
            task = self.base(task_in) + (self.up(task_in @ self.lora_A.t()) if self.r > 0 else 0)
            return shared, task
        return shared, self.task_outputs(task_in, layout.tasks, base[:, skip_rows:])

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale}, "
                f"task_mode={self.task_mode}, tasks={self.tasks}")


@contextmanager
def merged_lora(model: nn.Module) -> Iterator[int]:
    """Merge every :class:`LoRALinear` of ``model`` for the ``with`` block (evaluation and inference timing), then
    restore the frozen weights exactly. Yields the number of merged layers."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    n = sum(layer.merge() for layer in layers)
    try:
        yield n
    finally:
        for layer in layers:
            layer.unmerge()


def inject_lora(
    root: nn.Module,
    targets: Sequence[str],
    make: Callable[[str, nn.Linear], LoRALinear | None],
) -> dict[str, LoRALinear]:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by ``make(full_name, linear)``.

    Args:
        root: module tree to modify in place.
        targets: attribute names to match (e.g. ``("qkv", "proj", "fc1", "fc2")``, ``("reduction",)``); matching is
            by the module's own attribute name, as peft's suffix match.
        make: factory returning the wrapper, or None to leave that linear alone.

    Returns:
        ``{full module name: wrapper}`` of every replaced layer, in module order.

    Raises:
        MtbenchError: no module matched any target.
    """
    replaced: dict[str, LoRALinear] = {}
    for name, module in list(root.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                wrapper = make(full, child)
                if wrapper is not None:
                    setattr(module, child_name, wrapper)
                    replaced[full] = wrapper
    if not replaced:
        raise MtbenchError(f"no linear layer named any of {list(targets)} found")
    return replaced


def inject_block_lora(
    backbone: nn.Module,
    r: int,
    scale: float,
    dropout: float,
    task_ranks: Mapping[str, int] | None = None,
) -> list[LoRALinear]:
    """Wrap ``qkv``, ``proj``, ``fc1``, ``fc2`` of every Swin block in a :class:`LoRALinear` of rank ``r``.

    This is the shared (TA-LoRA / TS-module) placement of MTLoRA §3.2 and TADFormer §3.2 (Eq. 1). With
    ``task_ranks``, ``proj``, ``fc1`` and ``fc2`` of the last block of each stage also get one task-specific branch
    per task (MTLoRA's TS-LoRA); ``qkv`` stays shared.

    Args:
        backbone: a :class:`mtbench.swin.SwinBackbone` (modified in place).
        r, scale, dropout: shared-branch rank, raw scale and input dropout.
        task_ranks: ``{task: rank}`` of the task branches in each stage's last block, or None.

    Returns:
        The wrappers, in block order.
    """
    layers = []
    for i in range(backbone.num_stages):
        blocks = backbone.blocks(i)
        for b, block in enumerate(blocks):
            for parent, names in ((block.attn, ("qkv", "proj")), (block.mlp, ("fc1", "fc2"))):
                for name in names:
                    ranks = task_ranks if task_ranks and b == len(blocks) - 1 and name != "qkv" else None
                    layer = LoRALinear(getattr(parent, name), r, scale, dropout, task_ranks=ranks)
                    setattr(parent, name, layer)
                    layers.append(layer)
    return layers


def recompute_lora_inputs(model: nn.Module) -> int:
    """Let every :class:`LoRALinear` whose input is a LayerNorm's or GELU's output recompute that input in backward
    instead of keeping a copy: Swin blocks' ``norm2`` -> ``mlp.fc1``, ``mlp.act`` -> ``mlp.fc2``, PatchMerging's
    ``norm`` -> ``reduction``. The MLP's ``nn.GELU`` becomes a :class:`LowRankGELU` (the same function), which in a
    split block keeps one stream of ``W x + b`` and rank-R factors for backward instead of every stream's ``fc1``
    output.

    A forward hook marks the producer's output with a :class:`Recipe`; a LoRA layer uses the mark only when its input
    *is* that output, unchanged (same tensor, same version, the recipe's tensors unchanged), so a method that changes
    the tensor in between (a ``mlp_input`` hook) just keeps the saved copy. Exact in value; the gradients equal the
    saved-copy path's to float rounding (tested). Active under :func:`lora_input_recompute` (``--activation-checkpoint
    lora_inputs`` and up). Idempotent.

    Returns:
        The number of producers hooked.
    """
    n = 0
    for module in model.modules():
        if type(getattr(module, "act", None)) is nn.GELU and isinstance(getattr(module, "fc2", None), LoRALinear):
            module.act = LowRankGELU(approximate=module.act.approximate)
        pairs = (("norm2", getattr(getattr(module, "mlp", None), "fc1", None)),
                 ("act", getattr(module, "fc2", None)), ("norm", getattr(module, "reduction", None)))
        for name, consumer in pairs:
            producer = getattr(module, name, None)
            if isinstance(consumer, LoRALinear) and isinstance(producer, (nn.LayerNorm, nn.GELU)):
                if not getattr(producer, "_mtbench_tagged", False):
                    producer.register_forward_hook(_tag_source)
                    producer._mtbench_tagged = True
                n += 1
    return n
