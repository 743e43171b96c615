"""The decoder side: per-task neck -> interaction stage (sees every task) -> per-task head, from a registry.

A decoder is chosen per run (``mtbench run --decoder NAME``, recorded in the result file) from :data:`DECODERS`;
the default depends on the backbone (:data:`DEFAULT_DECODER`). Every method gets the same decoder, so #TP and metrics
compare encoders.

* **neck** (per task): 1x1 convs (no bias) reducing the four backbone taps to 18/36/72/144 channels (HRNet-w18
  widths; MTLoRA's "Downsampler").
* **interaction** (all tasks): ``{task: [4 NCHW maps]} -> ({task: [4 maps]}, aux_losses)``; identity by default.
  Inter-task modules plug in here through :func:`register_interaction` and are chosen with
  ``--decoder NAME`` (on the backbone's default decoder) or ``--decoder BASE+NAME``: ``inter_task_mha`` and
  ``inter_task_deformable`` (:mod:`mtbench.intertask`).
* **head** (per task): scales 2-4 bilinearly upsampled to scale 1 and concatenated (270 channels), 1x1 conv
  270 -> hidden (+bias), BatchNorm, ReLU, 1x1 conv hidden -> out, bilinear upsample to the input size.

Decoders: ``mtlora_hrnet`` is MTLoRA's head (Agiza et al., CVPR 2024, §4.1; official ``scale-lab/MTLoRA``
``models/swin_mtl.py`` + ``models/seg_hrnet.py::HighResolutionHead``), hidden 1080 = 4 x 270; 1,946,624 parameters
for PASCAL-Context's four tasks on Swin-T (the papers' default). ``hrnet_270`` is the original 270-wide head of
Vandenhende et al. (TPAMI 2021, ``SimonVandenhende/Multi-Task-Learning-PyTorch models/seg_hrnet.py``), the
embedded default: the 1080-wide head costs 3x the small backbone's compute on a CPU.

``polyhistor_hrnet`` is the decoder the older rows of TADFormer's and TDSS's Table 1 sit on (rows copied from
Polyhistor's 2022 benchmark, Liu et al. NeurIPS 2022, whose code was never released). Its architecture is not
published; mtbench reconstructs it as MTLoRA's head with a wider hidden conv, 1614 channels, the width whose size
matches what the printed rows imply (``shared/reference/methods.md`` §0). Derivation, PASCAL-Context 4 tasks,
Swin-T backbone 27,517,818 parameters; every printed number is rounded to 0.01M, so each row bounds the decoder D:

* MTL full fine-tuning 30.06M = 27,517,818 + D  ->  D in [2.5372, 2.5472]M
* BitFit 2.85M = D + 4 x (51,456 biases + 23,322 rel-pos tables)  ->  D in [2.5459, 2.5559]M
* VPT-shallow 2.57M = D + 4 x 50 x 96 prompts  ->  D in [2.5458, 2.5558]M
* VPT-deep 3.43M = D + 4 x 50 x 4416 prompts  ->  D in [2.5418, 2.5518]M
* single-task 112.62M = 4 x 27,517,818 + D  ->  D in [2.5437, 2.5537]M; decoder-only (TDSS) 2.55M

so D lies in [2.5459, 2.5472]M, about 0.600M (150K per task) above MTLoRA's 1,946,624. MTLoRA's head with hidden
width h has ``4 x (183,168 + 273 h) + 33 h + 32`` parameters for these tasks (output channels 21/7/1/3), so h = 1614
(2,546,840) is the one integer width inside the interval. What the extra ~150K per task really was (another head
layout, e.g. different reducers) cannot be recovered from the tables; only its size is pinned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtbench.errors import MtbenchError

#: HRNet-w18 branch widths used by MTLoRA's head.
HRNET_CHANNELS = (18, 36, 72, 144)


class HRNetHead(nn.Module):
    """Neck and head of one task (MTLoRA's HRNet-style decoder).

    Args:
        in_dims: channels of the four backbone taps, e.g. ``(192, 384, 768, 768)``.
        out_channels: task output channels.
        channels: widths after the 1x1 reducers (sum 270 by default).
        hidden_ratio: width of the hidden 1x1 conv as a multiple of ``sum(channels)`` (MTLoRA: 4 -> 1080).
        hidden: the hidden width itself (overrides ``hidden_ratio``; the fitted old-benchmark head, 1614).

    Shapes: :meth:`neck` four NCHW maps -> four maps of ``channels`` widths; :meth:`head` those and ``size`` ->
    ``[B, out_channels, *size]``; ``forward(feats, size)`` = ``head(neck(feats), size)``.
    """

    def __init__(self, in_dims: Sequence[int], out_channels: int, channels: Sequence[int] = HRNET_CHANNELS,
                 hidden_ratio: int = 4, hidden: int | None = None):
        super().__init__()
        if len(in_dims) != len(channels):
            raise ValueError(f"HRNetHead needs {len(channels)} input scales, got {len(in_dims)}")
        self.channels = tuple(channels)
        self.reducers = nn.ModuleList(nn.Conv2d(i, c, 1, bias=False) for i, c in zip(in_dims, channels))
        total = sum(channels)
        hidden = hidden if hidden is not None else hidden_ratio * total
        self.fuse = nn.Sequential(
            nn.Conv2d(total, hidden, 1),
            nn.BatchNorm2d(hidden, momentum=0.1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )
        self.to(memory_format=torch.channels_last)  # measured: 6% off mtl_full's training step at 448 (issue 6)

    def neck(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Runs channels-last: the encoder's NHWC taps are NCHW views in that layout already (no copy)."""
        return [r(f.contiguous(memory_format=torch.channels_last)) for r, f in zip(self.reducers, feats)]

    def head(self, reduced: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        h, w = reduced[0].shape[-2:]
        up = [reduced[0]] + [F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
                             for x in reduced[1:]]
        out = self.fuse(torch.cat(up, dim=1))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False).contiguous()

    def forward(self, feats: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return self.head(self.neck(feats), size)


class IdentityInteraction(nn.Module):
    """The default interaction stage: every task keeps its own features, no auxiliary loss."""

    def forward(self, feats: dict[str, list[torch.Tensor]]) -> tuple[dict[str, list[torch.Tensor]],
                                                                     dict[str, torch.Tensor]]:
        return feats, {}


@dataclass(frozen=True)
class DecoderSpec:
    """A registered decoder.

    Attributes:
        name: registry key (``--decoder``).
        make_task: ``(in_dims, out_channels) -> module`` with ``neck(feats)`` and ``head(reduced, size)``.
        make_interaction: ``(task names, neck widths) -> module`` for the interaction stage.
        neck_channels: widths of the neck outputs (what the interaction stage sees).
        description: one line for ``mtbench list``.
    """

    name: str
    make_task: Callable[[Sequence[int], int], nn.Module]
    make_interaction: Callable[[Sequence[str], Sequence[int]], nn.Module]
    neck_channels: tuple[int, ...]
    description: str


DECODERS: dict[str, DecoderSpec] = {}

#: Default decoder per backbone name.
DEFAULT_DECODER = {"swin_tiny_patch4_window7_224": "mtlora_hrnet", "swin_embedded": "hrnet_270"}


def register_decoder(spec: DecoderSpec) -> DecoderSpec:
    """Add a decoder to :data:`DECODERS`.

    Raises:
        ValueError: name already registered (a programming error).
    """
    if spec.name in DECODERS:
        raise ValueError(f"decoder {spec.name!r} registered twice")
    DECODERS[spec.name] = spec
    return spec


register_decoder(DecoderSpec(
    "mtlora_hrnet", lambda dims, out: HRNetHead(dims, out, hidden_ratio=4), lambda tasks, ch: IdentityInteraction(),
    HRNET_CHANNELS, "MTLoRA's HRNet head, hidden 1080 (the papers' default)"))
register_decoder(DecoderSpec(
    "hrnet_270", lambda dims, out: HRNetHead(dims, out, hidden_ratio=1), lambda tasks, ch: IdentityInteraction(),
    HRNET_CHANNELS, "the original 270-wide HRNet head (Vandenhende et al.; the embedded default)"))
#: Hidden width of the reconstructed old-benchmark head (module docstring: the one width consistent with Table 1).
POLYHISTOR_HIDDEN = 1614
register_decoder(DecoderSpec(
    "polyhistor_hrnet", lambda dims, out: HRNetHead(dims, out, hidden=POLYHISTOR_HIDDEN),
    lambda tasks, ch: IdentityInteraction(), HRNET_CHANNELS,
    "the old benchmark's decoder behind the Polyhistor-era rows of Table 1 (2.547M on PASCAL; size-fitted, hidden "
    "1614)"))


#: Interaction stages usable on top of any decoder: name -> (factory ``(task names, neck widths) -> module``,
#: description). ``--decoder NAME`` uses the backbone's default decoder with it, ``--decoder BASE+NAME`` another.
INTERACTIONS: dict[str, tuple[Callable[[Sequence[str], Sequence[int]], nn.Module], str]] = {}


def register_interaction(name: str, make: Callable[[Sequence[str], Sequence[int]], nn.Module],
                         description: str) -> None:
    """Add an interaction stage to :data:`INTERACTIONS`.

    Raises:
        ValueError: name already registered as a decoder or interaction (a programming error).
    """
    if name in INTERACTIONS or name in DECODERS:
        raise ValueError(f"interaction {name!r} registered twice")
    INTERACTIONS[name] = (make, description)


def resolve_decoder(name: str | None, backbone_name: str) -> DecoderSpec:
    """The decoder ``name``, or the backbone's default when None.

    ``name`` may also be an interaction of :data:`INTERACTIONS` (on the backbone's default decoder) or
    ``BASE+INTERACTION``; the resolved spec's name is always ``BASE+INTERACTION`` (what result files record).

    Raises:
        MtbenchError: unknown name (the message lists the valid ones).
    """
    default = DEFAULT_DECODER.get(backbone_name, "mtlora_hrnet")
    if name is not None and (not name.strip() or name.startswith("+") or name.endswith("+")):
        raise MtbenchError(f"decoder {name!r} is not a decoder name; valid: {', '.join(_valid_names())}")
    key = name or default
    base, _, inter = key.partition("+") if "+" in key else (
        (default, "+", key) if key in INTERACTIONS else (key, "", ""))
    if base not in DECODERS or (inter and inter not in INTERACTIONS):
        raise MtbenchError(f"unknown decoder {name!r}; valid: {', '.join(_valid_names())}")
    if not inter:
        return DECODERS[base]
    spec = DECODERS[base]
    return DecoderSpec(f"{base}+{inter}", spec.make_task, INTERACTIONS[inter][0], spec.neck_channels,
                       f"{spec.description}, with the interaction stage {inter}")


def _valid_names() -> list[str]:
    return list(DECODERS) + list(INTERACTIONS) + [f"DECODER+{i}" for i in INTERACTIONS]


def _register_builtin_interactions() -> None:
    from mtbench.intertask import InterTaskAttention
    from mtbench.tsai import TSAI_DIM, BranchSynergy, TSAITaskDecoder

    register_decoder(DecoderSpec(
        "tsai", lambda dims, out: TSAITaskDecoder(dims, out), lambda tasks, ch: BranchSynergy(tasks), (TSAI_DIM,),
        "TDSS's TSAI: per-task SegFormer scale fusion, K=4 deformable synergy layers with the global feature, "
        "conv heads (mtbench.tsai)"))

    register_interaction("inter_task_mha", lambda tasks, ch: InterTaskAttention(tasks, ch, mixer="mha"),
                         "full multi-head self-attention across all tasks' tokens (InvPT-style, quadratic in T)")
    register_interaction("inter_task_deformable", lambda tasks, ch: InterTaskAttention(tasks, ch, mixer="deformable"),
                         "deformable inter-task self-attention, task maps as levels (reconstruction of Bohn et al. "
                         "2025 from its abstract)")


_register_builtin_interactions()
