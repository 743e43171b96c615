"""Test-only method on the core's seams: a per-task bias on every block's MLP output, shared or dedicated."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mtbench.config import MethodConfig
from mtbench.encoder import BlockExtension, StreamPlan
from mtbench.model import MultiTaskModel
from mtbench.streams import TaskIndexed


class AddBias(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class MLPBias(BlockExtension):
    """``mlp(x) + b_t`` on task t's rows ([S*B, H, W, C])."""

    def __init__(self, dim: int, tasks: list[str], share: str):
        super().__init__()
        self.bias = TaskIndexed(tasks, lambda t: AddBias(dim), share=share)

    def mlp_output(self, ctx, inp, out):
        return self.bias(out)


@dataclass
class TaskBiasConfig(MethodConfig):
    share: str = field(default="dedicated", metadata={"help": "shared | dedicated", "choices": ("shared", "dedicated")})


class TaskBias(MultiTaskModel):
    """Frozen Swin + a (per-task) bias after every block's MLP; dedicated = task streams from the patch embedding."""

    def __init__(self, backbone, tasks, cfg: TaskBiasConfig):
        super().__init__(backbone, tasks)
        if cfg.share == "dedicated":
            self.stream_plan = StreamPlan.dedicated()
        exts = self.extend_blocks(lambda stage, index, block: MLPBias(block.dim, self.task_names, cfg.share))
        self.add_method_params(nn.ModuleList(exts))
