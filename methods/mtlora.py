"""MTLoRA: low-rank adaptation for efficient multi-task learning (Agiza, Neseem, Reda; CVPR 2024).

Faithful to the official code ``scale-lab/MTLoRA`` (after commit bf26b4b "Fix missing MTLoRA modules"; facts in
``shared/reference/mtlora.md``):

* TA-LoRA (task-agnostic, §3.2) of rank ``r`` on ``qkv``, ``proj``, ``fc1``, ``fc2`` of every block.
* TS-LoRA (task-specific, §3.2) of rank ``task_r`` (4 in every released config) on ``proj``, ``fc1``, ``fc2`` of the
  last block of each stage; ``qkv`` stays shared.
* Raw scale ``s = 4.0`` for both kinds, dropout 0.05, A kaiming-uniform (a=√5), B zero (``models/lora.py``).
* Last block of each stage ("matrix" shared mode, ``lora.py``): the shared stream computes
  ``W x + b + s·B A x``; task ``t`` computes ``W x_shared + b + s·B_t A_t x_t`` — the frozen ``W`` always acts on the
  shared input and the task output has no shared LoRA term (:class:`mtbench.lora.LoRALinear`). The task streams
  split from the shared one at ``proj`` (attention and ``qkv`` are shared), keep their own residuals inside the
  block, go through the shared PatchMerging (stacked on the batch, one call) and feed only their own decoder; the
  next stage consumes the shared stream (:meth:`mtbench.encoder.StreamPlan.last_block_per_stage`).
* Dropout as the official code: one mask at ``proj`` for the shared and task branches, none on the task branches'
  inputs at ``fc1``/``fc2``.
* Trainable besides LoRA: patch embedding, all LayerNorms, relative-position tables and PatchMerging reductions
  (``mark_only_lora_as_trainable``); qkv/proj/fc biases stay frozen.

Variant ``mtlora_plus`` (``plus=true``; official ``DOWNSAMPLER_ENABLED``): a TA-LoRA of rank ``r`` on each PatchMerging
reduction, the reductions themselves frozen.

#TP on Swin-T/PASCAL-Context (4 tasks, MTLoRA decoder) = 3,822,650 + 70,656·r (r=16/32/64: 4,953,146 / 6,083,642 /
8,344,634, the paper's 4.95 / 6.08 / 8.34M).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtbench.config import MethodConfig, positive, probability
from mtbench.encoder import StreamPlan
from mtbench.lora import LoRALinear, inject_block_lora, inject_lora
from mtbench.model import MultiTaskModel
from mtbench.registry import PaperCount, register_method

_SRC = "MTLoRA CVPR'24 Table 1 (official code count, shared/reference/mtlora.md §2)"


@dataclass
class MTLoRAConfig(MethodConfig):
    r: int = field(default=16, metadata=positive("rank r of the task-agnostic (TA) LoRA in every block"))
    task_r: int = field(default=4, metadata=positive("rank of the task-specific (TS) LoRA in the last block per stage"))
    scale: float = field(default=4.0, metadata=positive("raw LoRA scale s (official SHARED_SCALE)"))
    dropout: float = field(default=0.05, metadata=probability("dropout on LoRA inputs"))
    plus: bool = field(default=False, metadata={
        "help": "MTLoRA+: TA-LoRA on PatchMerging reductions, reductions frozen"})


@register_method(
    "mtlora",
    config=MTLoRAConfig,
    paper="MTLoRA: Low-Rank Adaptation Approach for Efficient Multi-Task Learning (Agiza et al., CVPR 2024)",
    code="https://github.com/scale-lab/MTLoRA",
    summary="TA-LoRA in every block + TS-LoRA per task in the last block of each stage; task streams per stage",
    variants={"mtlora_plus": {"plus": True}},
    paper_counts=[
        PaperCount({"r": 16}, 4.95, _SRC, exact=4_953_146),
        PaperCount({"r": 32}, 6.08, _SRC, exact=6_083_642),
        PaperCount({"r": 64}, 8.34, _SRC, exact=8_344_634),
        PaperCount({"r": 16, "plus": True}, None, "MTLoRA+ (official configs; not in the paper's table)",
                   exact=3_469_370),
    ],
)
class MTLoRA(MultiTaskModel):
    """MTLoRA on a Swin backbone (module docstring). ``encode`` returns per-task features from the task streams.

    Shapes: images ``[B,3,H,W]`` -> ``{task: [B,C_t,H,W]}``.
    """

    def __init__(self, backbone, tasks, cfg: MTLoRAConfig):
        super().__init__(backbone, tasks)
        self.cfg = cfg
        task_ranks = {t.name: cfg.task_r for t in tasks}
        for layer in inject_block_lora(backbone, cfg.r, cfg.scale, cfg.dropout, task_ranks=task_ranks):
            self.add_method_params(layer.lora_parameters())
        roles = ["patch_embed", "norm", "rel_pos"]
        if cfg.plus:
            merges = inject_lora(backbone.stages, ("reduction",),
                                 lambda n, lin: LoRALinear(lin, cfg.r, cfg.scale, cfg.dropout))
            for layer in merges.values():
                self.add_method_params(layer.lora_parameters())
        else:
            roles.append("patch_merging")
        self.unfreeze_backbone(*roles)
        self.stream_plan = StreamPlan.last_block_per_stage(split_at="proj")
