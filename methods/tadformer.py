"""TADFormer: Task-Adaptive Dynamic transFormer for efficient multi-task learning (Baek, Lee, Jo, Choi, Min;
CVPR 2025, arXiv 2501.04293). Official code ``github.com/Min100KM/TADFormer@1f53b9f``
(``models/swin_transformer_tadformer.py``, ``models/lora.py``; facts in ``shared/reference/methods.md`` §10).
Written from the paper; the official code is used only to settle what the paper leaves open, and each place
where the two differ is a named option.

Structure (as MTLoRA, ``methods/mtlora.py``: per-task streams in the last block of each stage, split from the shared
stream at ``proj`` and passed through the frozen shared PatchMerging, stacked on the batch, into each task's decoder;
the shared stream continues to the next stage; all on the core's seams, :mod:`mtbench.encoder`):

* **TS-module** (§3.2, Eq. 1): a shared LoRA ``X_out = Φ(X) + (X W_down) W_up`` of rank ``r`` (16/32/64), raw scale
  ``s = 4``, dropout 0.05 on ``qkv``, ``proj``, ``fc1``, ``fc2`` of every block (:class:`mtbench.lora.LoRALinear`).
* **Task prompts** (§3.1, Fig. 4a, VPT-shallow): one learnable token per task (official ``PERTASK_LEN = 1``) of the
  stage-1 width, initialised to ones and then ``trunc_normal(mean=1, std=1)`` in ``[-2, 2]`` (official), prepended to
  the patch tokens at the first stage and carried through every block. Under window attention the prompts are
  prepended to every window (rel-pos bias and shift mask on the patch x patch block only) and their outputs are
  averaged over the windows (:func:`mtbench.swin.window_attention`, :func:`mtbench.swin.prompted_block`).
* **Prompt upsampling** (§3.6, Fig. 6): at each PatchMerging the patches go through the frozen merge and the prompts
  through a trainable ``Linear(C, 2C, bias=False)`` (initialised ``trunc_normal(std=0.02)`` as every official Linear).
* **TPC operator** (§3.3, Eq. 2), last block of each stage: the task attention map ``a_i ∈ R^{H×1×N}`` between task
  prompt ``i`` and the patch tokens, taken from that block's own MHSA, weights each head's channel slice of the
  pre-projection attention output ``f``: ``f_i = f + S_inv(a_i ⊙ S(f))``.
* **TA-module with the Dynamic Task Filter** (§3.4, Eq. 3-4, Fig. 5), on ``proj``, ``fc1``, ``fc2`` of the last
  block of each stage: ``F_i = Φ(f) + s·(θ_i ⊛ (f_i W_down)) W_up`` with ``θ_i = φ(f_i W_down)``. ``W_down``/``W_up``
  are the TS-module's own matrices of that layer (§4.1 "TS-Module and TA-Module use the same rank"; official
  ``TAModuleLinear`` reuses ``lora_shared_A/B``), ``Φ`` is the frozen layer applied to the *shared* input (as
  MTLoRA's task branch), ``⊛`` a channel-wise 3x3 convolution whose weights ``φ`` generates per sample: GAP ->
  1x1 conv ``r -> 9r`` (bias) -> FilterNorm (paper ref. [57]; 'channel' type with learnable std/mean, as the
  official ``DTF``/``FilterNorm``, which cites github.com/theFoxofSky/ddfnet). ``9r² + 27r`` parameters per
  place, one DTF per place shared by all tasks (the task conditioning comes from the task-adapted inputs). At
  ``proj`` the filter runs per window on the window grid (GAP per window), at ``fc1``/``fc2`` on the full HxW map,
  as the official code runs its filter.
  Inside the block, task ``i``: ``y_i = x + reverse(TA_proj(f_i))``, ``f̂_i = y_i + TA_fc2(act(TA_fc1(norm2(y_i))))``
  with ``TA_fc1`` acting on ``W·norm2(x1_shared) + b`` and ``TA_fc2`` on ``W·h_shared + b`` (MTLoRA's "matrix"
  task branch).
* **Stage-wise gating and skip** (§3.5, Eq. 5): ``F_i = σ(g)·f_i + (1 − σ(g))·f̂_i``, one scalar ``g`` per stage
  initialised to 0; ``f_i`` (window-reversed, unshifted) is the TPC feature. ``F_i`` goes through the frozen
  PatchMerging to task ``i``'s decoder.
* **Trainable** (§3.6): LoRA, DTFs, prompts, prompt upsampling, gates, all LayerNorms, relative-position tables,
  patch embedding. PatchMerging reductions stay frozen (official ``FREEZE_DOWNSAMPLE_REDUCTION: True``).

Paper vs released code (options; the paper form is the default):

1. ``filter``: ``dtf`` (paper §3.4) | ``static`` (released code: the ``DTF`` class is commented out and a per-task
   static depthwise ``Conv2d(r, r, 3, padding=1, groups=r)`` with bias, ``NaiveConvFilter``, 10r parameters per task
   per place, is used instead).
2. ``tpc``: ``paper`` | ``official``. paper: ``a_i`` = the softmax attention probabilities of prompt row ``i`` on the
   patch columns; ``f_i = f + S_inv(a_i ⊙ f)`` feeds the TA-module and the skip. official: ``a_i = GELU(q·kᵀ)``
   (pre-softmax, unscaled, no rel-pos bias); the TA input is ``LayerNorm(f + a_i ⊙ f)`` with a trainable
   ``LayerNorm(C)`` (official ``prompt_layernorm``) that the official code builds in the ``proj`` of *every* block
   (only the last block's of each stage is used); the skip feature is ``a_i ⊙ f`` alone (``task_skip_feature``).
3. ``prompt_update``: ``vpt`` (paper §3.1: prompts are ordinary tokens, ``p += attn; p += mlp``) | ``official``
   (``p_new = p + MLP(LN2(attn_out(p)))``, no residual around attention). Either way the prompts are not updated in
   the network's final block: the official code skips it and in the paper form its result is never used.
4. Ablations (Table 2, r = 32): ``prompts`` (task prompts + prompt upsampling; ``false`` means no prompts and
   therefore no TPC, no gates), ``use_tpc`` (``false`` = "+TP+DTF": prompts are tuned but every task's TA input is
   ``f`` itself; no skip, no gates), ``dtf`` (``false`` = no filter in the TA-module, ``F_i = Φ(f) + s·B A f_i``;
   the official ``TADMTL.DTF`` switch, whatever ``filter`` says), ``skip`` (``gated`` Eq. 5 | ``mean``
   ``(f_i + f̂_i)/2``, official ``STAGEWISEGATING: False`` | ``none``, official ``SKIPCONNECTION: False``).
   When the task streams cannot differ (no TPC and a filter shared by all tasks, e.g. Table 2 "+DTF" and "+TP+DTF")
   one stream is computed and every decoder receives it; without TPC and without filter (Table 2 "Baseline") the
   last block is an ordinary TS-LoRA block and every decoder receives the shared features.

5. ``skip_layout``: ``correct`` (paper) | ``released``: the released code stores the TPC skip feature channel-first
   ``[B*nW, C, N]`` (``models/lora.py`` around 620-628) and reads it back with ``.view(-1, ws, ws, C)`` instead of a
   transpose (``models/swin_transformer_tadformer.py`` around 472), scrambling channels and tokens before the stage
   gate; the paper's numbers came from that code.
6. Dropout (the paper is silent; the official code decides): the TPC weighting, the skip feature and the TA-module
   input at ``proj`` are computed from the LoRA-dropout-applied attention output (one mask with the shared branch,
   :meth:`mtbench.lora.LoRALinear.split_forward`); the TA-modules' inputs at ``fc1``/``fc2`` get no dropout.

Variant ``tadformer_official`` = ``filter=static, tpc=official, prompt_update=official, skip_layout=released``,
the released code.

Parameter counts (Swin-T at 448, PASCAL-Context, MTLoRA decoder 1,946,624): 1,946,624 + 70,656·r (LoRA) + 23,040
(LayerNorms) + 23,322 (rel-pos) + 4,896 (patch embedding) + 384 (prompts) + 387,072 (prompt upsampling) + 4 (gates)
+ 12·(9r² + 27r) (DTF) [+ 8,832 (12 official TPC LayerNorms, 9 unused)]. The paper counted the official model,
LayerNorms included: ``tpc=official`` gives Table 1 and the Table 2 ablations exactly, except "+DTF", printed 4.40M,
which the same terms put at 4.38M. The paper form has no TPC LayerNorm and is 8,832 lower. The exact count of every
configuration, with the paper's number and its source, is in ``_PAPER_COUNTS`` below (``mtbench params --methods
tadformer`` prints them; tests build each one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mtbench.config import MethodConfig, positive, probability
from mtbench.encoder import BlockExtension, StreamPlan
from mtbench.errors import MtbenchError
from mtbench.lora import inject_block_lora
from mtbench.model import MultiTaskModel
from mtbench.registry import PaperCount, register_method
from mtbench.streams import TaskIndexed, first_and_rest
from mtbench.swin import reverse_windows, update_prompt_tokens

_T1 = "TADFormer CVPR'25 Table 1"
_T2 = "TADFormer CVPR'25 Table 2 (r=32)"
_CODE = "official code Min100KM/TADFormer@1f53b9f (NaiveConvFilter), shared/reference/methods.md §10"
_LN_NOTE = "paper form: no TPC LayerNorm, 8,832 fewer than the official model the paper counted"


@dataclass
class TADFormerConfig(MethodConfig):
    r: int = field(default=16, metadata=positive("rank r of the shared LoRA (TS-module), reused by the TA-module"))
    scale: float = field(default=4.0, metadata=positive("raw LoRA scale s"))
    dropout: float = field(default=0.05, metadata=probability("dropout on LoRA inputs"))
    filter: str = field(default="dtf", metadata={
        "help": "TA-module filter: dtf = input-conditioned Dynamic Task Filter shared by tasks (paper §3.4); "
                "static = per-task static depthwise 3x3 conv (released code)", "choices": ("dtf", "static")})
    tpc: str = field(default="paper", metadata={
        "help": "TPC operator: paper = softmax prompt attention, f_i = f + a_i*f (Eq. 2); official = GELU(q.k) "
                "weights, LayerNorm(f + a_i*f) as TA input, a_i*f as skip feature", "choices": ("paper", "official")})
    prompt_update: str = field(default="vpt", metadata={
        "help": "prompt update per block: vpt = ordinary tokens (paper); official = p + MLP(LN(attn(p)))",
        "choices": ("vpt", "official")})
    prompts: bool = field(default=True, metadata={
        "help": "task prompts + prompt upsampling (false: no prompts, hence no TPC and no gates; Table 2)"})
    use_tpc: bool = field(default=True, metadata={
        "help": "apply the TPC operator (false = Table 2 '+TP+DTF': TA input is f itself, no skip/gates)"})
    dtf: bool = field(default=True, metadata={
        "help": "filter between down- and up-projection of the TA-module (false: plain shared LoRA; Table 2)"})
    skip: str = field(default="gated", metadata={
        "help": "skip of the TPC feature to the decoders: gated (Eq. 5) | mean (official STAGEWISEGATING off) | "
                "none (official SKIPCONNECTION off)", "choices": ("gated", "mean", "none")})
    skip_layout: str = field(default="correct", metadata={
        "help": "memory layout of the TPC skip feature: correct (paper) | released (the released code stores it "
                "[B*nW, C, N] and reads it back as [B*nW, ws, ws, C], scrambling channels and tokens)",
        "choices": ("correct", "released")})

    def inert_options(self) -> dict[str, str]:
        """Options without effect: everything of the prompts under ``prompts=false``, the skip under ``use_tpc=false``
        or ``skip=none`` (its layout), the filter kind under ``dtf=false``. ``tpc`` under ``use_tpc=false`` is not
        inert: ``tpc=official`` still builds the (unused) TPC LayerNorms that the official model counts."""
        inert = {}
        if not self.prompts:
            why = "prompts=false (no task prompts: no TPC, no skip, no gates)"
            inert.update(dict.fromkeys(("use_tpc", "tpc", "prompt_update", "skip", "skip_layout"), why))
        elif not self.use_tpc:
            inert.update(dict.fromkeys(("skip", "skip_layout"), "use_tpc=false (no TPC feature to skip)"))
        elif self.skip == "none":
            inert["skip_layout"] = "skip=none (no skip feature)"
        if not self.dtf:
            inert["filter"] = "dtf=false (no filter in the TA-module)"
        return inert

    @property
    def tpc_active(self) -> bool:
        """TPC needs the task prompts: ``prompts=false`` implies no TPC (documented, not an error)."""
        return self.prompts and self.use_tpc


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def per_sample_depthwise(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise cross-correlation with a different ``k x k`` kernel for every (sample, channel), zero padding k//2.

    One grouped convolution over the batch folded into channels (``groups = B*C``), as the official ``DTF``.

    Args:
        z: ``[B, C, H, W]``.
        weight: ``[B, C, k, k]`` (odd ``k``).

    Returns:
        ``[B, C, H, W]``.
    """
    B, C, H, W = z.shape
    k = weight.shape[-1]
    out = F.conv2d(z.reshape(1, B * C, H, W), weight.reshape(B * C, 1, k, k), padding=k // 2, groups=B * C)
    return out.view(B, C, H, W)


class DynamicTaskFilter(nn.Module):
    """Dynamic Task Filter (TADFormer §3.4, Eq. 3-4, Fig. 5): a channel-wise ``k x k`` filter generated per sample.

    ``θ = FilterNorm(W_g · GAP(z) + b_g)`` with a 1x1 conv ``r -> k²r`` (``W_g``, ``b_g``), then ``θ ⊛ z``
    depthwise with padding ``k//2``. FilterNorm ('channel' type, as the official ``FilterNorm`` taken from ddfnet):
    per sample, each channel's ``k²`` taps are normalised to zero mean and unit (unbiased) std, then multiplied
    by a learnable std vector and shifted by a learnable mean vector (``k²r`` each; std initialised
    ``randn · gain(relu) / k``, mean ``randn``). Parameters: ``k²r² + 3k²r`` (``9r² + 27r`` for k = 3).

    Args:
        channels: ``r``.
        kernel_size: ``k`` (odd).

    Shapes: ``forward(z)``: ``[B, r, H, W]`` -> ``[B, r, H, W]``; :meth:`generate`: ``[B, r, H, W]`` ->
    ``[B, r, k, k]``.
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        taps = kernel_size * kernel_size
        self.generator = nn.Linear(channels, channels * taps)  # the 1x1 conv r -> k²r on the pooled map
        gain = nn.init.calculate_gain("relu") / kernel_size
        self.norm_std = nn.Parameter(torch.randn(channels * taps) * gain)
        self.norm_mean = nn.Parameter(torch.randn(channels * taps))

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        B, r = z.shape[:2]
        k = self.kernel_size
        theta = self.generator(z.mean(dim=(2, 3))).view(B, r, k * k)
        theta = (theta - theta.mean(-1, keepdim=True)) / (theta.std(-1, keepdim=True) + 1e-10)
        theta = theta.reshape(B, r * k * k) * self.norm_std + self.norm_mean
        return theta.view(B, r, k, k)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return per_sample_depthwise(z, self.generate(z))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"


class StaticTaskFilters(TaskIndexed):
    """The released code's filter (``NaiveConvFilter``): one static depthwise ``Conv2d(r, r, k, padding=k//2,
    groups=r)`` with bias per task (``10r`` parameters per task for k = 3), all tasks in one grouped convolution.

    Shapes: ``forward(z)`` with ``z`` ``[T*B, r, H, W]``, tasks stacked task-major in ``tasks`` order.
    """

    def __init__(self, channels: int, tasks: list[str], kernel_size: int = 3):
        super().__init__(tasks, lambda t: nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2,
                                                    groups=channels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        T, (TB, r, H, W) = len(self.tasks), z.shape
        zt = z.view(T, TB // T, r, H, W).transpose(0, 1).reshape(TB // T, T * r, H, W)
        out = F.conv2d(zt, self.stacked("weight", self.tasks).flatten(0, 1), self.stacked("bias", self.tasks).flatten(),
                       padding=self.module_for(self.tasks[0]).padding, groups=T * r)
        return out.view(TB // T, T, r, H, W).transpose(0, 1).reshape(TB, r, H, W)


class StageGate(nn.Module):
    """Stage-wise gating of the skip connection (§3.5, Eq. 5): ``F = σ(g)·f + (1 − σ(g))·f̂``, ``g`` init 0.

    In training it keeps ``f − f̂`` for ``g``'s gradient instead of both inputs (one task-stream-sized tensor less per
    stage: 86 MB of TADFormer's training step at 448×448, batch 2; same output, gradients to float rounding).
    """

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.zeros(1))

    def forward(self, skip: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.g.requires_grad:
            return _GatedSum.apply(skip, out, self.g)
        w = torch.sigmoid(self.g)
        return w * skip + (1 - w) * out


class _GatedSum(torch.autograd.Function):
    """``σ(g)·skip + (1 − σ(g))·out`` that keeps ``skip − out`` for ``g``'s gradient instead of both inputs."""

    @staticmethod
    def forward(ctx, skip, out, g):
        w = torch.sigmoid(g)
        ctx.save_for_backward(skip - out, w)
        return w * skip + (1 - w) * out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        diff, w = ctx.saved_tensors
        grad_g = (grad * diff).sum().reshape(w.shape) * w * (1 - w)
        return grad * w, grad * (1 - w), grad_g


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------

_OFFICIAL_LN = "DTF on the official model (12 TPC LayerNorms, 9 unused)"
_STATIC = "released code: per-task static 3x3 filter instead of the DTF"
_PAPER_COUNTS = [
    *(PaperCount({"r": r, "tpc": "official"}, paper, _T1, exact=n, note=_OFFICIAL_LN)
      for r, paper, n in ((16, 3.56, 3_557_502), (32, 4.78, 4_776_126), (64, 7.38, 7_379_262))),
    *(PaperCount({"r": r}, paper, _T1, exact=n, note=_LN_NOTE + rounded) for r, paper, n, rounded in (
        (16, 3.56, 3_548_670, ""), (32, 4.78, 4_767_294, " (4.77M)"), (64, 7.38, 7_370_430, " (7.37M)"))),
    *(PaperCount({"r": r, "filter": "static", "tpc": "official"}, None, _CODE, exact=n, note=_STATIC)
      for r, n in ((16, 3_532_350), (32, 4_670_526), (64, 6_946_878))),
    PaperCount({"r": 32, "prompts": False, "dtf": False}, 4.26, _T2 + " Baseline",
               exact=4_258_874),
    PaperCount({"r": 32, "tpc": "official", "dtf": False}, 4.66, _T2 + " +TPC+TP", exact=4_655_166),
    PaperCount({"r": 32, "prompts": False}, 4.40, _T2 + " +DTF", exact=4_379_834,
               note="ours 4.38M: LoRA + 12 DTFs; the printed 4.40M is 0.02M more than any consistent build "
                    "(the same terms give Baseline, +TPC+TP and full exactly)"),
    PaperCount({"r": 32, "tpc": "official", "use_tpc": False}, 4.78, _T2 + " +TP+DTF", exact=4_776_122,
               note="full model minus the 4 gates"),
]


@register_method(
    "tadformer",
    config=TADFormerConfig,
    paper="TADFormer: Task-Adaptive Dynamic TransFormer for Efficient Multi-Task Learning (Baek et al., CVPR 2025)",
    code="https://github.com/Min100KM/TADFormer (1f53b9f)",
    summary="shared LoRA + task prompts; last block per stage: TPC (prompt attention) -> TA-module with Dynamic "
            "Task Filter between LoRA down/up; gated skip; frozen PatchMerging + prompt upsampling",
    variants={"tadformer_official": {"filter": "static", "tpc": "official", "prompt_update": "official",
                                     "skip_layout": "released"}},
    paper_counts=_PAPER_COUNTS,
)
class TADFormer(MultiTaskModel):
    """TADFormer on a Swin backbone (module docstring). ``encode`` returns per-task features from the task streams.

    Attributes:
        task_prompts: ``[T, C_1]`` prompts (None with ``prompts=false``).
        prompt_up: ``Linear(C_s, 2C_s, bias=False)`` per PatchMerging.
        filters: per stage ``{"proj", "fc1", "fc2"}`` -> :class:`DynamicTaskFilter` / :class:`StaticTaskFilters`.
        gates: one :class:`StageGate` per stage (``skip=gated`` with TPC only).
        tpc_norms: per stage, per block ``LayerNorm(C)`` (``tpc=official`` with prompts only; official layout).

    Shapes: images ``[B,3,H,W]`` -> ``{task: [B,C_t,H,W]}``.
    """

    def __init__(self, backbone, tasks, cfg: TADFormerConfig):
        super().__init__(backbone, tasks)
        self.cfg = cfg
        names = self.task_names
        for layer in inject_block_lora(backbone, cfg.r, cfg.scale, cfg.dropout):
            self.add_method_params(layer.lora_parameters())
        dims = backbone.stage_dims
        self.task_prompts = None
        self.prompt_up = nn.ModuleList()
        if cfg.prompts:
            p = torch.ones(len(names), dims[0])
            nn.init.trunc_normal_(p, mean=1.0, std=1.0, a=-2.0, b=2.0)
            self.task_prompts = nn.Parameter(p)
            self.prompt_up = nn.ModuleList(nn.Linear(c, c_next, bias=False) for c, c_next in zip(dims, dims[1:]))
            for up in self.prompt_up:  # official: the model-wide Linear init, trunc_normal(std=0.02)
                nn.init.trunc_normal_(up.weight, std=0.02)
            self.add_method_params([self.task_prompts])
            self.add_method_params(self.prompt_up)
        self.filter_kind = cfg.filter if cfg.dtf else None
        self.filters = nn.ModuleList()
        if self.filter_kind is not None:
            make = (lambda: DynamicTaskFilter(cfg.r)) if self.filter_kind == "dtf" else (
                lambda: StaticTaskFilters(cfg.r, names))
            self.filters = nn.ModuleList(nn.ModuleDict({k: make() for k in ("proj", "fc1", "fc2")}) for _ in dims)
            self.add_method_params(self.filters)
        self.tpc_norms = nn.ModuleList()
        if cfg.prompts and cfg.tpc == "official":
            self.tpc_norms = nn.ModuleList(nn.ModuleList(nn.LayerNorm(c) for _ in range(depth))
                                           for c, depth in zip(dims, backbone.depths))
            self.add_method_params(self.tpc_norms)
        self.gates = nn.ModuleList()
        if cfg.tpc_active and cfg.skip == "gated":
            self.gates = nn.ModuleList(StageGate() for _ in dims)
            self.add_method_params(self.gates)
        self.unfreeze_backbone("patch_embed", "norm", "rel_pos")
        self._record_stage: int | None = None
        self._recorded: torch.Tensor | None = None
        self.residual_prompts = cfg.prompt_update == "vpt"
        if self.num_streams:
            self.stream_plan = StreamPlan.last_block_per_stage(split_at="proj")
        self.extend_blocks(self._last_block)

    def _last_block(self, stage: int, index: int, block) -> BlockExtension | None:
        """TA-modules on proj/fc1/fc2 and the task-adapting extension, in the last block of each stage."""
        if index != len(self.backbone.blocks(stage)) - 1:
            return None
        for place, layer in (("proj", block.attn.proj), ("fc1", block.mlp.fc1), ("fc2", block.mlp.fc2)):
            if self.num_streams:
                layer.set_task_mid(None if self.filter_kind is None else TaskBranchFilter(self, stage, place, block))
        return TaskAdaptingBlock(stage)

    # ------------------------------------------------------------------ stream layout
    @property
    def num_streams(self) -> int:
        """Task streams in the last blocks: T when the last block adapts per task, 0 when it is an ordinary
        TS-LoRA block whose shared output every decoder receives (Table 2 "Baseline"). When the task streams cannot
        differ (no TPC, filter shared by tasks) the T streams are equal."""
        return len(self.task_names) if (self.cfg.tpc_active or self.filter_kind is not None) else 0

    # ------------------------------------------------------------------ encoder hooks (mtbench.encoder)
    def init_prompts(self, layout):
        if self.task_prompts is None:
            return None
        return self.task_prompts.unsqueeze(0).expand(layout.batch, -1, -1)

    def update_prompts(self, ctx, prompts, projected, num_windows):
        return update_prompt_tokens(ctx.block, prompts, projected, num_windows, residual=self.residual_prompts)

    def merge_prompts(self, stage, prompts):
        return self.prompt_up[stage](prompts)

    def task_attention(self, ctx) -> torch.Tensor:
        """The TPC weighting ``a_i`` ``[B*nW, heads, T, N]`` of the block's prompt rows on its patch columns."""
        att = ctx.attention
        return att.prompt_probs if self.cfg.tpc == "paper" else F.gelu(att.prompt_logits)

    # ------------------------------------------------------------------ visualisation (Fig. 7)
    @torch.no_grad()
    def task_attention_maps(self, images: torch.Tensor, stage: int = 0) -> dict[str, torch.Tensor]:
        """Task attention maps of the last block of ``stage`` (paper Fig. 7), for drawing.

        The map is the TPC weighting ``a_i`` (``tpc=paper``: softmax probabilities of prompt ``i`` on the patches;
        ``tpc=official``: GELU of the unscaled logits), averaged over heads, with the windows reassembled on the
        stage's ``H_s x W_s`` grid and the cyclic shift undone. Runs in eval mode (the mode is restored).

        Args:
            images: ``[B,3,H,W]``.
            stage: stage index (0 = first stage, the finest grid).

        Returns:
            ``{task: [B, H_s, W_s]}``.

        Raises:
            MtbenchError: ``prompts=false`` (no prompts, no maps) or a stage out of range.
        """
        if self.task_prompts is None:
            raise MtbenchError("tadformer: task attention maps need task prompts (prompts=true)")
        n = len(self.backbone.stage_dims)
        if not 0 <= stage < n:
            raise MtbenchError(f"tadformer: stage must be in 0..{n - 1}, got {stage}")
        self.check_input(images)
        was_training = self.training
        self.eval()  # deterministic maps (no LoRA dropout / drop path)
        self._record_stage, self._recorded = stage, None
        try:
            self.encode(images)
            maps = self._recorded
        finally:
            self._record_stage, self._recorded = None, None
            self.train(was_training)
        return {t: maps[..., j] for j, t in enumerate(self.task_names)}


class TaskBranchFilter:
    """The filter between the shared LoRA's down- and up-projection of a TA-module (§3.4), on the task streams.

    At ``proj`` it runs per window on the window grid, at ``fc1``/``fc2`` on the full ``H x W`` map, as the official
    code. Input and output ``[T*M, ..., r]`` (windows ``[T*B*nW, N, r]`` or maps ``[T*B, H, W, r]``).
    """

    def __init__(self, model: TADFormer, stage: int, place: str, block):
        self.model, self.stage, self.place, self.window = model, stage, place, tuple(block.window_size)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        f = self.model.filters[self.stage][self.place]
        if self.place == "proj":
            grid = z.view(z.shape[0], *self.window, z.shape[-1])
            return f(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(z.shape)
        return f(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class TaskAdaptingBlock(BlockExtension):
    """TADFormer's last block of a stage (§3.3-3.5): TPC at the ``proj`` split, gated skip after the block.

    Parameter-free: the prompts, filters, TPC LayerNorms and gates belong to the model (``ctx.model``).
    """

    def __init__(self, stage: int):
        super().__init__()
        self.stage = stage

    def wants_prompt_maps(self, ctx) -> bool:
        return ctx.model.cfg.tpc_active or ctx.model._record_stage == self.stage

    def split(self, ctx, values: torch.Tensor) -> torch.Tensor:
        """TPC (Eq. 2): the task streams' TA input ``f_i`` from the (dropped-out) attention output ``f``
        ``[M, N, C]``; the skip feature goes to ``ctx.scratch``. Returns ``[T*M, N, C]``."""
        model, cfg = ctx.model, ctx.model.cfg
        T = len(ctx.layout.tasks)
        M, N, C = values.shape
        f_rep = values.unsqueeze(0).expand(T, M, N, C).reshape(T * M, N, C)
        if not cfg.tpc_active:
            return f_rep
        amap = model.task_attention(ctx)  # [M, heads, T, N]
        heads = amap.shape[1]
        weights = amap.permute(2, 0, 3, 1).unsqueeze(-1)  # [T, M, N, heads, 1]
        weighted = (values.reshape(1, M, N, heads, C // heads) * weights).reshape(T * M, N, C)
        if cfg.tpc == "paper":
            task_in = f_rep + weighted
            ctx.scratch["skip"] = task_in
        else:
            task_in = model.tpc_norms[self.stage][-1](f_rep + weighted)
            ctx.scratch["skip"] = weighted
        return task_in

    def post_block(self, ctx, x: torch.Tensor) -> torch.Tensor:
        """Record the task attention maps (Fig. 7) and apply the stage-wise gated skip (Eq. 5) to the task
        streams of ``x`` ``[(1+T)*B, H, W, C]``."""
        model, cfg = ctx.model, ctx.model.cfg
        if model._record_stage == self.stage:
            m = model.task_attention(ctx).mean(1).transpose(1, 2)  # [M, N, T]
            model._recorded = reverse_windows(ctx.block, m, ctx.windows)  # [B, H, W, T]
        skip = ctx.scratch.get("skip")
        if skip is None or cfg.skip == "none":
            return x
        if cfg.skip_layout == "released":  # stored [B*nW, C, N], read back as [B*nW, ws, ws, C]
            skip = skip.transpose(1, 2).contiguous().view(skip.shape)
        skip = reverse_windows(ctx.block, skip, ctx.windows)
        shared, tasks = first_and_rest(x, ctx.layout.size)
        tasks = tasks.reshape(skip.shape)
        tasks = model.gates[self.stage](skip, tasks) if cfg.skip == "gated" else 0.5 * (skip + tasks)
        return torch.cat([shared, tasks])

