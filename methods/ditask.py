"""DiTASK: multi-task fine-tuning with diffeomorphic transformations (Mantri, Schönlieb, Ribeiro, Baskin, Eliasof;
CVPR 2025, arXiv 2502.06029). Official code ``ipsitmantri/DiTASK`` (``models/lora.py::DiTASKLinear``; the Swin file
``models/swin_transformer_ditask.py`` exists only from commit 1ef40ae, read in the fork ``Malygossssss/DiTASK``).
Facts: ``shared/reference/methods.md`` §11.

Faithful to the official code (the paper describes the same operator):

* **Operator** (paper §3, "neural diffeomorphic transformation of the singular values"; official
  ``DiTASKLinear.transform_data``/``forward``). A frozen linear ``W = U diag(S) Vᵀ`` is *replaced* by
  ``W' = U diag(S∘φ_θ) Vᵀ``: the singular vectors are kept and the singular values, read as a 1-D signal over
  their index scaled to ``[0, 1]``, are resampled through a CPAB diffeomorphism ``φ_θ`` (tessellation of ``r``
  cells, zero-velocity boundary, ``r - 1`` parameters; :mod:`mtbench.cpab`: ``difw``'s parametrisation as the
  official code, mtbench's own closed-form integration, see that module for why). The
  output is ``W' dropout(x) + b``: the official layer applies its dropout (0.05) to the whole input, the frozen path
  included, not to a side branch; kept.
* **qkv**: the fused ``qkv`` weight is split into q, k, v; each is decomposed and warped with the same ``θ``.
* **Multi-task layout** (MTLoRA's, official Swin file): a shared ``θ`` (``r = 64`` cells: 63 numbers) in ``qkv``,
  ``proj``, ``fc1``, ``fc2`` of every block; in the last block of each stage ``proj``, ``fc1`` and ``fc2`` also
  carry one ``θ_t`` per task (``task_r = 4`` cells: 3 numbers). Task streams split from the shared stream at
  ``proj`` (attention is shared), keep their own residuals, go through the shared PatchMerging and feed only their
  decoder; the next stage continues from the shared stream (:meth:`mtbench.encoder.StreamPlan.last_block_per_stage`).
  Task ``t``'s weight is warped from the *original* ``W`` (not composed with the shared warp): ``W'_t x_t + b``, with
  ``x_t`` the task stream's own input (no dropout), and at ``proj`` the shared stream's dropped-out attention output
  (the official ``x_tasks=None`` case).
* **Initialisation**: every ``θ`` ``kaiming_uniform_(a=√5)`` as the official ``reset_parameters`` (so training does
  not start at the identity); ``init=zero`` (an option, not the official code) starts from the frozen model.
* **Trainable besides θ**: patch embedding, LayerNorms, relative-position tables and PatchMerging reductions
  (official ``mark_only_lora_as_trainable`` with the config's defaults), and the decoders.
* **SVD**: the official code calls ``torch.svd`` in every forward; the weights are frozen, so the factors are
  cached (:class:`mtbench.cpab.FrozenSVD`). ``W'`` is formed as ``W + U diag(S∘φ - S) Vᵀ`` (equal in exact
  arithmetic), so ``θ = 0`` reproduces the frozen layer bit-exactly.

Readings and options:

* ``qkv_task_theta`` (default false): the official Swin file passes ``tasks`` to every block's ``qkv``
  unconditionally, so it builds 4 tasks × 12 blocks × 3 = 144 task ``θ`` whose outputs are discarded
  (``qkv, _ = self.qkv(x)``); they never receive a gradient but are counted in the official 3,549,482. The default
  leaves them out (the paper's qkv is shared); ``qkv_task_theta=true`` builds them to reproduce the official count.
* Resampling: ``S`` is read at ``u_i = i/(m-1)`` and linearly interpolated at ``φ(u_i)`` (``difw``'s
  ``transform_data``, which the official code calls with ``outsize = m``), singular values in ``torch.linalg.svd``'s
  descending order as ``torch.svd`` returns them.
* As in MTLoRA's layout and the official code, the shared ``θ`` of ``proj``, ``fc1``, ``fc2`` in the network's final
  block (3 × 63 = 189 numbers) never train: that block's shared stream feeds no decoder. They are counted, as the
  official count does.
* Evaluation: without grad, the warped weights are cached until a ``θ`` changes.

#TP, Swin-T / PASCAL-Context (4 tasks, MTLoRA decoder), r=64: 3,549,338 (official code 3,549,482 = this + the 144
dead qkv task θ; ``qkv_task_theta=true`` gives it exactly). θ is 3,168 of it; the rest is the decoders (1,946,624),
PatchMerging reductions (1,548,288), LayerNorms (23,040), relative-position tables (23,322), patch embedding with
its norm (4,896). The paper's 1.61M (TDSS Table 1 reprints it) is the encoder side without decoders: 1,602,858 here with the
dead θ (1.60M; 0.4% below the printed 1.61M).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mtbench.config import MethodConfig, at_least, probability
from mtbench.cpab import CPAB1D, FrozenSVD, Theta, svd_warped_delta
from mtbench.encoder import StreamPlan
from mtbench.errors import MtbenchError
from mtbench.lora import LoRADropout, WrappedLinear
from mtbench.model import MultiTaskModel
from mtbench.registry import PaperCount, register_method
from mtbench.streams import SHARED, TaskIndexed, current_layout, first_and_rest, split_streams


class DiTASKLinear(WrappedLinear):
    """A frozen ``nn.Linear`` whose singular values are warped by a shared CPAB ``θ`` and, optionally, per task.

    Args:
        base: the pretrained linear layer (kept as ``self.base``, frozen by the model).
        r: tessellation size of the shared warp (``θ`` has ``r - 1`` entries).
        tasks: task names with their own warp (tessellation ``task_r``), or None.
        task_r: tessellation size of the task warps.
        dropout: dropout on the layer's input (shared stream only; official ``lora_dropout``).
        chunks: row blocks warped separately (3 for a fused ``qkv``).
        init: ``kaiming`` (official) | ``zero`` (identity warp).

    Shapes: input ``[S*M, ..., in]`` stacked per :func:`mtbench.streams.current_layout` (shared stream first when
    there are task streams); output ``[S*M, ..., out]``.

    Raises:
        MtbenchError: task streams without a shared stream first; a stream with no warp of its own.
    """

    def __init__(self, base: nn.Linear, r: int, tasks=None, task_r: int = 4, dropout: float = 0.05,
                 chunks: int = 1, init: str = "kaiming"):
        if base.out_features % chunks:
            raise MtbenchError(f"{base.out_features} output features do not split into {chunks} chunks")
        super().__init__(base)
        self.cpab = CPAB1D(r)
        self.theta = Theta(self.cpab.num_params, init)
        self.svd = FrozenSVD(chunks)
        self.drop = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self.__dict__["_eval_cache"] = {}
        self.task_names = list(tasks or [])
        if self.task_names:
            self.task_cpab = CPAB1D(task_r)
            self.task_theta = TaskIndexed(self.task_names, lambda t: Theta(self.task_cpab.num_params, init),
                                          share="dedicated")

    def method_parameters(self) -> list[nn.Parameter]:
        """The ``θ`` this layer adds (shared and per task)."""
        return [self.theta.theta] + ([p for p in self.task_theta.parameters()] if self.task_names else [])

    def _cached(self, key: str, params: list[torch.Tensor], make) -> torch.Tensor:
        """``make()``, reused without grad (evaluation) while the θ and the frozen weight are unchanged."""
        if torch.is_grad_enabled():
            return make()
        version = (tuple(p._version for p in params), self.base.weight._version, self.base.weight.device)
        hit = self._eval_cache.get(key)
        if hit is None or hit[0] != version:
            hit = (version, make())
            self._eval_cache[key] = hit
        return hit[1]

    def shared_weight(self) -> torch.Tensor:
        """``W'`` of the shared warp, ``[out, in]``."""
        W = self.base.weight
        return self._cached("shared", [self.theta.theta], lambda: W + svd_warped_delta(
            W, self.svd, self.cpab, self.theta.theta[None])[0].to(W.dtype))

    def task_weights(self, tasks) -> torch.Tensor:
        """``W'_t`` of each task, ``[T, out, in]`` in ``tasks`` order (all warped from the frozen ``W``)."""
        W = self.base.weight
        thetas = [self.task_theta.module_for(t).theta for t in tasks]
        return self._cached(",".join(tasks), thetas, lambda: W + svd_warped_delta(
            W, self.svd, self.task_cpab, torch.stack(thetas)).to(W.dtype))

    def _tasks_out(self, x: torch.Tensor, tasks) -> torch.Tensor:
        """``W'_t x_t + b`` for stacked task rows ``x`` ``[T*M, ..., in]`` in one batched matmul."""
        T = len(tasks)
        xs = split_streams(x, T)
        flat = xs.reshape(T, -1, self.in_features)
        W = self.task_weights(tasks).to(x.dtype)
        out = torch.bmm(flat, W.transpose(1, 2))
        if self.base.bias is not None:
            out = out + self.base.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = current_layout()
        if layout is None or layout.size == 1 or not self.task_names:
            return F.linear(self.drop(x), self.shared_weight().to(x.dtype), self.base.bias)
        if layout.names[0] != SHARED:
            raise MtbenchError(f"DiTASK task streams need the shared stream first, got {layout.names}")
        xs, xt = first_and_rest(x, layout.size)
        shared = F.linear(self.drop(xs), self.shared_weight().to(x.dtype), self.base.bias)
        tasks = self._tasks_out(xt, layout.tasks)
        return torch.cat([shared, tasks])

    def split_forward(self, x: torch.Tensor, skip_rows: int, make_task_inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """At the ``proj`` split: shared output from ``dropout(x)``, task outputs from the same dropped-out input
        (official: ``x_task = x`` after ``x = self.lora_dropout(x)``).

        Args:
            x: shared input ``[M, L, in]``; ``skip_rows`` leading rows of dim 1 (prompts) only the shared stream keeps.
            make_task_inputs: ``[M, L - skip_rows, in] -> [T*M, L - skip_rows, in]``.

        Returns:
            ``(shared [M, L, out], tasks [T*M, L - skip_rows, out])``.
        """
        d = self.drop(x)
        shared = F.linear(d, self.shared_weight().to(x.dtype), self.base.bias)
        task_in = make_task_inputs(d[:, skip_rows:])
        tasks = current_layout().tasks
        if not self.task_names:
            return shared, F.linear(task_in, self.shared_weight().to(x.dtype), self.base.bias)
        return shared, self._tasks_out(task_in, tasks)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.cpab.tess_size}, "
                f"chunks={self.svd.chunks}, tasks={self.task_names}")


@dataclass
class DiTASKConfig(MethodConfig):
    r: int = field(default=64, metadata=at_least(2, "CPAB tessellation size of the shared warp (theta: r-1 numbers)"))
    task_r: int = field(default=4, metadata=at_least(2, "CPAB tessellation size of each task warp"))
    dropout: float = field(default=0.05, metadata=probability("dropout on each adapted layer's input (official)"))
    init: str = field(default="kaiming", metadata={"help": "theta init: kaiming (official) | zero (identity)",
                                                    "choices": ("kaiming", "zero")})
    qkv_task_theta: bool = field(default=False, metadata={
        "help": "build the official code's unused per-task theta on every qkv (count only)"})


_NOTE = ("the paper counts the encoder side without decoders: theta + patch embedding + LayerNorms + rel-pos "
         "tables + PatchMerging reductions = 1,602,858 here with the official dead qkv thetas (1.60M, 0.4% below); "
         "ours adds the 1,946,624 decoders (the official code builds 3,549,482)")


@register_method(
    "ditask",
    config=DiTASKConfig,
    paper="DiTASK: Multi-Task Fine-Tuning with Diffeomorphic Transformations (Mantri et al., CVPR 2025)",
    code="https://github.com/ipsitmantri/DiTASK",
    summary="singular values of every frozen qkv/proj/fc1/fc2 warped by a CPAB diffeomorphism: shared theta in "
            "every block, per-task theta in the last block of each stage (MTLoRA layout)",
    paper_counts=[
        PaperCount({"r": 64}, 1.61, "DiTASK CVPR'25 / TDSS Table 1", note=_NOTE),
        PaperCount({"r": 64, "qkv_task_theta": True}, 3.549,
                   "official code count (shared/reference/methods.md §11)", exact=3_549_482),
    ],
)
class DiTASK(MultiTaskModel):
    """DiTASK on a Swin backbone (module docstring).

    Shapes: images ``[B,3,H,W]`` -> ``{task: [B,C_t,H,W]}``.
    """

    def __init__(self, backbone, tasks, cfg: DiTASKConfig):
        super().__init__(backbone, tasks)
        self.cfg = cfg

        def wrap(stage, index, block):
            last = index == len(self.backbone.blocks(stage)) - 1
            for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc1"), (block.mlp, "fc2")):
                own = (last and name != "qkv") or (name == "qkv" and cfg.qkv_task_theta)
                layer = DiTASKLinear(getattr(parent, name), cfg.r, self.task_names if own else None, cfg.task_r,
                                     cfg.dropout, chunks=3 if name == "qkv" else 1, init=cfg.init)
                setattr(parent, name, layer)
                self.add_method_params(layer.method_parameters())
            return None  # no block extension: the layers read the stream layout themselves

        self.extend_blocks(wrap)
        self.unfreeze_backbone("patch_embed", "norm", "rel_pos", "patch_merging")
        self.stream_plan = StreamPlan.last_block_per_stage(split_at="proj")
