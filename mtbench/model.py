"""The one interface every method implements: images in, one dense prediction per task out.

A method subclasses :class:`MultiTaskModel`, builds its modules in ``__init__`` from (backbone, task specs, method
config), *declares* what is trainable (:meth:`MultiTaskModel.add_method_params` for what it adds,
:meth:`MultiTaskModel.unfreeze_backbone` for structural backbone roles) and implements :meth:`encode`. Freezing is
structural: :meth:`MultiTaskModel.apply_trainability` freezes every parameter and unfreezes exactly the declared
ones, so no parameter is ever selected by a substring of its name. The counting (#TP and its breakdown) lives in
:mod:`mtbench.measure`.

The encoder side is the core's loop (:mod:`mtbench.encoder`, whose docstring says how to write a method): a method
extends it with block extensions, a stream plan, prompt hooks and wrapped linears. The decoder side is per-task neck
-> interaction stage -> per-task head (:mod:`mtbench.decoders`); ``forward(images, return_aux=True)`` also returns
the auxiliary losses of the encoder hooks and the interaction stage, which the training loss adds with the weights
in :attr:`MultiTaskModel.aux_loss_weights` (recorded in the result file).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from mtbench.decoders import resolve_decoder
from mtbench.encoder import BlockExtension, EncoderHooks, StreamPlan, encode
from mtbench.errors import MtbenchError
from mtbench.swin import SwinBackbone
from mtbench.tasks import TaskSpec


class MultiTaskModel(EncoderHooks, nn.Module):
    """Base class of every method's model.

    Args:
        backbone: the shared Swin backbone (methods that need several copies, e.g. ``single_task``, deep-copy it).
        tasks: the task specs, in order.
        decoder: a key of :data:`mtbench.decoders.DECODERS`, or None for the backbone's default.

    Attributes:
        backbone: :class:`mtbench.swin.SwinBackbone` or None when the method keeps its own copies.
        decoders: ``nn.ModuleDict`` task -> that task's neck + head (``neck(feats)``, ``head(reduced, size)``).
        interaction: the decoder's interaction stage over all tasks (identity by default).
        decoder_name: the decoder's registry key.
        stream_plan: :class:`mtbench.encoder.StreamPlan` (default: one shared stream).
        block_extensions: ``{"<stage>_<index>": ModuleList of BlockExtension}``.
        aux_loss_weights: ``{name: weight}`` of auxiliary losses (missing names weigh 1.0).
        task_names: list of task names.
    """

    def __init__(self, backbone: SwinBackbone, tasks: Sequence[TaskSpec], decoder: str | None = None):
        super().__init__()
        if not tasks:
            raise MtbenchError("at least one task is required")
        self.tasks = list(tasks)
        self.task_names = [t.name for t in tasks]
        self.backbone = backbone
        self.img_size = backbone.img_size
        self.stream_plan = StreamPlan()
        self.block_extensions = nn.ModuleDict()
        self.aux_loss_weights: dict[str, float] = {}
        self.set_decoder(decoder)
        self._method_param_ids: set[int] = set()
        self._unfrozen_roles: set[str] = set()

    def set_decoder(self, name: str | None) -> None:
        """(Re)build the decoders from the registry (:func:`mtbench.decoders.resolve_decoder`).

        Raises:
            MtbenchError: unknown decoder name.
        """
        spec = resolve_decoder(name, self.backbone.name if self.backbone is not None else "")
        dims = self.backbones()[0].feature_dims if self.backbone is None else self.backbone.feature_dims
        self.decoder_name = spec.name
        self.decoders = nn.ModuleDict({t.name: spec.make_task(dims, t.out_channels) for t in self.tasks})
        self.interaction = spec.make_interaction(self.task_names, spec.neck_channels)

    # ------------------------------------------------------------------ encoder seams
    def extend(self, stage: int, index: int, extension: BlockExtension) -> BlockExtension:
        """Attach ``extension`` to block ``index`` of ``stage`` (after any attached before it)."""
        key = f"{stage}_{index}"
        if key not in self.block_extensions:
            self.block_extensions[key] = nn.ModuleList()
        self.block_extensions[key].append(extension)
        return extension

    def extend_blocks(self, make) -> list[BlockExtension]:
        """``make(stage, index, block) -> BlockExtension | None`` for every block; attaches and returns the
        extensions made (declare them with :meth:`add_method_params`)."""
        made = []
        for i in range(self.backbone.num_stages):
            for j, block in enumerate(self.backbone.blocks(i)):
                ext = make(i, j, block)
                if ext is not None:
                    made.append(self.extend(i, j, ext))
        return made

    def extensions_at(self, stage: int, index: int) -> list[BlockExtension]:
        mods = self.block_extensions[f"{stage}_{index}"] if f"{stage}_{index}" in self.block_extensions else None
        return list(mods) if mods is not None else []

    def use_convention(self, share: str, embed_per_stream: bool = False) -> None:
        """The shared/dedicated convention (:func:`mtbench.config.share_field`): ``dedicated`` sets
        :meth:`mtbench.encoder.StreamPlan.dedicated` (task streams from the patch embedding on, stacked on the batch,
        one backbone call); ``shared`` keeps one shared stream. Modules follow it through
        :class:`mtbench.streams.TaskIndexed` built with the same ``share``.

        Raises:
            MtbenchError: ``share`` not ``shared``/``dedicated``.
        """
        if share not in ("shared", "dedicated"):
            raise MtbenchError(f"share={share!r} is not one of shared, dedicated")
        self.share = share
        self.stream_plan = StreamPlan.dedicated(embed_per_stream) if share == "dedicated" else StreamPlan.shared()

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
        self._decoder_ids = {id(p) for p in self.decoders.parameters()} | {
            id(p) for p in self.interaction.parameters()}
        self._backbone_list = self.backbones()
        for p in self.parameters():
            cat, role = self.param_category(p)
            p.requires_grad_(cat in ("method", "decoder") or role in self._unfrozen_roles)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ forward
    def encode(self, images: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Per-task multi-scale features from the core loop (:func:`mtbench.encoder.encode`).

        Args:
            images: ``[B,3,H,W]``.

        Returns:
            ``{task: [4 NCHW maps]}`` matching ``backbone.feature_dims``.
        """
        feats, aux = encode(self, images)
        self._encoder_aux = aux
        return feats

    def check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise MtbenchError(f"images must be [B,3,H,W], got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != tuple(self.img_size):
            raise MtbenchError(f"images must be {self.img_size[0]}x{self.img_size[1]} for this backbone, got "
                               f"{images.shape[-2]}x{images.shape[-1]}")

    def forward(self, images: torch.Tensor, return_aux: bool = False):
        """Dense predictions: encoder -> per-task neck -> interaction -> per-task head.

        Args:
            images: ``[B,3,H,W]`` normalised images at the backbone's input size.
            return_aux: also return the auxiliary losses ``{name: scalar}`` (encoder hooks and interaction stage).

        Returns:
            ``{task: [B, C_task, H, W]}`` (logits for segmentation/sal/edge, raw normals, depth in metres), or
            ``(predictions, aux_losses)`` with ``return_aux``.

        Raises:
            MtbenchError: wrong input shape.
        """
        self.check_input(images)
        self._encoder_aux = {}
        feats = self.encode(images)
        size = tuple(images.shape[-2:])
        reduced = {t: self.decoders[t].neck(feats[t]) for t in self.task_names}
        reduced, aux = self.interaction(reduced)
        preds = {t: self.decoders[t].head(reduced[t], size) for t in self.task_names}
        if not return_aux:
            return preds
        return preds, {**self._encoder_aux, **aux}

