"""BitFit (Ben Zaken, Ravfogel, Goldberg; ACL 2022) as a multi-task baseline on Swin.

The "Bitfit" row of TADFormer (CVPR 2025) Table 1 (§4.2: "tunes only the biases, patch merging layers and patch
projection layers") and TDSS (AAAI 2026) Table 1 "BitFit(sha.)" / "BitFit(ded.)", first published in Polyhistor's
benchmark (no code released).

* **What trains** (:func:`mtbench.bias.inject_bias_tuning`): every bias of the backbone: ``qkv``, ``proj``, ``fc1``,
  ``fc2`` and LayerNorm biases of every block, the PatchMerging LayerNorm biases and the patch projection's
  convolution and LayerNorm biases — 51,456 on Swin-T — plus (``rel_pos``, default true) the relative-position
  tables, 23,322. Each is a trainable copy of the pretrained value, per task (``dedicated``) or shared.
* **Reading of §4.2.** "patch merging layers and patch projection layers" is read as *their biases* (PatchMerging's
  reduction has no bias; its LayerNorm has one): this reading reproduces the printed 2.85M exactly, whereas training
  the PatchMerging reductions themselves would add 1.548M. The literal reading for PatchMerging is the option
  ``patch_merging=true`` (reductions train, shared by all tasks); the patch projection's 4,608 conv weights are not
  offered (too small to tell the readings apart).
* **Relative-position tables** (``rel_pos``): not named in §4.2, but needed for the printed count (4 x 23,322); they
  are per task in the dedicated convention (:class:`mtbench.bias.RelPosTables`).
* **Conventions** (``share``): ``dedicated`` (default; TDSS marks BitFit(ded.) as T backbone passes): one bias set per
  task, the task streams stacked on the batch through one frozen backbone call, the patch embedding included
  (``StreamPlan.dedicated(embed_per_stream=True)``); ``shared``: one set, one pass.

#TP on Swin-T/PASCAL-Context, 4 tasks, decoder ``polyhistor_hrnet`` (2,546,840): dedicated 2,546,840 + 4 x 74,778 =
2,845,952 -> 2.85M (TADFormer Table 1 and TDSS "BitFit(ded.)" 2.85 ✔); shared 2,621,618 -> 2.62M (TDSS
"BitFit(sha.)" prints 2.63, -0.3%).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtbench.bias import RelPosTables, inject_bias_tuning
from mtbench.config import MethodConfig, share_field
from mtbench.model import MultiTaskModel
from mtbench.registry import PaperCount, register_method

_PH = "polyhistor_hrnet"


@dataclass
class BitFitConfig(MethodConfig):
    share: str = share_field("dedicated")
    rel_pos: bool = field(default=True, metadata={"help": "also tune the relative-position tables (per task when "
                                                          "dedicated)"})
    patch_merging: bool = field(default=False, metadata={
        "help": "also train the PatchMerging reductions (literal reading of TADFormer §4.2; shared)"})


@register_method(
    "bitfit",
    config=BitFitConfig,
    paper="BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked Language-models (Ben Zaken "
          "et al., ACL 2022); multi-task baseline of Polyhistor NeurIPS'22 / TADFormer CVPR'25 / TDSS AAAI'26 Table 1",
    code="https://github.com/benzakenelad/BitFit (single-task); MTL baseline: none",
    summary="every backbone bias (+ relative-position tables) as trainable copies, per task (dedicated) or shared",
    paper_counts=[
        PaperCount({"share": "dedicated"}, 2.85, "TADFormer Table 1 'Bitfit'; TDSS Table 1 'BitFit(ded.)'",
                   exact=2_845_952, decoder=_PH),
        PaperCount({"share": "shared"}, 2.63, "TDSS Table 1 'BitFit(sha.)'", exact=2_621_618, decoder=_PH),
    ],
)
class BitFit(MultiTaskModel):
    """Frozen Swin with trainable bias copies (module docstring). Shapes: ``[B,3,H,W]`` -> ``{task: [B,C_t,H,W]}``."""

    def __init__(self, backbone, tasks, cfg: BitFitConfig):
        super().__init__(backbone, tasks)
        self.use_convention(cfg.share, embed_per_stream=True)
        for w in inject_bias_tuning(backbone, self.task_names, cfg.share):
            self.add_method_params(w.bias_parameters())
        if cfg.rel_pos:
            exts = self.extend_blocks(lambda stage, index, block: RelPosTables(block.attn, self.task_names,
                                                                                cfg.share))
            for e in exts:
                self.add_method_params(e)
        if cfg.patch_merging:
            self.unfreeze_backbone("patch_merging")
