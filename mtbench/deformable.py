"""Multi-scale deformable attention (Deformable DETR), the core's one implementation, for any list of value maps.

Each query predicts, per head ``m``, ``P`` sampling offsets on every one of ``L`` value maps ("levels") and ``L*P``
attention weights softmaxed jointly; the head's output is the weighted sum of the values bilinearly sampled
(``F.grid_sample``, zeros outside the map, ``align_corners=False``) at ``reference + offset / (W_l, H_l)``. The
levels are any maps with the same channel width: a feature pyramid (Deformable DETR), the task feature maps of a
multi-task model (inter-task attention: :mod:`mtbench.intertask`), or one global map (TDSS's TSAI:
:mod:`mtbench.tsai`).

Source: Zhu et al., "Deformable DETR", ICLR 2021, §4.1 Eq. 3 (multi-scale deformable attention) and App. A.2
(initialisation); official repo ``fundamentalvision/Deformable-DETR``, ``models/ops/functions/ms_deform_attn_func.py``
(``ms_deform_attn_core_pytorch``, the pure-PyTorch form) and ``models/ops/modules/ms_deform_attn.py`` (the module and
its ``_reset_parameters``). Written here from the paper and those descriptions, not copied. The CUDA kernel of the
official repo is not used: this pure-PyTorch form runs on CPU and CUDA; no well-kept pip package providing the op
installs and runs on CPU here (mmcv's op needs a compiled build; torchvision has no multi-scale deformable attention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtbench.errors import MtbenchError


def ms_deform_attn_sample(values: Sequence[torch.Tensor], locations: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """The sampling core: weighted sum of bilinearly sampled values (Deformable DETR Eq. 3 without projections).

    Args:
        values: ``L`` tensors ``[B, M, D, H_l, W_l]`` (``M`` heads of ``D`` channels each).
        locations: ``[B, Nq, M, L, P, 2]`` sampling points as ``(x, y)`` in ``[0, 1]`` of each level's extent
            (``0`` = left/top edge, ``1`` = right/bottom edge; pixel ``i`` has its centre at ``(i + 0.5) / W``).
        weights: ``[B, Nq, M, L, P]`` attention weights (normally softmaxed over ``L*P``).

    Returns:
        ``[B, Nq, M*D]``, heads concatenated.

    Raises:
        MtbenchError: shapes that do not agree.
    """
    B, Nq, M, L, P, _ = locations.shape
    if len(values) != L or weights.shape != (B, Nq, M, L, P):
        raise MtbenchError(f"deformable attention: {len(values)} value levels, locations {tuple(locations.shape)}, "
                           f"weights {tuple(weights.shape)} do not agree")
    D = values[0].shape[2]
    grids = 2 * locations - 1  # grid_sample's [-1, 1] (align_corners=False: -1 = the left edge of pixel 0)
    sampled = []
    for lvl, v in enumerate(values):
        g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(B * M, Nq, P, 2)  # [B*M, Nq, P, 2]
        sampled.append(F.grid_sample(v.reshape(B * M, D, *v.shape[-2:]), g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [B*M, D, Nq, P]
    stacked = torch.stack(sampled, dim=-2)  # [B*M, D, Nq, L, P]
    w = weights.permute(0, 2, 1, 3, 4).reshape(B * M, 1, Nq, L, P)
    out = (stacked * w).sum(dim=(-1, -2))  # [B*M, D, Nq]
    return out.view(B, M * D, Nq).transpose(1, 2)


def grid_reference_points(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Pixel centres of an ``height x width`` map as normalised ``(x, y)``: ``[height*width, 2]``, row-major."""
    ys = (torch.arange(height, device=device, dtype=dtype or torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype or torch.float32) + 0.5) / width
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR's ``MSDeformAttn``).

    Args:
        dim: query and value width ``C`` (divisible by ``heads``).
        heads: ``M`` (DETR default 8).
        levels: ``L``, the number of value maps.
        points: ``P`` sampling points per head and level (DETR default 4).

    Shapes: ``forward(query [B, Nq, C], reference [B, Nq, 2] or [Nq, 2] normalised (x, y), values: L maps
    [B, C, H_l, W_l])`` -> ``[B, Nq, C]``. Offsets are in pixels of each level (normalised by its ``(W_l, H_l)``).

    Initialisation (DETR App. A.2 / ``_reset_parameters``): offset weights 0 and offset bias a radial grid (head
    ``m`` at angle ``2*pi*m/M``, point ``k`` at radius ``k+1``, normalised by the larger coordinate); attention-weight
    layer 0 (uniform weights); value and output projections Xavier-uniform with bias 0.

    Raises:
        MtbenchError: ``dim`` not divisible by ``heads``; a number of value maps other than ``levels``.
    """

    def __init__(self, dim: int, heads: int = 8, levels: int = 4, points: int = 4):
        super().__init__()
        if dim % heads:
            raise MtbenchError(f"deformable attention: dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.levels, self.points = dim, heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        grid = grid * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, values: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(values) != self.levels:
            raise MtbenchError(f"deformable attention built for {self.levels} levels got {len(values)} value maps")
        B, Nq, _ = query.shape
        M, L, P = self.heads, self.levels, self.points
        D = self.dim // M
        vals = []
        for v in values:
            h, w = v.shape[-2:]
            pv = self.value_proj(v.flatten(2).transpose(1, 2))  # [B, h*w, C]
            vals.append(pv.transpose(1, 2).reshape(B, M, D, h, w))
        offsets = self.sampling_offsets(query).view(B, Nq, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Nq, M, L * P).softmax(-1).view(B, Nq, M, L, P)
        norm = torch.tensor([[v.shape[-1], v.shape[-2]] for v in values], dtype=query.dtype, device=query.device)
        if reference.dim() == 2:
            reference = reference.unsqueeze(0).expand(B, -1, -1)
        loc = reference[:, :, None, None, None, :] + offsets / norm[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn_sample(vals, loc, weights))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, levels={self.levels}, points={self.points}"
