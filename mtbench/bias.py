"""Bias tuning of the frozen backbone, shared or one copy per task (BitFit, Ben Zaken et al., ACL 2022, §2).

Every bias-bearing backbone module is wrapped: its frozen weight stays where it is, its pretrained bias is frozen and
no longer used, and a trainable copy of the bias is applied per stream of the stacked batch through
:class:`mtbench.streams.TaskIndexed` (one copy for every stream with ``share="shared"``, one per task with
``share="dedicated"``). Wrapped (structurally, by module type, never by parameter name): every ``nn.Linear`` with a
bias (``qkv``, ``proj``, ``fc1``, ``fc2``), every ``nn.LayerNorm`` (blocks, PatchMerging, patch embedding), and the
patch-embedding convolution. With ``rel_pos=True`` the relative-position tables of every block are tuned the same
way (:class:`RelPosTables`, a block extension feeding :meth:`mtbench.encoder.BlockExtension.rel_pos_bias`).

At initialisation each copy equals the pretrained value, so the wrapped backbone computes what the original did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtbench.encoder import BlockExtension
from mtbench.streams import TaskIndexed


class BiasCopy(nn.Module):
    """A trainable copy of a pretrained bias, added along ``dim`` (``-1`` for NHWC/linear, ``1`` for NCHW)."""

    def __init__(self, init: torch.Tensor, dim: int = -1):
        super().__init__()
        self.bias = nn.Parameter(init.detach().clone())
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim == -1:
            return x + self.bias
        shape = [1] * x.ndim
        shape[self.dim] = -1
        return x + self.bias.view(shape)


class _Biased(nn.Module):
    def __init__(self, base: nn.Module, tasks: Sequence[str], share: str, dim: int = -1):
        super().__init__()
        self.base = base
        self.task_bias = TaskIndexed(tasks, lambda t: BiasCopy(base.bias, dim), share=share)

    def bias_parameters(self) -> list[nn.Parameter]:
        return list(self.task_bias.parameters())


class BiasedLinear(_Biased):
    """``x Wᵀ + b_t`` (frozen ``W``; ``b_t`` the stream's bias). Shapes ``[S*M, ..., in] -> [S*M, ..., out]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task_bias(F.linear(x, self.base.weight))


class BiasedLayerNorm(_Biased):
    """``LN(x; γ) + β_t`` (frozen ``γ``). Shapes ``[S*M, ..., C]`` -> same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.task_bias(F.layer_norm(x, self.base.normalized_shape, self.base.weight, None, self.base.eps))


class BiasedConv2d(_Biased):
    """A frozen convolution with the stream's bias. Shapes ``[S*B, C_in, H, W] -> [S*B, C_out, H', W']``."""

    def __init__(self, base: nn.Conv2d, tasks: Sequence[str], share: str):
        super().__init__(base, tasks, share, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        return self.task_bias(F.conv2d(x, b.weight, None, b.stride, b.padding, b.dilation, b.groups))


def inject_bias_tuning(root: nn.Module, tasks: Sequence[str], share: str) -> list[_Biased]:
    """Wrap every bias-bearing ``nn.Linear``, ``nn.LayerNorm`` and ``nn.Conv2d`` under ``root`` (module docstring).

    Args:
        root: module tree modified in place (the backbone).
        tasks: task names; share: ``shared`` | ``dedicated``.

    Returns:
        The wrappers, in module order (declare their :meth:`bias_parameters`).
    """
    kinds = ((nn.Linear, BiasedLinear), (nn.LayerNorm, BiasedLayerNorm), (nn.Conv2d, BiasedConv2d))
    made = []
    for name, module in list(root.named_modules()):
        if isinstance(module, _Biased):
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, _Biased) or getattr(child, "bias", None) is None:
                continue
            for cls, wrapper in kinds:
                if type(child) is cls:
                    w = wrapper(child, tasks, share)
                    setattr(module, child_name, w)
                    made.append(w)
                    break
    return made


class TableCopy(nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.detach().clone())


class RelPosTables(BlockExtension):
    """Trainable copies of a block's relative-position table ``[(2w-1)^2, heads]``, shared or per task; the block's
    bias is gathered from them per stream (Swin Eq. 4 with the stream's table).

    Shapes: :meth:`rel_pos_bias` -> ``[S, heads, N, N]`` for the ``S`` streams of ``ctx.layout`` (``S = 1`` shared).
    """

    def __init__(self, attn: nn.Module, tasks: Sequence[str], share: str):
        super().__init__()
        self.tables = TaskIndexed(tasks, lambda t: TableCopy(attn.relative_position_bias_table), share=share)
        self.register_buffer("index", attn.relative_position_index.detach().clone(), persistent=False)

    def rel_pos_bias(self, ctx, bias):
        N = self.index.shape[0]
        names = ctx.layout.names if self.tables.share == "dedicated" else ("shared",)
        tables = self.tables.stacked("table", names)  # [S, L, heads]
        return tables[:, self.index.reshape(-1)].view(len(names), N, N, -1).permute(0, 3, 1, 2)


__all__ = ["BiasCopy", "BiasedConv2d", "BiasedLayerNorm", "BiasedLinear", "RelPosTables", "TableCopy",
           "inject_bias_tuning"]
