"""Single-task full fine-tuning: one fully trainable backbone and decoder per task.

The reference row of every dense-MTL table (MTLoRA, CVPR 2024, Table 1 "Single Task"; TADFormer, CVPR 2025, Table 1)
and the baseline of Δm. Its single-task metrics on the embedded dataset are the references shipped in
``mtbench/assets/single_task_references.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtbench.config import MethodConfig
from mtbench.model import MultiTaskModel
from mtbench.registry import PaperCount, register_method
from mtbench.swin import ROLES


@dataclass
class SingleTaskConfig(MethodConfig):
    """No options: every backbone parameter and the decoder train, one copy per task."""


@register_method(
    "single_task",
    config=SingleTaskConfig,
    paper="Single-task full fine-tuning (reference row of MTLoRA CVPR'24 / TADFormer CVPR'25 Table 1)",
    code="-",
    summary="one fully fine-tuned backbone + decoder per task (T backbone passes)",
    paper_counts=[PaperCount({}, 112.62, "MTLoRA / TADFormer Table 1", exact=112_017_896,
                             note="official MTLoRA code gives 112.02M; the printed 112.62M comes from an older "
                                  "benchmark with a larger decoder (not confirmed)")],
)
class SingleTask(MultiTaskModel):
    """T independent models; ``encode`` runs task ``t``'s backbone for task ``t`` only.

    Shapes: images ``[B,3,H,W]`` -> ``{task: [B,C_t,H,W]}``.
    """

    def __init__(self, backbone, tasks, cfg: SingleTaskConfig):
        super().__init__(backbone, tasks)
        task_backbones = {t.name: backbone.clone() for t in tasks[1:]}
        task_backbones[tasks[0].name] = backbone
        del self.backbone
        self.backbone = None
        self.task_backbones = nn.ModuleDict({t.name: task_backbones[t.name] for t in tasks})
        self.unfreeze_backbone(*ROLES)

    def encode(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        return {t: self.task_backbones[t](images) for t in self.task_names}
