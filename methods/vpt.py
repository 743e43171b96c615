"""Visual Prompt Tuning (Jia et al., ECCV 2022), shallow and deep, on Swin, as a multi-task baseline.

The "VPT-shallow" / "VPT-deep" rows of TADFormer (CVPR 2025) Table 1 / §4.2 ("prepending a trainable embedding,
either to the input (VPT-shallow) or all transformer layers (VPT-deep)") and TDSS (AAAI 2026) Table 1
"VPT-shallow(sha.)" / "VPT-deep(sha.)", first published in Polyhistor's benchmark (no code released). Prompts on Swin
follow the official ``KMnP/vpt`` ``src/models/vit_prompt/swin_transformer.py`` (``shared/reference/methods.md`` §4),
on the core's prompt machinery (:mod:`mtbench.encoder`, :func:`mtbench.swin.window_attention`):

* ``prompts`` tokens (default 50) are prepended to **every window**; the relative-position bias and the shift mask are
  zero-padded in the prompt rows and columns; each image's prompt outputs are **averaged over its windows** and then
  go through the MLP like ordinary tokens (:func:`mtbench.swin.update_prompt_tokens`).
* At each PatchMerging the prompts are widened ``C -> 4C`` by **4 copies** and go through the merge's own norm and
  reduction (:func:`mtbench.swin.merge_prompts_by_copies`).
* **Deep** (``deep=true``, variant ``vpt_deep``): before every block except the network's first, the prompt slots are
  **replaced** by that block's own prompts (official ``deep_prompt_embeddings_0`` has ``depths[0] - 1`` rows, stages
  1-3 ``depths[i]``). The carried prompts are therefore never updated in deep mode (their outputs are discarded).
* **Init**: uniform(-v, v), ``v = sqrt(6 / (3 p^2 + C_1))`` (patch size ``p``, first-stage width ``C_1``: the official
  xavier-style value for every prompt); **prompt dropout** 0.1 (``dropout``, official ``PROMPT.DROPOUT``) on the
  prompts before they enter a block.
* **Conventions** (``share``): ``dedicated`` (default; the reported rows imply one prompt set per task, T backbone
  passes) — each task stream gets its own prompts, the streams stacked on the batch through one frozen backbone
  call; ``shared``: one prompt set, one pass.

#TP on Swin-T/PASCAL-Context, 4 tasks, decoder ``polyhistor_hrnet`` (2,546,840): shallow 4 x 50 x 96 = 19,200 ->
2,566,040 (TADFormer 2.57 ✔); deep + 4 x 50 x (4416 - 96) = 883,200 -> 3,430,040 (TADFormer 3.43 ✔), where
4416 = the sum of the 12 blocks' widths. The difference of the two printed rows, 0.86M = 4 x 50 x 4320, is what
pins 50 prompts per task.

**TDSS's "sha." rows** (0.63 / 1.49) are TADFormer's rows minus 1.94M: 2.57 - 1.94 = 0.63 and 3.43 - 1.94 = 1.49,
with the same deep-minus-shallow 0.86M. So they hold the *dedicated* prompt count (four sets of 50) and only
0.61M of decoder — the 1.94M decoder-only count subtracted from a total that sat on the 2.55M decoder. A shared
prompt set on any decoder of those tables would give 2.55M + 4,800 = 2.55M (shallow) and 2.55M + 220,800 = 2.77M
(deep). mtbench shows both readings (``mtbench params``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from mtbench.config import MethodConfig, positive, probability, share_field
from mtbench.encoder import BlockExtension
from mtbench.model import MultiTaskModel
from mtbench.registry import PaperCount, register_method
from mtbench.streams import SHARED, StreamLayout, TaskIndexed
from mtbench.swin import merge_prompts_by_copies

_PH = "polyhistor_hrnet"
_TDSS = ("reading: TDSS's sha. VPT rows are TADFormer's printed dedicated rows minus 1.94M (decoder-only), "
         "four prompt sets, not one (deep - shallow = 0.86M in both tables); our dedicated count minus 1,946,624 = "
         "{:,}. The #TP here is a real shared prompt set")


class PromptTokens(nn.Module):
    """``P`` prompt tokens of width ``C``, init uniform(-v, v). Attribute ``tokens`` ``[P, C]``."""

    def __init__(self, num: int, dim: int, v: float):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num, dim).uniform_(-v, v))


def stacked_prompts(bank: TaskIndexed, layout: StreamLayout) -> torch.Tensor:
    """The prompts of every stream of ``layout``, ``[S*B, P, C]`` (the shared set for every stream when shared)."""
    names = layout.names if bank.share == "dedicated" else (SHARED,)
    p = bank.stacked("tokens", names)  # [S', P, C]
    S = layout.size if bank.share == "dedicated" else 1
    return p.unsqueeze(1).expand(S, layout.batch, *p.shape[1:]).reshape(S * layout.batch, *p.shape[1:])


class DeepPrompts(BlockExtension):
    """VPT-deep: replace the prompt slots before this block with its own prompts (per stream)."""

    def __init__(self, num: int, dim: int, v: float, tasks, share: str, dropout: nn.Module):
        super().__init__()
        self.bank = TaskIndexed(tasks, lambda t: PromptTokens(num, dim, v), share=share)
        self.__dict__["dropout"] = dropout

    def pre_block(self, ctx, x):
        ctx.prompts = self.dropout(stacked_prompts(self.bank, ctx.layout))
        return x


@dataclass
class VPTConfig(MethodConfig):
    share: str = share_field("dedicated")
    prompts: int = field(default=50, metadata=positive("prompt tokens per set (the reported rows imply 50)"))
    deep: bool = field(default=False, metadata={"help": "VPT-deep: own prompts before every block"})
    dropout: float = field(default=0.1, metadata=probability("prompt dropout"))


@register_method(
    "vpt",
    config=VPTConfig,
    paper="Visual Prompt Tuning (Jia et al., ECCV 2022); multi-task baseline of Polyhistor NeurIPS'22 / TADFormer "
          "CVPR'25 / TDSS AAAI'26 Table 1",
    code="https://github.com/KMnP/vpt (src/models/vit_prompt/swin_transformer.py)",
    summary="prompts in every window (zero-padded bias/mask, window-averaged outputs, 4 copies through PatchMerging);"
            " shallow or deep (variants vpt_shallow, vpt_deep), per task or shared",
    variants={"vpt_shallow": {"deep": False}, "vpt_deep": {"deep": True}},
    paper_counts=[
        PaperCount({"share": "dedicated"}, 2.57, "TADFormer Table 1 'VPT-shallow'", exact=2_566_040, decoder=_PH),
        PaperCount({"share": "dedicated", "deep": True}, 3.43, "TADFormer Table 1 'VPT-deep'", exact=3_430_040,
                   decoder=_PH),
        PaperCount({"share": "shared"}, 0.63, "TDSS Table 1 'VPT-shallow(sha.)'", decoder=_PH,
                   note=_TDSS.format(2_566_040 - 1_946_624)),
        PaperCount({"share": "shared", "deep": True}, 1.49, "TDSS Table 1 'VPT-deep(sha.)'", decoder=_PH,
                   note=_TDSS.format(3_430_040 - 1_946_624)),
    ],
)
class VPT(MultiTaskModel):
    """Frozen Swin + prompt tokens (module docstring). Shapes: images ``[B,3,H,W]`` -> ``{task: [B,C_t,H,W]}``."""

    def __init__(self, backbone, tasks, cfg: VPTConfig):
        super().__init__(backbone, tasks)
        self.cfg = cfg
        self.use_convention(cfg.share)
        dims = backbone.stage_dims
        v = math.sqrt(6.0 / (3 * backbone.patch_size ** 2 + dims[0]))
        self.prompt_dropout = nn.Dropout(cfg.dropout)
        self.shallow = TaskIndexed(self.task_names, lambda t: PromptTokens(cfg.prompts, dims[0], v), share=cfg.share)
        self.add_method_params(self.shallow)
        if cfg.deep:
            exts = self.extend_blocks(lambda stage, index, block: None if stage == index == 0 else DeepPrompts(
                cfg.prompts, block.dim, v, self.task_names, cfg.share, self.prompt_dropout))
            for e in exts:
                self.add_method_params(e)

    def init_prompts(self, layout):
        return self.prompt_dropout(stacked_prompts(self.shallow, layout))

    def prompts_updated(self, ctx):
        return not self.cfg.deep and super().prompts_updated(ctx)

    def merge_prompts(self, stage, prompts):
        return merge_prompts_by_copies(self.backbone.stages[stage + 1].downsample, prompts)
