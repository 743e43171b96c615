"""The core's encoder seam: one loop over stages and blocks that every method extends, never rewrites.

How to write a method
=====================

A method is a :class:`mtbench.model.MultiTaskModel` subclass in ``methods/<name>.py``. It never loops over stages or
blocks and never calls private timm functions; it changes the encoder through five seams, all run by
:func:`encode` (the one stage loop):

1. **Replace or wrap a block's linear layers** (``qkv``, ``proj``, ``fc1``, ``fc2``, PatchMerging ``reduction``) with
   :func:`mtbench.lora.inject_lora` / ``setattr``. Inside the loop every tensor carries the streams of
   :func:`mtbench.streams.current_layout` stacked on dim 0, so a wrapper can apply per-task parameters to its task's
   rows (:class:`mtbench.streams.TaskIndexed`, :func:`mtbench.streams.per_stream`); see
   :class:`mtbench.lora.LoRALinear`.
2. **Add modules to a block** with :meth:`MultiTaskModel.extend_blocks`: a :class:`BlockExtension` has hooks before
   and after attention and the MLP, after the block, and at the proj split (below). Hooks receive a
   :class:`BlockContext` (stage, block index, stream layout, attention maps, a per-forward ``state`` dict for lateral
   paths, and ``aux_losses``).
3. **Per-task streams** from any block on: set ``self.stream_plan`` (:class:`StreamPlan`).
   ``StreamPlan.dedicated()`` splits right after the patch embedding (tasks stacked on the batch dimension through
   one backbone call: T streams, never T copies of the backbone); ``StreamPlan.last_block_per_stage()`` splits in the
   last block of each stage beside the shared stream, after the (shared) attention, as MTLoRA and TADFormer do. A
   ``post_block`` hook may also fork task streams after its block ran once on the shared stream
   (:meth:`BlockContext.fork`, VMT-Adapter). Each task's decoder receives its own stream's PatchMerging tap, or the
   shared tap when it has no stream.
4. **Prompt tokens**: return ``[B, P, C]`` (or ``[S*B, P, C]``) from :meth:`MultiTaskModel.init_prompts`; the loop
   prepends them to every window (zero-padded rel-pos bias and shift mask), updates them after each block
   (:meth:`MultiTaskModel.update_prompts`, VPT's ordinary-token update by default), and passes them through
   :meth:`MultiTaskModel.merge_prompts` at each PatchMerging. Deep prompts: replace ``ctx.prompts`` in a
   ``pre_block`` hook.
5. **Lateral paths**: ``attn_output``/``mlp_output`` hooks see the sublayer's input and output; keep the lateral
   features in ``ctx.state`` (the frozen backbone needs no grad and saves nothing when nothing trainable feeds it),
   and read them in ``stage_end``, which also sees the stage's taps and may return per-task features that replace
   the taps the task decoders receive (TDSS's lateral task features, ``methods/tdss.py``).

Worked example (the test-only method ``tests/methods_for_tests.py``): a per-task bias on every block's MLP output::

    class MLPBias(BlockExtension):
        def __init__(self, dim, tasks, share):
            super().__init__()
            self.bias = TaskIndexed(tasks, lambda t: AddBias(dim), share=share)

        def mlp_output(self, ctx, inp, out):        # out: [S*B, H, W, C]
            return self.bias(out)                   # task t's bias on task t's rows

    class TaskBias(MultiTaskModel):
        def __init__(self, backbone, tasks, cfg):
            super().__init__(backbone, tasks)
            if cfg.share == "dedicated":
                self.stream_plan = StreamPlan.dedicated()
            exts = self.extend_blocks(lambda stage, index, block: MLPBias(block.dim, self.task_names, cfg.share))
            self.add_method_params(exts)

Sources: Swin (Liu et al., ICCV 2021) block and PatchMerging as timm's ``SwinTransformerBlock`` /
``PatchMerging``; task streams as MTLoRA (Agiza et al., CVPR 2024, §3.2; official ``scale-lab/MTLoRA
models/swin_transformer_mtlora.py``); prompts in windows as VPT-Swin (Jia et al., ECCV 2022; official
``KMnP/vpt src/models/vit_prompt/swin_transformer.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtbench.errors import MtbenchError
from mtbench.lora import lora_input_recompute
from mtbench.streams import (
    SHARED, StreamLayout, first_and_rest, repeat_streams, split_streams, stream_layout, unstack_streams,
)
from mtbench.swin import (
    AttentionOutput, WindowContext, partition_windows, reverse_windows, update_prompt_tokens, window_attention,
)


@dataclass
class StreamPlan:
    """Which blocks carry per-task streams.

    Attributes:
        task_blocks: ``(stage, index, depth) -> bool``; True where the block's output carries one stream per task.
        keep_shared: carry the shared stream beside the task streams (MTLoRA/TADFormer: the next stage continues
            from it); False: the task streams replace it (dedicated convention).
        split_at: where a task block whose input is shared splits it: ``"block"`` (before ``norm1``: the whole block
            runs per stream) or ``"proj"`` (attention runs once on the shared input; the attention output is
            handed to each task stream at the output projection, see :meth:`BlockExtension.split`).
        embed_per_stream: dedicated plans only: the patch embedding itself runs on the task streams (images stacked
            T times under the task layout), for methods with per-task patch-embedding parameters (BitFit's
            dedicated biases); otherwise it runs once and its output is repeated.
    """

    task_blocks: Callable[[int, int, int], bool] = field(default=lambda stage, index, depth: False)
    keep_shared: bool = True
    split_at: str = "block"
    embed_per_stream: bool = False

    @classmethod
    def shared(cls) -> "StreamPlan":
        """One shared stream everywhere (the default)."""
        return cls()

    @classmethod
    def dedicated(cls, embed_per_stream: bool = False) -> "StreamPlan":
        """Task streams from the patch embedding on, no shared stream ("ded." convention, one batched pass)."""
        return cls(lambda stage, index, depth: True, keep_shared=False, split_at="block",
                   embed_per_stream=embed_per_stream)

    @classmethod
    def last_block_per_stage(cls, split_at: str = "proj") -> "StreamPlan":
        """Task streams in the last block of each stage beside the shared stream (MTLoRA §3.2, TADFormer §3.3)."""
        return cls(lambda stage, index, depth: index == depth - 1, keep_shared=True, split_at=split_at)

    def validate(self) -> None:
        if self.split_at not in ("block", "proj"):
            raise MtbenchError(f"StreamPlan.split_at={self.split_at!r} is not one of block, proj")


@dataclass
class BlockContext:
    """What a :class:`BlockExtension` hook sees.

    Attributes:
        stage, index: block position (``index`` within the stage); ``depth`` blocks in the stage.
        block: the timm ``SwinTransformerBlock``.
        layout: stream layout of the tensors after the split point (changes inside a splitting block).
        model: the :class:`mtbench.model.MultiTaskModel`.
        prompts: prompt tokens ``[S*B, P, C]`` entering the block, or None (hooks may replace them in
            ``pre_block``).
        attention: the block's :class:`mtbench.swin.AttentionOutput` (after attention).
        windows: the block's :class:`mtbench.swin.WindowContext`.
        state: per-forward dict shared by every hook (lateral features, recorded maps).
        scratch: per-block dict (e.g. a feature computed at the split and used in ``post_block``).
        aux_losses: ``{name: scalar}`` the forward returns besides the predictions.
    """

    stage: int
    index: int
    depth: int
    block: nn.Module
    layout: StreamLayout
    model: nn.Module
    prompts: torch.Tensor | None = None
    attention: AttentionOutput | None = None
    windows: WindowContext | None = None
    state: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def is_last_in_stage(self) -> bool:
        return self.index == self.depth - 1

    @property
    def is_final_block(self) -> bool:
        return self.is_last_in_stage and self.stage == self.model.backbone.num_stages - 1

    def fork(self, shared: torch.Tensor, task_rows: torch.Tensor) -> torch.Tensor:
        """Late split, from a ``post_block`` hook of a block that carries the shared stream alone: the block's
        output becomes the shared stream plus one stream per task, *after* the block ran once (VMT-Adapter's
        task-specific features: the backbone never runs per task). The loop continues with the new layout; as
        after any task block, each task's decoder receives its own stream's tap and the next stage continues from
        the shared stream unless the plan makes its first block a task block.

        Args:
            shared: ``[B, H, W, C]`` the block's (shared) output.
            task_rows: ``[T*B, H, W, C]`` the task streams, tasks in ``model.task_names`` order.

        Returns:
            ``[(1+T)*B, H, W, C]``; ``self.layout`` becomes ``(shared, *tasks)``.

        Raises:
            MtbenchError: the block already carries task streams, or ``task_rows`` has the wrong number of rows.
        """
        tasks = tuple(self.model.task_names)
        if self.layout.names != (SHARED,):
            raise MtbenchError(f"block {self.stage}.{self.index}: fork needs the shared stream alone, got "
                               f"{self.layout.names}")
        if task_rows.shape[0] != len(tasks) * shared.shape[0] or task_rows.shape[1:] != shared.shape[1:]:
            raise MtbenchError(f"block {self.stage}.{self.index}: fork got task rows {tuple(task_rows.shape)} for "
                               f"{len(tasks)} tasks and a shared stream {tuple(shared.shape)}")
        self.layout = StreamLayout((SHARED, *tasks), self.layout.batch)
        return torch.cat([shared, task_rows])


class BlockExtension(nn.Module):
    """Base class of modules a method attaches to a block; every hook defaults to identity.

    Hook tensors are NHWC ``[S*B, H, W, C]`` with the streams of ``ctx.layout`` stacked task-major, except the
    ``split`` hook (windows).
    """

    def wants_prompt_maps(self, ctx: BlockContext) -> bool:
        """True to get ``ctx.attention.prompt_logits/prompt_probs`` (costs an explicit softmax)."""
        return False

    def pre_block(self, ctx: BlockContext, x: torch.Tensor) -> torch.Tensor:
        """Block input ``x`` (before ``norm1``); may also replace ``ctx.prompts`` (deep prompts)."""
        return x

    def attn_input(self, ctx: BlockContext, h: torch.Tensor) -> torch.Tensor:
        """``norm1(x)`` before window partitioning (modules before attention)."""
        return h

    def split(self, ctx: BlockContext, values: torch.Tensor) -> torch.Tensor:
        """At a ``proj`` split: the task streams' inputs of the output projection from the shared stream's
        (dropout-applied, see :meth:`mtbench.lora.LoRALinear.split_forward`) pre-projection attention output.

        Args:
            values: ``[M, N, C]`` patch rows of the shared stream (``M = B*nW``).

        Returns:
            ``[T*M, N, C]``, tasks in ``ctx.layout.tasks`` order. Default: ``values`` for every task; with no
            extension overriding this, the loop tells the ``proj`` layer so (``repeats_shared_input``) and
            :meth:`mtbench.lora.LoRALinear.split_forward` reads ``values`` once instead of a copy per task.
        """
        return repeat_streams(values, len(ctx.layout.tasks))

    def rel_pos_bias(self, ctx: BlockContext, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The block's relative-position bias ``[S, heads, N, N]`` (one per stream of ``ctx.layout``, or ``S`` = 1),
        or None for the block's own table (the default). BitFit's per-task tables."""
        return bias

    def attn_output(self, ctx: BlockContext, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Attention branch output (projected, windows reversed, before drop-path and residual).

        ``inp`` is the branch input ``norm1(x)`` (streams before the split), ``out`` ``[S*B,H,W,C]``."""
        return out

    def mlp_input(self, ctx: BlockContext, h: torch.Tensor) -> torch.Tensor:
        """``norm2(x)`` before the MLP."""
        return h

    def mlp_output(self, ctx: BlockContext, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """MLP output (before drop-path and residual); ``inp`` is the MLP input."""
        return out

    def post_block(self, ctx: BlockContext, x: torch.Tensor) -> torch.Tensor:
        """Block output; may fork task streams from a shared-only block with :meth:`BlockContext.fork`."""
        return x


def run_block(block: nn.Module, x: torch.Tensor, ctx: BlockContext, extensions: list[BlockExtension],
              split: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One Swin block over stacked streams with the extensions' hooks (the arithmetic of timm's
    ``SwinTransformerBlock.forward``, reproduced exactly without hooks; tested).

    Args:
        block: timm ``SwinTransformerBlock`` (linears possibly wrapped).
        x: NHWC ``[S*B, H, W, C]`` in ``ctx.layout`` (the shared stream alone when ``split``).
        ctx: the block's context; ``ctx.layout`` is replaced by the task layout at a ``proj`` split.
        extensions: hooks, applied in order.
        split: split the shared input into shared + task streams at the output projection.

    Returns:
        ``(x [S'*B, H, W, C], prompts or None)``.
    """
    for e in extensions:
        x = e.pre_block(ctx, x)
    prompts = ctx.prompts
    shortcut = x
    h = block.norm1(x)
    for e in extensions:
        h = e.attn_input(ctx, h)
    windows, wctx = partition_windows(block, h)
    ctx.windows = wctx
    P = 0
    p_in = None
    if prompts is not None:
        P = prompts.shape[1]
        if prompts.shape[0] != x.shape[0]:  # prompts of the shared stream shown to every stream
            prompts = repeat_streams(prompts, x.shape[0] // prompts.shape[0])
        p_in = block.norm1(prompts)
    want_maps = P > 0 and any(e.wants_prompt_maps(ctx) for e in extensions)
    rel_bias = None
    for e in extensions:
        rel_bias = e.rel_pos_bias(ctx, rel_bias)
    att = window_attention(block.attn, windows, block.attn_mask, p_in, return_prompt_maps=want_maps,
                           rel_bias=rel_bias)
    ctx.attention = att
    attn = block.attn
    if split:
        shared_layout = ctx.layout
        ctx.layout = StreamLayout((SHARED, *ctx.model.task_names), shared_layout.batch)

        splitters = [e for e in extensions if type(e).split is not BlockExtension.split]
        if len(splitters) > 1:
            raise MtbenchError(f"block {ctx.stage}.{ctx.index}: {len(splitters)} extensions define split; at most 1")

        def make_task_inputs(values: torch.Tensor) -> torch.Tensor:
            return (splitters[0] if splitters else BlockExtension()).split(ctx, values)

        # the default split repeats the shared input for every task: a layer may read it once instead
        make_task_inputs.repeats_shared_input = not splitters
        with stream_layout(ctx.layout):
            if hasattr(attn.proj, "split_forward"):
                proj_shared, proj_tasks = attn.proj.split_forward(att.values, P, make_task_inputs)
            else:
                proj_shared = attn.proj(att.values)
                proj_tasks = attn.proj(make_task_inputs(att.values[:, P:]))
        proj_shared = attn.proj_drop(proj_shared)
        patches = torch.cat([proj_shared[:, P:], attn.proj_drop(proj_tasks)])
        prompt_rows = proj_shared[:, :P]
    else:
        proj = attn.proj_drop(attn.proj(att.values))
        patches, prompt_rows = proj[:, P:], proj[:, :P]
    with stream_layout(ctx.layout):
        a = reverse_windows(block, patches, wctx)
        for e in extensions:
            a = e.attn_output(ctx, h, a)
        if split:  # the shared shortcut broadcast over the streams (never materialised S times)
            x = (split_streams(block.drop_path1(a), ctx.layout.size) + shortcut).view(a.shape)
        else:
            x = shortcut + block.drop_path1(a)
        h2 = block.norm2(x)
        for e in extensions:
            h2 = e.mlp_input(ctx, h2)
        m = block.mlp(h2)
        for e in extensions:
            m = e.mlp_output(ctx, h2, m)
        x = x + block.drop_path2(m)
        for e in extensions:
            x = e.post_block(ctx, x)
    if prompts is not None:
        if split:
            prompts = ctx.prompts  # the shared stream's prompts
        if ctx.model.prompts_updated(ctx):
            prompts = ctx.model.update_prompts(ctx, prompts, prompt_rows, wctx.num_windows)
    return x, prompts


#: ``--activation-checkpoint`` choices, each keeping less for backward than the one before. ``lora_inputs``: LoRA layers
#: keep no copy of their input where it is a LayerNorm's or GELU's output and recompute it in backward from the input
#: that LayerNorm or GELU keeps anyway (:func:`mtbench.lora.recompute_lora_inputs`); ``task``: that, and the blocks
#: that run more than one stream (where the task streams split off or continue; MTLoRA and TADFormer: the last block
#: of each stage) keep only their inputs for backward and run their forward again there; ``all``: that, for every
#: block (the official Swin code's ``USE_CHECKPOINT``); ``none``: nothing recomputed.
ACTIVATION_CHECKPOINT = ("none", "lora_inputs", "task", "all")


def check_activation_checkpoint(mode: str) -> str:
    """``mode`` when it is one of :data:`ACTIVATION_CHECKPOINT`.

    Raises:
        MtbenchError: any other value, naming it and the choices.
    """
    if mode not in ACTIVATION_CHECKPOINT:
        raise MtbenchError(f"unknown --activation-checkpoint {mode!r}; valid: {', '.join(ACTIVATION_CHECKPOINT)}")
    return mode


def _checkpointed(model: nn.Module, layout: StreamLayout, split: bool) -> bool:
    mode = check_activation_checkpoint(getattr(model, "activation_checkpoint", "none"))
    if mode in ("none", "lora_inputs") or not (model.training and torch.is_grad_enabled()):
        return False
    return mode == "all" or split or layout.size > 1


def _context_factory(stage: int, index: int, depth: int, block, layout: StreamLayout, model, state: dict,
                     aux: dict) -> Callable:
    """Contexts of one block: the first call gets the live model state and auxiliary losses; later calls (a
    checkpoint's recomputation in backward) get a copy of the state as the block first saw it, and write aside."""
    before = dict(state)
    calls = 0

    def make(prompts):
        nonlocal calls
        calls += 1
        first = calls == 1
        return BlockContext(stage, index, depth, block, layout, model, prompts, state=state if first else dict(before),
                            aux_losses=aux if first else {})

    return make


def _block_step(block, x, prompts, make_ctx: Callable, exts, split: bool, out: list, recompute_inputs: bool):
    """One block from a fresh context (so that a checkpoint's recomputation starts from the same state); the
    context is left in ``out``. The stream layout and the LoRA-input recomputation are set here, not by the caller,
    so that a checkpoint's recomputation in backward runs under the same ones."""
    ctx = make_ctx(prompts)
    with stream_layout(ctx.layout), lora_input_recompute(recompute_inputs):
        y, p = run_block(block, x, ctx, exts, split)
    out[:] = [ctx]
    return y, p


def _plain_block(block, x, layout: StreamLayout, recompute_inputs: bool):
    """timm's own ``block(x)`` under ``layout`` (see :func:`_block_step` for why here)."""
    with stream_layout(layout), lora_input_recompute(recompute_inputs):
        return block(x)


def encode(model: nn.Module, images: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
    """The one stage loop: per-task multi-scale features of a :class:`mtbench.model.MultiTaskModel`.

    Blocks without extensions, prompts or a split run timm's own ``block(x)`` (exact and fastest); the others run
    :func:`run_block`. After each stage every stream goes through the stage's tap (PatchMerging into the next stage,
    identity after the last) in one call; the next stage continues from all streams when its first block is a task
    block, else from the shared stream.

    Args:
        model: the method's model (``backbone``, ``task_names``, ``stream_plan``, ``block_extensions``, prompt hooks).
        images: ``[B, 3, H, W]``.

    Returns:
        ``({task: [4 NCHW maps]}, aux_losses)``; the maps are channels-last views of the NHWC taps (no copy).

    Raises:
        MtbenchError: a plan that drops the shared stream and later needs it.
    """
    recompute_inputs = getattr(model, "activation_checkpoint", "none") != "none"
    with lora_input_recompute(recompute_inputs):
        return _encode(model, images, recompute_inputs)


def _encode(model: nn.Module, images: torch.Tensor,
            recompute_inputs: bool) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
    """:func:`encode`'s loop."""
    bb = model.backbone
    plan: StreamPlan = model.stream_plan
    tasks = tuple(model.task_names)
    B = images.shape[0]
    layout = StreamLayout((SHARED,), B)
    state: dict[str, Any] = {}
    aux: dict[str, torch.Tensor] = {}
    first_depth = len(bb.blocks(0))
    if plan.task_blocks(0, 0, first_depth) and not plan.keep_shared:  # dedicated: split before the first block
        layout = StreamLayout(tasks, B)
        if plan.embed_per_stream:
            with stream_layout(layout):
                x = bb.embed(repeat_streams(images, len(tasks)))
        else:
            x = repeat_streams(bb.embed(images), len(tasks))
    else:
        x = bb.embed(images)
    prompts = model.init_prompts(layout)
    feats: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    for i in range(bb.num_stages):
        blocks = bb.blocks(i)
        depth = len(blocks)
        for j, block in enumerate(blocks):
            want_tasks = plan.task_blocks(i, j, depth)
            split = want_tasks and layout.names == (SHARED,)
            if split and plan.split_at == "block":
                layout = StreamLayout((SHARED, *tasks) if plan.keep_shared else tasks, B)
                x = repeat_streams(x, layout.size)
                split = False
            exts = model.extensions_at(i, j)
            ckpt = _checkpointed(model, layout, split)
            if not exts and prompts is None and not split:
                args = (block, x, layout, recompute_inputs)
                x = checkpoint(_plain_block, *args, use_reentrant=False) if ckpt else _plain_block(*args)
                continue

            make_ctx = _context_factory(i, j, depth, block, layout, model, state, aux)
            out: list[BlockContext] = []
            args = (block, x, prompts, make_ctx, exts, split, out, recompute_inputs)
            x, prompts = checkpoint(_block_step, *args, use_reentrant=False) if ckpt else _block_step(*args)
            layout = out[0].layout
        if layout.has_shared and layout.size > 1:  # shared rows apart: the next stage's input does not depend on T
            x_shared, x_tasks = first_and_rest(x, layout.size)
            with stream_layout(StreamLayout((SHARED,), B)):
                shared_tap = bb.tap(i, x_shared)
            with stream_layout(StreamLayout(layout.tasks, B)):
                task_tap = bb.tap(i, x_tasks)
            tap = torch.cat([shared_tap, task_tap])
        else:
            with stream_layout(layout):
                tap = bb.tap(i, x)
        taps = split_streams(tap, layout.size)
        rows = unstack_streams(tap, layout.size)  # per-stream views whose backward is one concatenation
        for t in tasks:
            feats[t].append(rows[layout.index(t) if t in layout.names else layout.index(SHARED)])
        lateral = model.stage_end(i, layout, taps, state)
        if lateral is not None:  # a lateral path's own per-task taps replace what the decoders receive
            for t in tasks:
                feats[t][-1] = lateral[t]
        if i < bb.num_stages - 1:
            if not plan.task_blocks(i + 1, 0, len(bb.blocks(i + 1))) and layout.size > 1:
                if not layout.has_shared:
                    raise MtbenchError("the stream plan ends the task streams but kept no shared stream")
                tap = rows[layout.index(SHARED)]
                layout = StreamLayout((SHARED,), B)
            x = tap
            if prompts is not None:
                prompts = model.merge_prompts(i, prompts)
    return {t: [f.permute(0, 3, 1, 2) for f in fs] for t, fs in feats.items()}, aux  # channels-last NCHW views


class EncoderHooks:
    """The model-level hooks :func:`encode` calls, with their defaults (mixed into
    :class:`mtbench.model.MultiTaskModel`; a method overrides what it needs)."""

    #: where the task streams exist (set an instance attribute in ``__init__`` to change it)
    stream_plan: StreamPlan = StreamPlan()
    #: activation checkpointing of blocks in training (:data:`ACTIVATION_CHECKPOINT`); an execution setting, not part of
    #: the method (outputs and gradients are unchanged), set by ``mtbench run/profile --activation-checkpoint``
    activation_checkpoint: str = "none"

    def extensions_at(self, stage: int, index: int) -> list[BlockExtension]:
        """Extensions of block ``index`` of ``stage``, in the order their hooks run."""
        return []

    def init_prompts(self, layout: StreamLayout) -> torch.Tensor | None:
        """Prompt tokens entering the first block, ``[B, P, C_1]`` (shared by every stream) or ``[S*B, P, C_1]``
        (one set per stream of ``layout``); None = no prompts."""
        return None

    def prompts_updated(self, ctx: BlockContext) -> bool:
        """Whether the prompts are updated after this block (default: not after the network's final block, whose
        prompt outputs are never used)."""
        return not ctx.is_final_block

    def update_prompts(self, ctx: BlockContext, prompts: torch.Tensor, projected: torch.Tensor,
                       num_windows: int) -> torch.Tensor:
        """Prompts after a block from their projected attention rows ``[S*B*nW, P, C]``; default VPT's
        ordinary-token update (:func:`mtbench.swin.update_prompt_tokens`)."""
        return update_prompt_tokens(ctx.block, prompts, projected, num_windows, residual=True)

    def merge_prompts(self, stage: int, prompts: torch.Tensor) -> torch.Tensor:
        """Prompts through the PatchMerging after ``stage``: ``[S*B, P, C]`` -> ``[S*B, P, 2C]``.

        Raises:
            MtbenchError: a method with prompts must define it.
        """
        raise MtbenchError(f"{type(self).__name__} has prompts but does not define merge_prompts")

    def stage_end(self, stage: int, layout: StreamLayout, taps: torch.Tensor,
                  state: dict) -> dict[str, torch.Tensor] | None:
        """Called after each stage with the taps ``[S, B, h, w, C']`` of every stream (lateral paths).

        Returns:
            None (the decoders receive the streams' taps), or ``{task: NHWC [B, h, w, C']}``: a lateral path's own
            per-task features of this stage, which replace the taps the task decoders receive (the next stage still
            continues from the backbone's streams).
        """
        return None


class PlainClient(EncoderHooks):
    """The backbone alone, no method: one shared stream (used by :meth:`mtbench.swin.SwinBackbone.forward`)."""

    TASK = "features"

    def __init__(self, backbone: nn.Module):
        self.backbone = backbone
        self.task_names = [self.TASK]
