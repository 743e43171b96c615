"""LoRA shared by all tasks (Hu et al., ICLR 2022) on a multi-task Swin: one backbone pass, one set of low-rank
updates for every task.

The "LoRA" row of MTLoRA (CVPR 2024, Table 1) and TADFormer (CVPR 2025, Table 1, §4.2: "applies low-rank
decomposition to the attention layers, using a rank of 4 and an adapter output scale of 4"). No official code exists
for this multi-task baseline (MTLoRA issue #8: "most likely" one LoRA shared by all tasks). The LoRA module follows
MTLoRA's ``models/lora.py`` (raw scale, A kaiming-uniform, B zero, dropout 0.05).

Conventions (``share``, TDSS Table 1 "LoRA(sha.)" / "LoRA(ded.)"): ``shared`` (default, MTLoRA's reading of its own
baseline) — one LoRA for every task, one backbone pass; ``dedicated`` — one LoRA per task on the same linears
(:class:`mtbench.lora.LoRALinear` task branches with no shared branch), the task streams stacked on the batch through
one frozen backbone call. Deviation in ``dedicated``: the core's task branches take no input dropout (MTLoRA's
task-branch convention), so the per-task LoRAs train without the 0.05 dropout. With a single task ``dedicated`` is
built as ``shared`` (the same model).

#TP on Swin-T/PASCAL-Context, 4 tasks: r=4 qkv LoRA is 16 x 4416 = 70,656 per set. On decoder ``polyhistor_hrnet``
(2,546,840): dedicated 2,829,464 (TADFormer "LoRA" / TDSS "LoRA(ded.)" print 2.87M, -1.4%); shared 2,617,496 (TDSS
"LoRA(sha.)" prints 2.68M, -2.3%). **The placement cannot be pinned down** (MTLoRA issue #8: its authors could not
say): 2.87M leaves ~81K per task above the decoder, 70,656 of which r=4 qkv explains; the remaining ~10K per task
(e.g. LayerNorms + rel-pos tables trained once, 46,362, would give 2.876M) is not stated anywhere, and TDSS's shared
2.68M would need ~130K, not one set of the dedicated placement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtbench.config import MethodConfig, positive, probability, share_field
from mtbench.errors import MtbenchError
from mtbench.lora import LoRALinear, inject_lora
from mtbench.model import MultiTaskModel
from mtbench.registry import PaperCount, register_method

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "reduction")


@dataclass
class LoRAConfig(MethodConfig):
    share: str = share_field("shared")
    r: int = field(default=4, metadata=positive("rank r of every LoRA update"))
    scale: float = field(default=4.0, metadata={"help": "raw output scale s (ΔW = s·BA)"})
    dropout: float = field(default=0.05, metadata=probability("dropout on the LoRA input"))
    targets: tuple[str, ...] = field(default=("qkv",), metadata={
        "help": f"linear layers to adapt, joined by '+', from {'+'.join(LORA_TARGETS)}"})

    def validate(self) -> None:
        super().validate()
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise MtbenchError(f"lora: unknown target(s) {bad or '(none)'}; valid: {', '.join(LORA_TARGETS)}")


@register_method(
    "lora",
    config=LoRAConfig,
    paper="LoRA (Hu et al., ICLR 2022), multi-task baseline of MTLoRA CVPR'24 / TADFormer CVPR'25 Table 1",
    code="https://github.com/microsoft/LoRA (single-task); MTL baseline: none",
    summary="LoRA on the chosen linears (default attention qkv, r=4, s=4), one for all tasks (shared) or one per "
            "task (dedicated)",
    paper_counts=[PaperCount({"share": "dedicated"}, 2.87,
                             "TADFormer / MTLoRA Table 1 'LoRA'; TDSS Table 1 'LoRA(ded.)'",
                             exact=2_829_464, decoder="polyhistor_hrnet",
                             note="placement cannot be pinned: ~10K per task unexplained (method docstring)"),
                  PaperCount({"share": "shared"}, 2.68, "TDSS Table 1 'LoRA(sha.)'", exact=2_617_496,
                             decoder="polyhistor_hrnet", note="~0.06M unexplained (method docstring)")],
)
class LoRA(MultiTaskModel):
    """Frozen Swin with LoRA updates on ``cfg.targets``, shared or per task (module docstring)."""

    def __init__(self, backbone, tasks, cfg: LoRAConfig):
        super().__init__(backbone, tasks)
        dedicated = cfg.share == "dedicated" and len(self.task_names) > 1
        self.use_convention("dedicated" if dedicated else "shared")
        if dedicated:
            ranks = {t: cfg.r for t in self.task_names}
            layers = inject_lora(backbone.stages, cfg.targets, lambda name, lin: LoRALinear(
                lin, 0, cfg.scale, cfg.dropout, task_ranks=ranks))
        else:
            layers = inject_lora(backbone.stages, cfg.targets,
                                 lambda name, lin: LoRALinear(lin, cfg.r, cfg.scale, cfg.dropout))
        for layer in layers.values():
            self.add_method_params(layer.lora_parameters())
