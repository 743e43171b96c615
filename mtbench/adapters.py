"""Bottleneck adapters (Houlsby and PHM/Compacter) and the block extension that places them, for every adapter-based
method (Adapter, VL-Adapter, Compacter, Compacter++).

* :class:`BottleneckAdapter` — Houlsby et al. (ICML 2019, §2.1, Fig. 2): ``h + up(act(down(h)))`` on a sublayer's
  output, before the block's residual. Layout as the multi-task adapter code ``rabeehk/compacter``
  ``seq2seq/adapters/adapter_modeling.py`` (down, non-linearity, up; weights near zero so the adapter starts close to
  the identity); no adapter LayerNorm (``add_layer_norm_before_adapter=false`` there).
* :class:`PHMLinear` — the parameterised hypercomplex multiplication layer of Compacter (Karimi Mahabadi et al.,
  NeurIPS 2021, §3, Eq. 3-4; official ``rabeehk/compacter`` ``hypercomplex/layers.py::PHMLinear``):
  ``W = sum_i A_i ⊗ B_i`` with ``n`` rule matrices ``A_i`` (``n x n``, shared by every PHM layer of the model,
  ``shared_phm_rule``) and ``B_i = s_i t_iᵀ`` of rank 1 (``factorized_phm``, ``phm_rank=1``).
* :class:`AdapterExtension` — a :class:`mtbench.encoder.BlockExtension` putting one adapter after attention
  (``attn_output``) and/or after the MLP (``mlp_output``) of a block, per task or shared through
  :class:`mtbench.streams.TaskIndexed` (its ``share`` flag is the shared/dedicated convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtbench.encoder import BlockExtension
from mtbench.errors import MtbenchError
from mtbench.streams import TaskIndexed


def bottleneck_width(dim: int, reduction: int, method: str, key: str = "reduction") -> int:
    """An adapter's hidden width ``C // reduction`` (Houlsby et al. 2019, §2.1; the ``reduction_factor`` of
    ``rabeehk/compacter`` and ``rabeehk/hyperformer``), the one rule of every adapter-based method.

    Args:
        dim: channels ``C`` of the sublayer output.
        reduction: the method's option ``key`` (a positive integer, checked by its config).
        method, key: named in the error.

    Returns:
        ``dim // reduction`` (at least 1).

    Raises:
        MtbenchError: when ``dim // reduction`` is 0, naming ``C``, the value and the largest accepted one. The width is
            never clamped to 1: a clamp would give ``reduction=64`` and ``reduction=1000`` the same model under two
            result keys.
    """
    width = dim // reduction
    if width < 1:
        raise MtbenchError(f"{method}: bottleneck C // {key} is 0 for C={dim} with {key}={reduction}; "
                           f"accepted: {key} <= {dim}")
    return width


#: Where an adapter may sit in a Swin block.
ADAPTER_POSITIONS = ("attn", "mlp")


class BottleneckAdapter(nn.Module):
    """Houlsby adapter ``h + up(act(down(h)))`` (Houlsby et al. 2019, §2.1).

    Args:
        dim: channels ``C`` of the sublayer output.
        bottleneck: hidden width (Swin-T default ``C/4``: 24/48/96/192).
        init_std: std of the normal init of both projections (biases zero): near zero, so the adapter starts close to
            the identity (Houlsby §2.1; ``rabeehk/compacter`` ``init_linear_layer``, std 1e-2).

    Shapes: ``[..., C]`` -> ``[..., C]``.
    """

    def __init__(self, dim: int, bottleneck: int, init_std: float = 1e-2):
        super().__init__()
        if bottleneck <= 0:
            raise MtbenchError(f"adapter bottleneck must be > 0, got {bottleneck} for C={dim}")
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h), approximate="tanh"))


class PHMRule(nn.Module):
    """The ``n`` rule matrices ``A_i`` ``[n, n, n]`` shared by every :class:`PHMLinear` of a model (Compacter
    ``shared_phm_rule``). Init normal with std ``init_range`` (official ``phm_c_init="normal"``)."""

    def __init__(self, n: int = 4, init_range: float = 1e-2):
        super().__init__()
        self.n = n
        self.rule = nn.Parameter(torch.randn(n, n, n) * init_range)


class PHMLinear(nn.Module):
    """A linear map ``y = x W + b`` with ``W = sum_i A_i ⊗ (s_i t_iᵀ)`` (Compacter Eq. 3-4, rank-1 ``B_i``).

    Args:
        in_features, out_features: both divisible by ``n``.
        rule: the shared :class:`PHMRule` (kept by reference, not registered here; its owner declares it).
        bias: learn a bias ``[out]``.

    Attributes:
        left: ``s_i`` ``[n, in/n, 1]``; right: ``t_i`` ``[n, 1, out/n]`` (glorot-uniform, official default).

    Shapes: ``[..., in]`` -> ``[..., out]``.

    Raises:
        MtbenchError: a dimension not divisible by ``n``.
    """

    def __init__(self, in_features: int, out_features: int, rule: PHMRule, bias: bool = True):
        super().__init__()
        n = rule.n
        if in_features % n or out_features % n:
            raise MtbenchError(f"PHM layer {in_features}->{out_features}: both dimensions must be divisible by n={n}")
        self.in_features, self.out_features, self.n = in_features, out_features, n
        self.__dict__["phm_rule"] = rule
        self.left = nn.Parameter(torch.empty(n, in_features // n, 1))
        self.right = nn.Parameter(torch.empty(n, 1, out_features // n))
        for p in (self.left, self.right):
            bound = math.sqrt(6.0 / (p.shape[1] + p.shape[2]))
            nn.init.uniform_(p, -bound, bound)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def weight(self) -> torch.Tensor:
        """The dense ``W`` ``[in, out]`` = ``sum_i kron(A_i, s_i t_iᵀ)``."""
        n = self.n
        B = self.left @ self.right  # [n, in/n, out/n]
        # kron(A_i, B_i)[a*p + c, b*q + d] = A_i[a, b] * B_i[c, d]
        W = torch.einsum("iab,icd->acbd", self.phm_rule.rule, B)
        return W.reshape(n * B.shape[1], n * B.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight()
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, n={self.n}"


class PHMAdapter(nn.Module):
    """Compacter adapter: ``h + up(act(down(h)))`` with :class:`PHMLinear` projections (Compacter §3).

    Shapes: ``[..., C]`` -> ``[..., C]``.
    """

    def __init__(self, dim: int, bottleneck: int, rule: PHMRule):
        super().__init__()
        self.down = PHMLinear(dim, bottleneck, rule)
        self.up = PHMLinear(bottleneck, dim, rule)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h), approximate="tanh"))


class AdapterExtension(BlockExtension):
    """Adapters after a block's attention and/or MLP, one per task (``share="dedicated"``) or one for every stream.

    Args:
        make: ``make(dim) -> nn.Module`` building one adapter for the block's width.
        dim: block width ``C``.
        tasks: task names.
        share: ``shared`` | ``dedicated`` (:class:`mtbench.streams.TaskIndexed`).
        positions: subset of :data:`ADAPTER_POSITIONS`.

    Shapes: hook tensors NHWC ``[S*B, H, W, C]``, streams stacked per the block's layout.

    Raises:
        MtbenchError: an unknown position.
    """

    def __init__(self, make: Callable[[int], nn.Module], dim: int, tasks: Sequence[str], share: str,
                 positions: Sequence[str] = ADAPTER_POSITIONS):
        super().__init__()
        bad = [p for p in positions if p not in ADAPTER_POSITIONS]
        if bad or not positions:
            raise MtbenchError(f"adapter positions {bad or '(none)'} invalid; valid: {', '.join(ADAPTER_POSITIONS)}")
        self.adapters = nn.ModuleDict({p: TaskIndexed(tasks, lambda t: make(dim), share=share) for p in positions})

    def attn_output(self, ctx, inp, out):
        return self.adapters["attn"](out) if "attn" in self.adapters else out

    def mlp_output(self, ctx, inp, out):
        return self.adapters["mlp"](out) if "mlp" in self.adapters else out
