"""Decoder-only tuning: the pretrained encoder is frozen, only the task decoders train.

The "MTL - Tuning Decoders Only" row of MTLoRA (CVPR 2024, Table 1) and TADFormer (CVPR 2025, Table 1); official
code: ``scale-lab/MTLoRA main.py --freeze-backbone``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtbench.config import MethodConfig
from mtbench.model import MultiTaskModel
from mtbench.registry import PaperCount, register_method


@dataclass
class DecoderOnlyConfig(MethodConfig):
    """No options: the whole backbone is frozen."""


@register_method(
    "decoder_only",
    config=DecoderOnlyConfig,
    paper="MTL decoders only (MTLoRA CVPR'24 / TADFormer CVPR'25 Table 1)",
    code="https://github.com/scale-lab/MTLoRA",
    summary="frozen encoder, trainable task decoders",
    paper_counts=[PaperCount({}, 1.94, "MTLoRA / TADFormer Table 1", exact=1_946_624,
                             note="1,946,624 rounds to 1.95M; the papers truncate to 1.94M")],
)
class DecoderOnly(MultiTaskModel):
    """Frozen shared Swin; the default shared-feature ``encode``."""

    def __init__(self, backbone, tasks, cfg: DecoderOnlyConfig):
        super().__init__(backbone, tasks)
