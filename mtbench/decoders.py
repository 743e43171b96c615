"""Per-task decoders, identical for every method (so that #TP and metrics compare encoders only).

:class:`HRNetHead` is MTLoRA's decoder (Agiza et al., CVPR 2024, §4.1; official ``scale-lab/MTLoRA``
``models/swin_mtl.py`` "Downsampler" + ``models/seg_hrnet.py::HighResolutionHead``): 1x1 convs (no bias) reduce the
four backbone taps to 18/36/72/144 channels, scales 2-4 are bilinearly upsampled to scale 1 and concatenated (270
channels), then 1x1 conv 270->1080 (+bias), BatchNorm, ReLU, 1x1 conv 1080->out, and a bilinear upsample to the input
size. For PASCAL-Context's four tasks on Swin-T this is 1,946,624 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: HRNet-w18 branch widths used by MTLoRA's head.
HRNET_CHANNELS = (18, 36, 72, 144)


class HRNetHead(nn.Module):
    """MTLoRA's HRNet-style head for one task.

    Args:
        in_dims: channels of the four backbone taps, e.g. ``(192, 384, 768, 768)``.
        out_channels: task output channels.
        channels: widths after the 1x1 reducers (sum 270 by default).
        hidden_ratio: width of the hidden 1x1 conv as a multiple of ``sum(channels)`` (MTLoRA: 4 -> 1080).

    Shapes: ``forward(feats, size)`` takes four NCHW maps (scale 1 largest) and returns ``[B, out_channels, *size]``.
    """

    def __init__(self, in_dims: Sequence[int], out_channels: int, channels: Sequence[int] = HRNET_CHANNELS,
                 hidden_ratio: int = 4):
        super().__init__()
        if len(in_dims) != len(channels):
            raise ValueError(f"HRNetHead needs {len(channels)} input scales, got {len(in_dims)}")
        self.reducers = nn.ModuleList(nn.Conv2d(i, c, 1, bias=False) for i, c in zip(in_dims, channels))
        total = sum(channels)
        hidden = hidden_ratio * total
        self.fuse = nn.Sequential(
            nn.Conv2d(total, hidden, 1),
            nn.BatchNorm2d(hidden, momentum=0.1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
        )

    def forward(self, feats: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        reduced = [r(f) for r, f in zip(self.reducers, feats)]
        h, w = reduced[0].shape[-2:]
        up = [reduced[0]] + [F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
                             for x in reduced[1:]]
        out = self.fuse(torch.cat(up, dim=1))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)
