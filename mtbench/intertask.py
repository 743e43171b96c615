"""Inter-task attention in the decoder's interaction stage: full multi-head self-attention across all tasks' tokens
versus deformable inter-task self-attention.

**Reconstruction from an abstract.** Bohn et al., "Efficient Inter-Task Attention for Multitask Transformer Models"
(arXiv 2508.04422, 2025) propose "Deformable Inter-Task Self-Attention" and report "an order-of-magnitude reduction in
both FLOPs count and inference latency" against full multi-task multi-head attention, whose attention matrix grows
quadratically with the number of tasks. Only the abstract is available here (``shared/reference/methods.md`` §14) and
no official code exists, so both modules below are mtbench's reconstruction, with every hyperparameter configurable.
Assumptions (ours, not the authors'):

* Both run on one scale of the decoder necks' outputs, ``scale`` (default 0: the finest map, stride 8; on Swin-T at
  448x448 a 56x56 map per task), after a shared 1x1 projection of its ``C_s`` channels to ``dim`` (default 64) and a
  learned task embedding added to each task's tokens.
* One pre-norm transformer layer: ``z = z + Mix(LN(z))``, ``z = z + FFN(LN(z))`` (FFN ratio ``ffn_ratio``, GELU),
  then a shared projection back to ``C_s`` added to the task's map (zero-initialised, so the stage starts as the
  identity and any encoder method's decoder starts as without it).
* ``inter_task_mha`` (InvPT-style, Ye & Xu, ECCV 2022): ``Mix`` is multi-head self-attention over the ``T*h*w``
  tokens of all tasks (``F.scaled_dot_product_attention``), cost ``O((T*h*w)^2 * dim)``; no positional encoding
  (content-only, position-free attention, as the paper's baseline is not specified).
* ``inter_task_deformable``: ``Mix`` is :class:`mtbench.deformable.MSDeformAttn` whose levels are the ``T`` task maps:
  each query (task ``tau``, pixel ``p``) samples ``points`` points per head in every task's map around ``p`` and
  mixes them with weights softmaxed over ``T*points``; cost ``O(T*h*w * T*points*dim)``, linear in the tokens.

Shapes: ``forward({task: [4 NCHW neck maps]})`` -> ``({task: [4 maps]}, {})`` with the ``scale`` map of each task
replaced (same shape) and the others unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtbench.deformable import MSDeformAttn, grid_reference_points
from mtbench.errors import MtbenchError


class FullInterTaskMixer(nn.Module):
    """Multi-head self-attention over all tasks' tokens: ``[B, T*N, dim]`` -> same (no positional encoding)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, num_tasks: int, height: int, width: int) -> torch.Tensor:
        B, N, C = tokens.shape
        q, k, v = self.qkv(tokens).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, C/heads]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DeformableInterTaskMixer(nn.Module):
    """Deformable inter-task self-attention: the ``T`` task maps are the levels of one :class:`MSDeformAttn`.

    ``forward(tokens [B, T*h*w, dim], T, h, w)``: query ``(tau, p)`` has reference point ``p`` (pixel centre) in every
    task's map; returns ``[B, T*h*w, dim]``.
    """

    def __init__(self, dim: int, heads: int, num_tasks: int, points: int):
        super().__init__()
        self.attn = MSDeformAttn(dim, heads=heads, levels=num_tasks, points=points)

    def forward(self, tokens: torch.Tensor, num_tasks: int, height: int, width: int) -> torch.Tensor:
        B, _, C = tokens.shape
        maps = tokens.view(B, num_tasks, height, width, C).permute(1, 0, 4, 2, 3)  # [T, B, C, h, w]
        ref = grid_reference_points(height, width, tokens.device, tokens.dtype).repeat(num_tasks, 1)
        return self.attn(tokens, ref, list(maps))


class InterTaskAttention(nn.Module):
    """Interaction stage: one inter-task transformer layer on the ``scale`` neck map of every task (module docstring).

    Args:
        tasks: task names (their order fixes the token order and the levels).
        channels: widths of the neck outputs (e.g. ``(18, 36, 72, 144)``).
        mixer: ``"mha"`` (full attention across tasks) | ``"deformable"``.
        scale: which neck map (index into ``channels``) the layer runs on.
        dim: token width; ``heads``: attention heads; ``points``: deformable points per head and task map;
        ffn_ratio: FFN hidden width / ``dim``.

    Raises:
        MtbenchError: unknown mixer, scale out of range, ``dim`` not divisible by ``heads``.
    """

    def __init__(self, tasks: Sequence[str], channels: Sequence[int], mixer: str = "deformable", scale: int = 0,
                 dim: int = 64, heads: int = 4, points: int = 4, ffn_ratio: float = 2.0):
        super().__init__()
        if mixer not in ("mha", "deformable"):
            raise MtbenchError(f"inter-task mixer {mixer!r} is not one of mha, deformable")
        if not 0 <= scale < len(channels):
            raise MtbenchError(f"inter-task scale {scale} is not in 0..{len(channels) - 1}")
        if dim % heads:
            raise MtbenchError(f"inter-task dim {dim} is not divisible by heads {heads}")
        self.tasks, self.scale, self.mixer_name = list(tasks), scale, mixer
        c = channels[scale]
        self.in_proj = nn.Linear(c, dim)
        self.task_embed = nn.Parameter(torch.zeros(len(self.tasks), dim))
        nn.init.trunc_normal_(self.task_embed, std=0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = (FullInterTaskMixer(dim, heads) if mixer == "mha"
                      else DeformableInterTaskMixer(dim, heads, len(self.tasks), points))
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * ffn_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.out_proj = nn.Linear(dim, c)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, feats: dict[str, list[torch.Tensor]]) -> tuple[dict[str, list[torch.Tensor]], dict]:
        T = len(self.tasks)
        maps = torch.stack([feats[t][self.scale] for t in self.tasks], 1)  # [B, T, C, h, w]
        B, _, C, h, w = maps.shape
        tokens = maps.permute(0, 1, 3, 4, 2).reshape(B, T, h * w, C)
        z = (self.in_proj(tokens) + self.task_embed[None, :, None]).reshape(B, T * h * w, -1)
        z = z + self.mixer(self.norm1(z), T, h, w)
        z = z + self.ffn(self.norm2(z))
        delta = self.out_proj(z).view(B, T, h, w, C).permute(1, 0, 4, 2, 3)  # [T, B, C, h, w]
        out = {}
        for i, t in enumerate(self.tasks):
            maps_t = list(feats[t])
            maps_t[self.scale] = maps_t[self.scale] + delta[i]
            out[t] = maps_t
        return out, {}

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, scale={self.scale}, mixer={self.mixer_name}"
