"""LoRA shared by all tasks (Hu et al., ICLR 2022) on a multi-task Swin: one backbone pass, one set of low-rank
updates for every task.

The "LoRA" row of MTLoRA (CVPR 2024, Table 1) and TADFormer (CVPR 2025, Table 1, §4.2: "applies low-rank
decomposition to the attention layers, using a rank of 4 and an adapter output scale of 4"). No official code exists
for this multi-task baseline (MTLoRA issue #8: "most likely" one LoRA shared by all tasks). The LoRA module follows
MTLoRA's ``models/lora.py`` (raw scale, A kaiming-uniform, B zero, dropout 0.05).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtbench.config import MethodConfig
from mtbench.errors import MtbenchError
from mtbench.lora import LoRALinear, inject_lora
from mtbench.model import MultiTaskModel
from mtbench.registry import PaperCount, register_method

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "reduction")


@dataclass
class LoRAConfig(MethodConfig):
    r: int = field(default=4, metadata={"help": "rank r of every LoRA update"})
    scale: float = field(default=4.0, metadata={"help": "raw output scale s (ΔW = s·BA)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    targets: tuple[str, ...] = field(default=("qkv",), metadata={
        "help": f"linear layers to adapt, joined by '+', from {'+'.join(LORA_TARGETS)}"})

    def validate(self) -> None:
        super().validate()
        if self.r <= 0:
            raise MtbenchError(f"lora: rank r must be > 0, got r={self.r}")
        if not 0 <= self.dropout < 1:
            raise MtbenchError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise MtbenchError(f"lora: unknown target(s) {bad or '(none)'}; valid: {', '.join(LORA_TARGETS)}")


@register_method(
    "lora",
    config=LoRAConfig,
    paper="LoRA (Hu et al., ICLR 2022), multi-task baseline of MTLoRA CVPR'24 / TADFormer CVPR'25 Table 1",
    code="https://github.com/microsoft/LoRA (single-task); MTL baseline: none",
    summary="one LoRA shared by all tasks on the chosen linears (default attention qkv, r=4, s=4)",
    paper_counts=[PaperCount({}, 2.87, "TADFormer / MTLoRA Table 1",
                             note="the table's 2.87M sits on Polyhistor's ~2.55M decoder and an unknown LoRA "
                                  "placement (MTLoRA issue #8); on MTLoRA's decoder r=4 qkv-LoRA gives 2.02M")],
)
class LoRA(MultiTaskModel):
    """Frozen Swin with shared LoRA updates on ``cfg.targets``; the default shared-feature ``encode``."""

    def __init__(self, backbone, tasks, cfg: LoRAConfig):
        super().__init__(backbone, tasks)
        layers = inject_lora(backbone.stages, cfg.targets,
                             lambda name, lin: LoRALinear(lin, cfg.r, cfg.scale, cfg.dropout))
        for layer in layers.values():
            self.add_method_params(layer.lora_parameters())
