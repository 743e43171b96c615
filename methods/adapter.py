"""Adapter (Houlsby et al., ICML 2019) and VL-Adapter (Sung et al., CVPR 2022) as multi-task baselines on Swin.

The "Adapter" and "VL-Adapter" rows of TADFormer (CVPR 2025) Table 1 / §4.2 and TDSS (AAAI 2026) Table 1 ("sha." and
"ded."), rows first published in Polyhistor's benchmark (Liu et al., NeurIPS 2022; no code released).

* **Placement** (Houlsby §2.1, Fig. 2): one bottleneck adapter after the attention branch (after its output
  projection) and one after the MLP of every Swin block, before the residual: ``a + up(GELU(down(a)))``
  (:class:`mtbench.adapters.BottleneckAdapter`; official multi-task adapter code ``rabeehk/compacter``
  ``seq2seq/adapters/adapter_controller.py``, adapters after both self-attention and FFN). Bottleneck ``C/4``
  (``reduction=4``: 24/48/96/192 on Swin-T), the reading of TADFormer's 11.24M (``shared/reference/methods.md`` §2).
* **Conventions** (``share``): ``dedicated`` (default, TADFormer's "Adapter applies task-specific bottleneck
  modules"): one adapter set per task, the task streams stacked on the batch through one frozen backbone call;
  ``shared``: one set for all tasks and one backbone pass. Variant ``vl_adapter`` = ``share=shared``: VL-Adapter's
  "single adapter shared across tasks" (TADFormer §4.2; official ``ylsung/VL_adapter``
  ``CLIP-ViL/src/lxrt/adapters/config.py``, ``use_single_adapter=True``).
* **LayerNorms** (``train_norms``, default true): Houlsby trains the layer norms with the adapters (§2.1); the
  backbone's LayerNorms train once, shared by all tasks. This is the reading that reproduces the printed counts.
* **Activation**: GELU (tanh form), as ``gelu_new`` in ``rabeehk/compacter``; init normal(std 1e-2), biases zero.

#TP on Swin-T/PASCAL-Context, 4 tasks, decoder ``polyhistor_hrnet`` (2,546,840): one adapter set is
``sum_blocks (C^2 + 2.5 C)`` = 2,167,584; LayerNorms 23,040.

* ``adapter`` (dedicated): 2,546,840 + 4 x 2,167,584 + 23,040 = 11,240,216 -> 11.24M (TADFormer Table 1 and TDSS
  "Adapter(ded.)": 11.24 ✔).
* ``vl_adapter``: 2,546,840 + 2,167,584 + 23,040 = 4,737,464 -> 4.74M (TADFormer Table 1 "VL-Adapter" 4.74 ✔).
* TDSS "Adapter(sha.)" 4.71 is the shared set without trained LayerNorms (``share=shared,train_norms=false``:
  4,714,424 ✔). TDSS "VL-Adapter(sha.)" 2.62 cannot be explained by any adapter set of this family: it leaves
  ~0.07M above the decoder, 1/30 of one ``C/4`` set (TDSS gives no details); it is shown, not matched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtbench.adapters import ADAPTER_POSITIONS, AdapterExtension, BottleneckAdapter, bottleneck_width
from mtbench.config import MethodConfig, positive, share_field
from mtbench.errors import MtbenchError
from mtbench.model import MultiTaskModel
from mtbench.registry import PaperCount, register_method

_PH = "polyhistor_hrnet"


@dataclass
class AdapterConfig(MethodConfig):
    share: str = share_field("dedicated")
    reduction: int = field(default=4, metadata=positive("bottleneck = C / reduction (4: 24/48/96/192 on Swin-T)"))
    positions: tuple[str, ...] = field(default=ADAPTER_POSITIONS, metadata={
        "help": "where adapters sit in each block, joined by '+': attn (after attention) and/or mlp"})
    train_norms: bool = field(default=True, metadata={"help": "train the backbone LayerNorms (shared by all tasks)"})

    def validate(self) -> None:
        super().validate()
        bad = [p for p in self.positions if p not in ADAPTER_POSITIONS]
        if bad or not self.positions:
            raise MtbenchError(f"{self.method_name}: positions {bad or '(none)'} invalid; valid: "
                               f"{', '.join(ADAPTER_POSITIONS)}")


@register_method(
    "adapter",
    config=AdapterConfig,
    paper="Parameter-Efficient Transfer Learning for NLP (Houlsby et al., ICML 2019); multi-task baseline of "
          "Polyhistor NeurIPS'22 / TADFormer CVPR'25 / TDSS AAAI'26 Table 1",
    code="https://github.com/rabeehk/compacter (multi-task adapters); VL-Adapter: https://github.com/ylsung/VL_adapter",
    summary="Houlsby bottleneck adapters (C/4) after attention and MLP of every block; per task (dedicated) or one "
            "set for all tasks (shared; variant vl_adapter)",
    variants={"vl_adapter": {"share": "shared"}},
    paper_counts=[
        PaperCount({"share": "dedicated"}, 11.24, "TADFormer Table 1 'Adapter'; TDSS Table 1 'Adapter(ded.)'",
                   exact=11_240_216, decoder=_PH),
        PaperCount({"share": "shared"}, 4.74, "TADFormer Table 1 'VL-Adapter' (= variant vl_adapter)",
                   exact=4_737_464, decoder=_PH),
        PaperCount({"share": "shared", "train_norms": False}, 4.71, "TDSS Table 1 'Adapter(sha.)'",
                   exact=4_714_424, decoder=_PH, note="the shared set without trained LayerNorms"),
        PaperCount({"share": "shared", "reduction": 32, "positions": ("mlp",), "train_norms": False}, 2.62,
                   "TDSS Table 1 'VL-Adapter(sha.)'", decoder=_PH,
                   note="not explained: 2.62M leaves ~0.07M above the decoder (1/30 of a C/4 set); the row shown "
                        "is a guess of that size (one MLP adapter per block, C/32), not a match"),
    ],
)
class Adapter(MultiTaskModel):
    """Frozen Swin + Houlsby adapters (module docstring). Shapes: images ``[B,3,H,W]`` -> ``{task: [B,C_t,H,W]}``.

    Raises:
        MtbenchError: ``C // reduction`` is 0 at some stage (:func:`mtbench.adapters.bottleneck_width`).
    """

    def __init__(self, backbone, tasks, cfg: AdapterConfig):
        super().__init__(backbone, tasks)
        self.use_convention(cfg.share)
        exts = self.extend_blocks(lambda stage, index, block: AdapterExtension(
            lambda dim: BottleneckAdapter(dim, bottleneck_width(dim, cfg.reduction, "adapter")), block.dim,
            self.task_names, cfg.share, cfg.positions))
        for e in exts:
            self.add_method_params(e)
        if cfg.train_norms:
            self.unfreeze_backbone("norm")
