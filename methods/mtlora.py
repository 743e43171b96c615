"""MTLoRA: low-rank adaptation for efficient multi-task learning (Agiza, Neseem, Reda; CVPR 2024).

Faithful to the official code ``scale-lab/MTLoRA`` (after commit bf26b4b "Fix missing MTLoRA modules"; facts in
``shared/reference/mtlora.md``):

* TA-LoRA (task-agnostic, §3.2) of rank ``r`` on ``qkv``, ``proj``, ``fc1``, ``fc2`` of every block.
* TS-LoRA (task-specific, §3.2) of rank ``task_r`` (4 in every released config) on ``proj``, ``fc1``, ``fc2`` of the
  last block of each stage; ``qkv`` stays shared.
* Raw scale ``s = 4.0`` for both kinds, dropout 0.05, A kaiming-uniform (a=√5), B zero (``models/lora.py``).
* Last block of each stage ("matrix" shared mode, ``lora.py``): the shared stream computes
  ``W x + b + s·B A x``; task ``t`` computes ``W x_shared + b + s·B_t A_t x_t`` — the frozen ``W`` always acts on the
  shared input and the task output has no shared LoRA term. Task streams keep their own residuals inside the block,
  go through the shared PatchMerging (once per task) and feed only their own decoder; the next stage consumes the
  shared stream.
* Trainable besides LoRA: patch embedding, all LayerNorms, relative-position tables and PatchMerging reductions
  (``mark_only_lora_as_trainable``); qkv/proj/fc biases stay frozen.

Variant ``mtlora_plus`` (``plus=true``; official ``DOWNSAMPLER_ENABLED``): a TA-LoRA of rank ``r`` on each PatchMerging
reduction, the reductions themselves frozen.

#TP on Swin-T/PASCAL-Context (4 tasks, MTLoRA decoder) = 3,822,650 + 70,656·r (r=16/32/64: 4,953,146 / 6,083,642 /
8,344,634, the paper's 4.95 / 6.08 / 8.34M).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtbench.config import MethodConfig
from mtbench.errors import MtbenchError
from mtbench.lora import LoRALinear, inject_block_lora, inject_lora
from mtbench.model import MultiTaskModel, nhwc_to_nchw
from mtbench.registry import PaperCount, register_method
from mtbench.swin import partition_windows, reverse_windows, window_attention

_SRC = "MTLoRA CVPR'24 Table 1 (official code count, shared/reference/mtlora.md §2)"


@dataclass
class MTLoRAConfig(MethodConfig):
    r: int = field(default=16, metadata={"help": "rank r of the task-agnostic (TA) LoRA in every block"})
    task_r: int = field(default=4, metadata={"help": "rank of the task-specific (TS) LoRA in the last block per stage"})
    scale: float = field(default=4.0, metadata={"help": "raw LoRA scale s (official SHARED_SCALE)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on LoRA inputs"})
    plus: bool = field(default=False, metadata={
        "help": "MTLoRA+: TA-LoRA on PatchMerging reductions, reductions frozen"})

    def validate(self) -> None:
        super().validate()
        if self.r <= 0 or self.task_r <= 0:
            raise MtbenchError(f"mtlora: ranks must be > 0, got r={self.r}, task_r={self.task_r}")
        if not 0 <= self.dropout < 1:
            raise MtbenchError(f"mtlora: dropout must be in [0, 1), got {self.dropout}")


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

    def encode(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        bb = self.backbone
        x = bb.embed(images)
        feats: dict[str, list[torch.Tensor]] = {t: [] for t in self.task_names}
        for i in range(bb.num_stages):
            blocks = bb.blocks(i)
            for block in blocks[:-1]:
                x = block(x)
            x, task_x = self.task_block(blocks[-1], x)
            for t in self.task_names:
                feats[t].append(bb.merge(i, task_x[t]))
            if i < bb.num_stages - 1:
                x = bb.merge(i, x)
        return {t: nhwc_to_nchw(f) for t, f in feats.items()}

    def task_block(self, block, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Last block of a stage with shared and per-task streams (official "matrix" mode).

        Args:
            block: timm ``SwinTransformerBlock`` whose proj/fc1/fc2 carry TS-LoRA branches.
            x: NHWC ``[B,H,W,C]`` shared input.

        Returns:
            shared output ``[B,H,W,C]`` and ``{task: [B,H,W,C]}``.
        """
        shortcut = x
        windows, ctx = partition_windows(block, block.norm1(x))
        a = window_attention(block.attn, windows, block.attn_mask).values
        proj, mlp = block.attn.proj, block.mlp
        proj_base = proj.base(a)
        x1 = shortcut + block.drop_path1(reverse_windows(block, block.attn.proj_drop(proj_base + proj.delta(a)), ctx))
        y = {t: shortcut + block.drop_path1(reverse_windows(
            block, block.attn.proj_drop(proj_base + proj.task_delta(a, t)), ctx)) for t in self.task_names}

        n_sh = block.norm2(x1)
        fc1_base = mlp.fc1.base(n_sh)
        h_sh = mlp.norm(mlp.drop1(mlp.act(fc1_base + mlp.fc1.delta(n_sh))))
        fc2_base = mlp.fc2.base(h_sh)
        out = x1 + block.drop_path2(mlp.drop2(fc2_base + mlp.fc2.delta(h_sh)))
        tasks = {}
        for t in self.task_names:
            h_t = mlp.norm(mlp.drop1(mlp.act(fc1_base + mlp.fc1.task_delta(block.norm2(y[t]), t))))
            tasks[t] = y[t] + block.drop_path2(mlp.drop2(fc2_base + mlp.fc2.task_delta(h_t, t)))
        return out, tasks
