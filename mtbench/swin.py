"""The Swin backbone shared by every method, and the window-attention building blocks methods compose.

The backbone is timm's ``SwinTransformer`` (Liu et al., ICCV 2021; ``timm/models/swin_transformer.py``) without its
final LayerNorm and classifier. Multi-scale features are tapped as in MTLoRA (Agiza et al., CVPR 2024, §4.1; official
code ``scale-lab/MTLoRA models/swin_mtl.py``): after each stage's PatchMerging, i.e. timm's ``stages[i+1].downsample``
applied to stage ``i``'s block output, and the last stage's output. For Swin-T at 448x448 this gives strides 8/16/32/32
with 192/384/768/768 channels.

Two backbones are known:

* ``swin_tiny_patch4_window7_224`` — the papers' Swin-T, built at 448x448 (timm weights via ``pretrained=True`` or a
  local checkpoint in timm or original-Swin format).
* ``swin_embedded`` — a small Swin with the same structure (patch embedding, 4 stages of window-attention blocks,
  PatchMerging) for the embedded 64x64 synthetic dataset; weights ship inside the package.

Building blocks (:func:`partition_windows`, :func:`reverse_windows`, :func:`window_attention`,
:func:`prompted_block`) re-implement the arithmetic of timm's ``SwinTransformerBlock._attn`` / ``WindowAttention``
so that methods can insert task prompts (VPT, Jia et al. ECCV 2022 §3.2; TADFormer §3.3) or task streams (MTLoRA §3.2)
while reusing the block's own (possibly LoRA-wrapped) weights. With no prompts they reproduce timm exactly (tested).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtbench.errors import MtbenchError

ASSET_DIR = Path(__file__).parent / "assets"
EMBEDDED_WEIGHTS = ASSET_DIR / "swin_embedded.safetensors"

#: Architecture of the embedded small Swin (same structure as Swin-T, scaled down for 64x64 inputs).
EMBEDDED_SWIN_ARGS = dict(patch_size=4, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4)

#: Backbone name -> (timm model name or None, default input size, default stochastic-depth rate). The decoder is
#: chosen separately (:mod:`mtbench.decoders`, ``--decoder``).
BACKBONES = {
    "swin_tiny_patch4_window7_224": ("swin_tiny_patch4_window7_224", 448, 0.2),
    "swin_embedded": (None, 64, 0.0),
}

#: Structural role of each backbone parameter, used for freezing and the #TP breakdown.
ROLES = ("patch_embed", "norm", "rel_pos", "patch_merging", "bias", "weight")


def _timm_swin_classes():
    from timm.models.swin_transformer import PatchMerging, SwinTransformer, WindowAttention

    return SwinTransformer, WindowAttention, PatchMerging


class SwinBackbone(nn.Module):
    """A timm Swin without final norm and head, exposing its stages and MTLoRA-style feature taps.

    Args:
        model: a ``timm.models.swin_transformer.SwinTransformer``.

    Attributes:
        patch_embed: timm ``PatchEmbed``; maps ``[B,3,H,W]`` to NHWC ``[B,H/p,W/p,C]``.
        stages: timm ``SwinTransformerStage`` list; ``stages[i].downsample`` is the PatchMerging *into* stage ``i``.
        stage_dims: channel width of each stage's blocks, e.g. ``[96,192,384,768]`` for Swin-T.
        feature_dims: channels of the four taps, e.g. ``[192,384,768,768]`` for Swin-T.
        roles: ``{parameter name: role}`` with role in :data:`ROLES`, computed structurally at construction.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        _, WindowAttention, PatchMerging = _timm_swin_classes()
        self.patch_embed = model.patch_embed
        self.stages = model.layers
        self.stage_dims = [int(s.blocks[0].dim) for s in self.stages]
        self.feature_dims = [int(self.stages[i + 1].downsample.out_dim) for i in range(len(self.stages) - 1)]
        self.feature_dims.append(self.stage_dims[-1])
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.name = "swin"
        self.img_size = tuple(int(v) for v in model.patch_embed.img_size)
        roles: dict[str, str] = {}
        for mod_name, mod in self.named_modules():
            for p_name, _ in mod.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if full.startswith("patch_embed."):
                    role = "patch_embed"
                elif isinstance(mod, nn.LayerNorm):
                    role = "norm"
                elif isinstance(mod, WindowAttention) and p_name == "relative_position_bias_table":
                    role = "rel_pos"
                elif isinstance(mod, nn.Linear) and p_name == "weight" and _is_merge_reduction(self, mod_name,
                                                                                               PatchMerging):
                    role = "patch_merging"
                elif p_name == "bias":
                    role = "bias"
                else:
                    role = "weight"
                roles[full] = role
        self.roles = roles
        self._role_by_id = {id(p): roles[n] for n, p in self.named_parameters()}

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def depths(self) -> list[int]:
        """Blocks per stage, e.g. ``[2, 2, 6, 2]`` for Swin-T (methods size per-block modules from it)."""
        return [len(s.blocks) for s in self.stages]

    def role_of(self, param: nn.Parameter) -> str | None:
        """The structural role of a backbone parameter, or None if it was not part of the original backbone."""
        return self._role_by_id.get(id(param))

    def params_with_roles(self, roles: set[str] | tuple[str, ...]) -> list[nn.Parameter]:
        """Original backbone parameters whose role is in ``roles`` (see :data:`ROLES`)."""
        bad = set(roles) - set(ROLES)
        if bad:
            raise MtbenchError(f"unknown backbone role(s) {sorted(bad)}; valid: {', '.join(ROLES)}")
        return [p for p in self.parameters() if self._role_by_id.get(id(p)) in roles]

    def clone(self) -> "SwinBackbone":
        """A deep copy with its own parameters and the same structural roles (for per-task backbones)."""
        import copy

        other = copy.deepcopy(self)
        other._role_by_id = {id(pc): self._role_by_id[id(po)] for po, pc in zip(self.parameters(), other.parameters())
                             if id(po) in self._role_by_id}
        return other

    def blocks(self, stage: int) -> nn.Sequential:
        return self.stages[stage].blocks

    def tap(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        """The MTLoRA feature tap of ``stage``: PatchMerging into the next stage, or identity for the last stage.

        Args:
            x: NHWC ``[B,H,W,C]`` output of stage ``stage``'s blocks (``B`` may hold stacked task streams).

        Returns:
            NHWC ``[B,H/2,W/2,2C]`` (or ``x`` for the last stage).
        """
        if stage < self.num_stages - 1:
            return self.stages[stage + 1].downsample(x)
        return x

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding: ``[B,3,H,W]`` -> NHWC ``[B,H/p,W/p,C]``."""
        return self.patch_embed(images)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Shared multi-scale features (the core loop :func:`mtbench.encoder.encode` with no method hooks).

        Args:
            images: ``[B,3,H,W]`` normalised images; ``H, W`` must equal the backbone's ``img_size``.

        Returns:
            Four NCHW tensors ``[B, feature_dims[i], H/s_i, W/s_i]`` with ``s = p*(2,4,8,8)``.
        """
        from mtbench.encoder import PlainClient, encode

        feats, _ = encode(PlainClient(self), images)
        return feats[PlainClient.TASK]


def _is_merge_reduction(backbone: nn.Module, mod_name: str, merge_cls) -> bool:
    if not mod_name.endswith(".reduction"):
        return False
    parent = backbone.get_submodule(mod_name.rsplit(".", 1)[0])
    return isinstance(parent, merge_cls)


def check_weights_file(weights: str | os.PathLike | None) -> None:
    """Fail before any work when a given ``--weights`` is not a file.

    Raises:
        MtbenchError: ``weights`` is a directory, or does not exist.
    """
    if weights is not None and Path(weights).is_dir():
        raise MtbenchError(f"--weights {str(weights)!r} is a directory; give a checkpoint file (.pth, .bin or "
                           ".safetensors)")
    if weights is not None and not Path(weights).is_file():
        raise MtbenchError(f"weights file not found: {str(weights)!r}")


def create_backbone(
    name: str = "swin_embedded",
    *,
    img_size: int | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
    drop_path_rate: float | None = None,
) -> SwinBackbone:
    """Build a backbone.

    Args:
        name: a key of :data:`BACKBONES`.
        img_size: input size (square); default 448 for Swin-T, 64 for ``swin_embedded``.
        pretrained: Swin-T: load timm's ImageNet-1k weights (needs network the first time, then timm's cache);
            ``swin_embedded``: load the weights shipped in the package.
        weights: path to a local checkpoint (``.pth``/``.pt``/``.bin``/``.safetensors``), timm or original-Swin key
            format; overrides ``pretrained``.
        drop_path_rate: stochastic depth; default per backbone (0.2 for Swin-T as in MTLoRA, 0.0 embedded).

    Raises:
        MtbenchError: unknown backbone, missing weights file, or a checkpoint that does not fit the architecture.
    """
    import timm

    if name not in BACKBONES:
        raise MtbenchError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    timm_name, default_size, default_dpr = BACKBONES[name]
    size = int(img_size or default_size)
    dpr = default_dpr if drop_path_rate is None else float(drop_path_rate)
    check_weights_file(weights)
    SwinTransformer, _, _ = _timm_swin_classes()
    if timm_name is not None:
        try:
            model = timm.create_model(timm_name, pretrained=pretrained and weights is None, img_size=size,
                                      num_classes=0, drop_path_rate=dpr)
        except Exception as e:  # network failures etc. surface as one line
            raise MtbenchError(f"could not build {timm_name} (pretrained={pretrained}): {str(e).splitlines()[0]}"
                               ) from None
    else:
        model = SwinTransformer(img_size=size, num_classes=0, drop_path_rate=dpr, **EMBEDDED_SWIN_ARGS)
        if pretrained and weights is None:
            if not EMBEDDED_WEIGHTS.is_file():
                raise MtbenchError(f"embedded weights missing at {EMBEDDED_WEIGHTS}; run `mtbench pretrain`")
            weights = EMBEDDED_WEIGHTS
    if weights is not None:
        load_checkpoint(model, weights)
    model.norm = nn.Identity()
    model.head = nn.Identity()
    backbone = SwinBackbone(model)
    backbone.name = name
    return backbone


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a Swin checkpoint (timm or original Microsoft key layout) into a timm ``SwinTransformer``.

    Keys of the classifier head and the final norm are ignored; relative-position tables and patch embeddings of
    another window/patch size are resized by timm's ``checkpoint_filter_fn``.

    Raises:
        MtbenchError: unreadable file, or backbone keys missing / of the wrong shape.
    """
    from timm.models.swin_transformer import checkpoint_filter_fn

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if path.suffix != ".safetensors" and not isinstance(e, OSError):  # torch's own words are internal ("list
            # index out of range" for a text file) or advise an unsafe load: never repeat them
            why = "not a tensor state dict that torch.load(weights_only=True) reads"
        raise MtbenchError(f"cannot read checkpoint {str(path)!r}: {why} (a timm or original Swin .pth, .bin or "
                           ".safetensors)") from None
    if not isinstance(state, dict):
        raise MtbenchError(f"checkpoint {str(path)!r} holds no state dict")
    own = model.state_dict()
    # A checkpoint already in this timm model's own layout (e.g. the packaged embedded weights) is loaded as it is:
    # timm's filter guesses the layout from key names, and some timm versions (1.0.29) re-map the PatchMerging keys
    # of a timm-layout checkpoint as if they were original-Swin keys.
    native = all(k in state and tuple(state[k].shape) == tuple(v.shape) for k, v in own.items()
                 if not (k.startswith("head") or k.startswith("norm.") or k.endswith("relative_position_index")
                         or k.endswith("attn_mask")))
    try:
        state = {k: v.float() if torch.is_floating_point(v) else v for k, v in
                 (state if native else checkpoint_filter_fn(state, model)).items()}
    except Exception as e:  # e.g. tensors that cannot be resized to this architecture
        raise MtbenchError(f"checkpoint {str(path)!r} does not fit this Swin: {str(e).splitlines()[0]}") from None
    state = {k: v for k, v in state.items() if not (k.startswith("head") or k.startswith("norm."))}
    wanted = {k for k in own if not (k.startswith("head") or k.startswith("norm."))}
    missing = sorted(wanted - set(state))
    if missing:
        raise MtbenchError(f"checkpoint {str(path)!r} lacks {len(missing)} backbone keys, e.g. {missing[0]!r}")
    for k in wanted:
        if tuple(state[k].shape) != tuple(own[k].shape):
            raise MtbenchError(f"checkpoint {str(path)!r}: {k} has shape {tuple(state[k].shape)}, "
                               f"model expects {tuple(own[k].shape)}")
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)


# ----------------------------------------------------------------------------------------------------------------
# Window attention building blocks
# ----------------------------------------------------------------------------------------------------------------


def relative_position_bias(attn: nn.Module) -> torch.Tensor:
    """The window's relative-position bias ``[1, heads, N, N]`` (Swin §3.2, Eq. 4) from a timm ``WindowAttention``'s
    public ``relative_position_bias_table`` ``[(2wh-1)(2ww-1), heads]`` and ``relative_position_index`` ``[N, N]``;
    equals timm's private ``WindowAttention._get_rel_pos_bias`` (tested)."""
    N = attn.relative_position_index.shape[0]
    bias = attn.relative_position_bias_table[attn.relative_position_index.reshape(-1)].view(N, N, -1)
    return bias.permute(2, 0, 1).contiguous().unsqueeze(0)


@dataclass
class WindowContext:
    """Geometry needed to undo :func:`partition_windows`."""

    batch: int
    height: int
    width: int
    padded_height: int
    padded_width: int
    num_windows: int


def partition_windows(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, WindowContext]:
    """Cyclic shift, pad and split into windows, as timm's ``SwinTransformerBlock._attn``.

    Args:
        block: a timm ``SwinTransformerBlock`` (its ``window_size`` and ``shift_size`` are used).
        x: NHWC ``[B,H,W,C]`` (already normalised by ``norm1``).

    Returns:
        ``([B*nW, wh*ww, C], ctx)``; windows of image ``b`` occupy rows ``b*nW .. (b+1)*nW-1``.
    """
    B, H, W, C = x.shape
    wh, ww = block.window_size
    if any(block.shift_size):
        x = torch.roll(x, shifts=(-block.shift_size[0], -block.shift_size[1]), dims=(1, 2))
    pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    windows = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww, C)
    return windows, WindowContext(B, H, W, Hp, Wp, (Hp // wh) * (Wp // ww))


def reverse_windows(block: nn.Module, windows: torch.Tensor, ctx: WindowContext) -> torch.Tensor:
    """Inverse of :func:`partition_windows`: ``[B*nW, wh*ww, C]`` -> NHWC ``[B,H,W,C]``."""
    wh, ww = block.window_size
    C = windows.shape[-1]
    Hp, Wp = ctx.padded_height, ctx.padded_width
    x = windows.reshape(-1, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)
    x = x[:, : ctx.height, : ctx.width, :]
    if any(block.shift_size):
        x = torch.roll(x, shifts=tuple(block.shift_size), dims=(1, 2))
    return x.contiguous()


@dataclass
class AttentionOutput:
    """Result of :func:`window_attention`.

    Attributes:
        values: pre-projection attention output ``[B*nW, P+N, C]`` (prompt rows first when prompts were given).
        prompt_logits: unscaled ``q·kᵀ`` of prompt rows x patch columns ``[B*nW, heads, P, N]`` (None without prompts
            or when not requested).
        prompt_probs: the softmax attention of prompt rows restricted to patch columns ``[B*nW, heads, P, N]`` (same
            conditions).
    """

    values: torch.Tensor
    prompt_logits: torch.Tensor | None = None
    prompt_probs: torch.Tensor | None = None


def window_attention(
    attn: nn.Module,
    windows: torch.Tensor,
    mask: torch.Tensor | None,
    prompts: torch.Tensor | None = None,
    return_prompt_maps: bool = False,
    rel_bias: torch.Tensor | None = None,
) -> AttentionOutput:
    """Multi-head self-attention inside windows, optionally with prompt tokens prepended to every window.

    Prompts (VPT on Swin, Jia et al. ECCV 2022, official ``KMnP/vpt src/models/vit_prompt/swin_transformer.py``;
    TADFormer §3.3 / official ``Min100KM/TADFormer models/swin_transformer_tadformer.py``): the ``P`` prompts of each
    image are broadcast to all of its ``nW`` windows and prepended to the window tokens; the relative-position bias
    and the shift mask apply only to the patch x patch block (zero for prompt rows and columns).

    Args:
        attn: timm ``WindowAttention`` (its ``qkv``, possibly LoRA-wrapped, and rel-pos table are used; ``proj`` is
            NOT applied so that callers can run shared and task-specific projections).
        windows: ``[B*nW, N, C]`` from :func:`partition_windows`.
        mask: the block's shift mask ``[nW, N, N]`` (0 / -100) or None.
        prompts: ``[B, P, C]`` prompt tokens (already normalised by the block's ``norm1``) or None.
        return_prompt_maps: also return prompt-row attention logits and probabilities.
        rel_bias: relative-position bias ``[S, heads, N, N]`` to use instead of the block's own table, one per stream
            of the stacked windows (``S`` = 1: the same for all; per-task tables of BitFit's dedicated convention).

    Returns:
        :class:`AttentionOutput`.
    """
    B_, N, C = windows.shape
    P = 0 if prompts is None else prompts.shape[1]
    if prompts is not None:
        nW = B_ // prompts.shape[0]
        windows = torch.cat([prompts.repeat_interleave(nW, dim=0), windows], dim=1)
    L = P + N
    heads = attn.num_heads
    qkv = attn.qkv(windows).reshape(B_, L, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = relative_position_bias(attn) if rel_bias is None else rel_bias  # [S, heads, N, N], S = 1 or streams
    Sb = bias.shape[0]
    if P:
        bias = F.pad(bias, (P, 0, P, 0))
    if mask is not None:
        nWm = mask.shape[0]
        m = F.pad(mask, (P, 0, P, 0)) if P else mask
        bias = (bias.view(Sb, 1, 1, heads, L, L) + m.view(1, 1, nWm, 1, L, L)).expand(
            Sb, B_ // (Sb * nWm), nWm, heads, L, L).reshape(B_, heads, L, L)
    elif Sb > 1:
        bias = bias.view(Sb, 1, heads, L, L).expand(Sb, B_ // Sb, heads, L, L).reshape(B_, heads, L, L)
    if not return_prompt_maps:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
        return AttentionOutput(out.transpose(1, 2).reshape(B_, L, -1))
    logits = q @ k.transpose(-2, -1)
    probs = torch.softmax(logits * attn.scale + bias, dim=-1)
    out = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(B_, L, -1)
    if P == 0:
        return AttentionOutput(out)
    return AttentionOutput(out, logits[:, :, :P, P:], probs[:, :, :P, P:])


def prompted_block(
    block: nn.Module,
    x: torch.Tensor,
    prompts: torch.Tensor,
    prompt_residual: bool = True,
    update_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Swin block over patch tokens plus prompt tokens (shallow VPT carried through the block).

    Patch tokens follow timm's block exactly, with prompts taking part in each window's attention. Each image's
    prompt outputs are averaged over its windows (VPT-Swin, TADFormer official code).

    Args:
        block: timm ``SwinTransformerBlock`` (linears may be LoRA-wrapped).
        x: NHWC ``[B,H,W,C]``.
        prompts: ``[B,P,C]``.
        prompt_residual: True: prompts are updated as ordinary tokens, ``p += attn(norm1 p); p += mlp(norm2 p)``
            (VPT, TADFormer paper §3.1). False: the TADFormer official-code update ``p_new = p + mlp(norm2(attn(norm1
            p)))`` (no residual around attention).
        update_prompts: False returns the prompts unchanged after this block (official code, network's last block).

    Returns:
        ``(x [B,H,W,C], prompts [B,P,C])``.
    """
    P = prompts.shape[1]
    windows, ctx = partition_windows(block, block.norm1(x))
    out = window_attention(block.attn, windows, block.attn_mask, block.norm1(prompts))
    proj = block.attn.proj_drop(block.attn.proj(out.values))
    x = x + block.drop_path1(reverse_windows(block, proj[:, P:], ctx))
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    if update_prompts:
        prompts = update_prompt_tokens(block, prompts, proj[:, :P], ctx.num_windows, prompt_residual)
    return x, prompts


def update_prompt_tokens(
    block: nn.Module, prompts: torch.Tensor, projected: torch.Tensor, num_windows: int, residual: bool = True
) -> torch.Tensor:
    """The prompts after a block: window-averaged attention output, then the MLP.

    Args:
        block: timm ``SwinTransformerBlock`` (its ``mlp``, ``norm2`` and drop paths are used).
        prompts: ``[B,P,C]`` prompts entering the block.
        projected: ``[B*nW, P, C]`` projected attention output of the prompt rows of every window.
        num_windows: ``nW``, windows per image.
        residual: True: ordinary tokens, ``p += attn; p += mlp(norm2 p)`` (VPT; TADFormer paper §3.1). False: the
            TADFormer official-code update ``p + mlp(norm2(attn))`` (no residual around attention).

    Returns:
        ``[B,P,C]``.
    """
    B, P, C = prompts.shape
    attn_p = projected.reshape(B, num_windows, P, C).mean(1)
    if residual:
        p = prompts + block.drop_path1(attn_p)
        return p + block.drop_path2(block.mlp(block.norm2(p)))
    return prompts + block.drop_path2(block.mlp(block.norm2(attn_p)))


def merge_prompts_by_copies(merge: nn.Module, prompts: torch.Tensor) -> torch.Tensor:
    """Prompt tokens through a PatchMerging as the official VPT-Swin code does: each prompt is widened ``C -> 4C`` by
    concatenating 4 copies of itself (the learnable upsampling there is disabled), then goes through the merge's own
    ``norm`` and ``reduction`` like a merged patch (``KMnP/vpt src/models/vit_prompt/swin_transformer.py``,
    ``PromptedPatchMerging``).

    Args:
        merge: timm ``PatchMerging`` (``norm``, ``reduction``; possibly wrapped).
        prompts: ``[B, P, C]``.

    Returns:
        ``[B, P, 2C]``.
    """
    return merge.reduction(merge.norm(torch.cat([prompts] * 4, dim=-1)))
