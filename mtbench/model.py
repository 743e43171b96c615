"""The one interface every method implements: images in, one dense prediction per task out.

A method subclasses :class:`MultiTaskModel`, builds its modules in ``__init__`` from (backbone, task specs, method
config), *declares* what is trainable (:meth:`MultiTaskModel.add_method_params` for what it adds,
:meth:`MultiTaskModel.unfreeze_backbone` for structural backbone roles) and implements :meth:`encode`. Freezing is
structural: :meth:`MultiTaskModel.apply_trainability` freezes every parameter and unfreezes exactly the declared
ones, so no parameter is ever selected by a substring of its name. The counting (#TP and its breakdown) lives in
:mod:`mtbench.measure`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from mtbench.decoders import HRNetHead
from mtbench.errors import MtbenchError
from mtbench.swin import SwinBackbone
from mtbench.tasks import TaskSpec


class MultiTaskModel(nn.Module):
    """Base class of every method's model.

    Args:
        backbone: the shared Swin backbone (methods that need several copies, e.g. ``single_task``, deep-copy it).
        tasks: the task specs, in order.
        decoder_channels: widths of the HRNet head's 1x1 reducers (default MTLoRA's 18/36/72/144).

    Attributes:
        backbone: :class:`mtbench.swin.SwinBackbone` or None when the method keeps its own copies.
        decoders: ``nn.ModuleDict`` task -> :class:`mtbench.decoders.HRNetHead`.
        task_names: list of task names.
    """

    def __init__(self, backbone: SwinBackbone, tasks: Sequence[TaskSpec], decoder_channels=None):
        super().__init__()
        if not tasks:
            raise MtbenchError("at least one task is required")
        self.tasks = list(tasks)
        self.task_names = [t.name for t in tasks]
        self.backbone = backbone
        self.img_size = backbone.img_size
        kw = {"hidden_ratio": backbone.decoder_hidden_ratio}
        if decoder_channels is not None:
            kw["channels"] = tuple(decoder_channels)
        self.decoders = nn.ModuleDict(
            {t.name: HRNetHead(backbone.feature_dims, t.out_channels, **kw) for t in tasks})
        self._method_param_ids: set[int] = set()
        self._unfrozen_roles: set[str] = set()

    # ------------------------------------------------------------------ declaration of what trains
    def add_method_params(self, params: Iterable[nn.Parameter] | nn.Module) -> None:
        """Declare parameters (or all parameters of a module) that this method adds; they are trainable."""
        if isinstance(params, nn.Module):
            params = params.parameters()
        self._method_param_ids.update(id(p) for p in params)

    def unfreeze_backbone(self, *roles: str) -> None:
        """Declare backbone roles (see :data:`mtbench.swin.ROLES`) that train, e.g. ``"norm", "rel_pos"``."""
        self.backbones()[0].params_with_roles(roles)  # validates names
        self._unfrozen_roles.update(roles)

    def backbones(self) -> list[SwinBackbone]:
        """Every backbone copy inside the model (one for shared-encoder methods)."""
        return [m for m in self.modules() if isinstance(m, SwinBackbone)]

    def param_category(self, param: nn.Parameter) -> tuple[str, str]:
        """``(category, role)`` of a parameter: category in ``method, decoder, backbone``; role is the backbone
        role (:data:`mtbench.swin.ROLES`) for backbone parameters, else equal to the category."""
        if id(param) in self._method_param_ids:
            return "method", "method"
        if id(param) in self._decoder_ids:
            return "decoder", "decoder"
        for bb in self._backbone_list:
            role = bb.role_of(param)
            if role is not None:
                return "backbone", role
        raise MtbenchError(f"parameter of shape {tuple(param.shape)} is neither declared by the method, nor part "
                           "of a decoder or the backbone")

    def apply_trainability(self) -> None:
        """Freeze everything, then unfreeze declared method parameters, decoders and declared backbone roles.

        Raises:
            MtbenchError: a parameter that belongs to no category (a method forgot to declare it).
        """
        self._decoder_ids = {id(p) for p in self.decoders.parameters()}
        self._backbone_list = self.backbones()
        for p in self.parameters():
            cat, role = self.param_category(p)
            p.requires_grad_(cat in ("method", "decoder") or role in self._unfrozen_roles)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ forward
    def encode(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Per-task multi-scale features. Default: the shared backbone's taps for every task.

        Args:
            images: ``[B,3,H,W]``.

        Returns:
            ``{task: [4 NCHW maps]}`` matching ``backbone.feature_dims``.
        """
        feats = self.backbone(images)
        return {t: feats for t in self.task_names}

    def check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise MtbenchError(f"images must be [B,3,H,W], got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != tuple(self.img_size):
            raise MtbenchError(f"images must be {self.img_size[0]}x{self.img_size[1]} for this backbone, got "
                               f"{images.shape[-2]}x{images.shape[-1]}")

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense predictions.

        Args:
            images: ``[B,3,H,W]`` normalised images at the backbone's input size.

        Returns:
            ``{task: [B, C_task, H, W]}`` (logits for segmentation/sal/edge, raw normals, depth in metres).

        Raises:
            MtbenchError: wrong input shape.
        """
        self.check_input(images)
        feats = self.encode(images)
        size = tuple(images.shape[-2:])
        return {t: self.decoders[t](feats[t], size) for t in self.task_names}


def nhwc_to_nchw(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[B,H,W,C]`` maps to contiguous ``[B,C,H,W]``."""
    return [x.permute(0, 3, 1, 2).contiguous() for x in xs]
