"""TSAI, TDSS's decoder: per-task scale fusion (neck) -> branch synergy with the global feature (interaction) ->
per-task convolutional prediction head. Registered as the decoder ``tsai`` (usable under any method, e.g.
``decoder_only --decoder tsai`` is TDSS Table 4(a)'s "+TSAI" row); the default decoder of ``tdss``.

Source: Task-Synergistic Adaptation Interaction, TDSS (AAAI 2026) §4.3, Eq. 8 and Fig. 2(d); no official code exists.

* **Scale fusion** (per task, "the MLP-based design in SegFormer", Xie et al. NeurIPS 2021 §3.2, official
  ``NVlabs/SegFormer mmseg/models/decode_heads/segformer_head.py``): a linear layer (1x1 conv) from each of the four
  taps to ``dim``, bilinear upsampling to the first tap's size, concatenation and a 1x1 conv ``4*dim -> dim`` with
  BatchNorm and ReLU. Output ``X^t`` ``[B, dim, H/8, W/8]`` (the paper writes ``H/4``: its first feature is the
  stage-1 output before PatchMerging; mtbench's taps follow MTLoRA, whose first tap is at stride 8).
* **Branch synergy** (shared by all tasks, Eq. 8), ``K`` layers: ``X^g = sum_t X^t``;
  ``X^t <- X^t + DeformAttn(LN(X^t), LN(X^g))``; ``X^t <- X^t + FFN(LN(X^t))``. ``DeformAttn`` is
  :class:`mtbench.deformable.MSDeformAttn` ("sparse attention (Zhu et al. 2021)") with one level, the global map,
  and each query's pixel centre as reference point. The global feature is recomputed from the current task features
  at every layer ("this interaction process is repeated for K layers"; our reading).
* **Head** (per task, "convolutional layers to perform channel projection"): 3x3 conv + BN + ReLU, 1x1 conv to the
  task's channels, bilinear upsampling to the input size.

Unstated in the paper, chosen here: ``dim = 64``, 8 heads and 4 points in the deformable attention (Deformable DETR's
defaults), FFN ratio 4, LayerNorms before attention and FFN as Eq. 8 writes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtbench.deformable import MSDeformAttn, grid_reference_points

#: TSAI's token width (not stated in the paper).
TSAI_DIM = 64


class TSAITaskDecoder(nn.Module):
    """One task's scale fusion (``neck``) and prediction head (``head``).

    Args:
        in_dims: channels of the four taps; out_channels: the task's output channels; dim: fusion width.

    Shapes: ``neck(4 NCHW maps)`` -> ``[X^t [B, dim, h_0, w_0]]``; ``head([X], size)`` -> ``[B, out, *size]``.
    """

    def __init__(self, in_dims: Sequence[int], out_channels: int, dim: int = TSAI_DIM):
        super().__init__()
        self.linears = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_dims)
        self.fuse = nn.Sequential(nn.Conv2d(len(in_dims) * dim, dim, 1, bias=False), nn.BatchNorm2d(dim),
                                  nn.ReLU(inplace=True))
        self.pred = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
                                  nn.ReLU(inplace=True), nn.Conv2d(dim, out_channels, 1))

    def neck(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        feats = [f.contiguous() for f in feats]  # the encoder hands channels-last views (see HRNetHead)
        size = feats[0].shape[-2:]
        ups = [F.interpolate(lin(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size
               else lin(f) for lin, f in zip(self.linears, feats)]
        return [self.fuse(torch.cat(ups, dim=1))]

    def head(self, reduced: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.pred(reduced[0]), size=size, mode="bilinear", align_corners=False)


class SynergyLayer(nn.Module):
    """One branch-synergy layer (TDSS Eq. 8) for all tasks at once.

    Shapes: ``forward(x [B, T*N, C], global [B, C, h, w], reference [T*N, 2])`` -> ``[B, T*N, C]``.
    """

    def __init__(self, dim: int, heads: int = 8, points: int = 4, ffn_ratio: float = 4.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_g = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(dim, heads=heads, levels=1, points=points)
        self.norm_ffn = nn.LayerNorm(dim)
        hidden = int(dim * ffn_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, glob: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        g = self.norm_g(glob.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(glob.shape)
        x = x + self.attn(self.norm_q(x), reference, [g])
        return x + self.ffn(self.norm_ffn(x))


class BranchSynergy(nn.Module):
    """TSAI's interaction stage: ``K`` :class:`SynergyLayer` s between each task and the global feature (sum of the
    task features, recomputed at each layer). ``K = 0`` is the identity (Table 4(a)'s "+TDSA" row: fusion + heads).

    Shapes: ``forward({task: [X^t [B, C, h, w]]})`` -> ``({task: [X_s^t]}, {})``.
    """

    def __init__(self, tasks: Sequence[str], dim: int = TSAI_DIM, layers: int = 4, heads: int = 8, points: int = 4,
                 ffn_ratio: float = 4.0):
        super().__init__()
        self.tasks = list(tasks)
        self.layers = nn.ModuleList(SynergyLayer(dim, heads, points, ffn_ratio) for _ in range(layers))

    def forward(self, feats: dict[str, list[torch.Tensor]]) -> tuple[dict[str, list[torch.Tensor]], dict]:
        if not len(self.layers):
            return feats, {}
        maps = torch.stack([feats[t][0] for t in self.tasks], 1)  # [B, T, C, h, w]
        B, T, C, h, w = maps.shape
        x = maps.permute(0, 1, 3, 4, 2).reshape(B, T * h * w, C)
        ref = grid_reference_points(h, w, x.device, x.dtype).repeat(T, 1)
        for layer in self.layers:
            glob = x.view(B, T, h * w, C).sum(1).transpose(1, 2).reshape(B, C, h, w)
            x = layer(x, glob, ref)
        out = x.view(B, T, h, w, C).permute(1, 0, 4, 2, 3)
        return {t: [out[i]] for i, t in enumerate(self.tasks)}, {}
