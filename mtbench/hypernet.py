"""Hypernetwork-generated weights: task and layer embeddings in, per-task adapter weights out (a core building block).

HyperFormer (Karimi Mahabadi et al., ACL 2021, §2.2-2.4; official ``rabeehk/hyperformer``
``hyperformer/adapters/adapter_utils.py`` ``TaskHyperNet``/``LayerNormHyperNet`` and ``adapter_modeling.py``
``AdapterLayersHyperNetController``/``AdapterLayersOneHyperNetController``) and Polyhistor (Liu et al., NeurIPS 2022,
§4.1 "Decomposed HyperNetworks") both generate adapter weights with one network shared by all tasks and layers:

1. a learned embedding per task ``I_t`` (:class:`TaskEmbeddings`, ``[T, E]``, N(0, 1) init as the official
   ``TaskEmbeddingController``) and one per layer ``L_l`` (and optionally per adapter position ``P_p``,
   HyperFormer++'s block-type embedding);
2. the *task projector* ``h = LN(W2 ReLU(W1 [I_t ; L_l (; P_p)] + b1) + b2)`` (``E·k -> hidden -> proj``, the official
   ``TaskHyperNet`` followed by ``unique_hyper_net_layer_norm``);
3. one linear *head* per generated tensor, ``W_head h + b_head``, reshaped to the tensor's shape (the official
   ``AdapterLayersHyperNet`` / ``LayerNormHyperNet`` generators; init N(0, 0.01²) weights and zero biases as
   ``adapter_utils.linear_layer``).

:class:`HyperNetwork` evaluates all tasks at once: ``hypernet(layer) -> {head: [T, *shape]}``, so a block's
generated weights for every task come from one batched call. :func:`stream_linear` and :func:`stream_layer_norm`
apply such stacked per-task weights to the task streams of the encoder loop (``[S*B, ..., C]`` stacked task-major,
:mod:`mtbench.streams`) with one batched matmul, never a loop over tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mtbench.errors import MtbenchError
from mtbench.streams import StreamLayout, current_layout


def _linear(inp: int, out: int, std: float) -> nn.Linear:
    """``nn.Linear`` with N(0, std²) weight and zero bias (official ``adapter_utils.linear_layer``)."""
    lin = nn.Linear(inp, out)
    nn.init.normal_(lin.weight, std=std)
    nn.init.zeros_(lin.bias)
    return lin


class TaskEmbeddings(nn.Module):
    """One learned embedding per task, ``[T, dim]``, N(0, 1) init (official ``TaskEmbeddingController``).

    Args:
        tasks: task names, in the model's task order.
        dim: embedding size (HyperFormer ``task_embedding_dim`` = 64).
    """

    def __init__(self, tasks: Sequence[str], dim: int = 64):
        super().__init__()
        self.tasks = list(tasks)
        self.weight = nn.Parameter(torch.randn(len(self.tasks), dim))

    def forward(self) -> torch.Tensor:
        """``[T, dim]``."""
        return self.weight


class HyperNetwork(nn.Module):
    """Task-conditioned hypernetwork: ``(task, layer[, position]) -> {head: tensor}`` for every task at once.

    Args:
        task_embeddings: the tasks' embeddings (may be shared by several hypernetworks, as the official model shares
            its ``TaskEmbeddingController`` between its stacks).
        num_layers: number of layer-id embeddings (layers this hypernetwork serves).
        heads: ``{name: shape}`` of the generated tensors (e.g. ``{"down": (b, d), "down_bias": (b,)}``).
        hidden: hidden width of the task projector (``task_hidden_dim`` = 128).
        proj_dim: projected embedding size fed to the heads (``projected_task_embedding_dim`` = 64).
        num_positions: number of adapter-position embeddings concatenated as well (2 for HyperFormer++'s
            attention/feed-forward block types; 0 = none).
        layer_norm: LayerNorm on the projected embedding (official ``unique_hyper_net_layer_norm``, default True).
        std: init std of the heads' and projector's weights (official 1e-2).

    Shapes: :meth:`forward` returns ``{name: [T, *shape]}``; :meth:`embed` ``[T, proj_dim]``.

    Raises:
        MtbenchError: a layer or position index out of range, or no heads.
    """

    def __init__(self, task_embeddings: TaskEmbeddings, num_layers: int, heads: Mapping[str, Sequence[int]],
                 hidden: int = 128, proj_dim: int = 64, num_positions: int = 0, layer_norm: bool = True,
                 std: float = 1e-2):
        super().__init__()
        if not heads:
            raise MtbenchError("a hypernetwork needs at least one head")
        self.task_embeddings = task_embeddings
        dim = task_embeddings.weight.shape[1]
        self.num_layers = num_layers
        self.num_positions = num_positions
        self.layer_embeddings = nn.Embedding(num_layers, dim)  # N(0, 1) init, as nn.Embedding in the official code
        self.position_embeddings = nn.Embedding(num_positions, dim) if num_positions else None
        parts = 2 + (1 if num_positions else 0)
        self.projector = nn.Sequential(_linear(dim * parts, hidden, std), nn.ReLU(), _linear(hidden, proj_dim, std))
        self.norm = nn.LayerNorm(proj_dim, eps=1e-6) if layer_norm else nn.Identity()
        self.shapes = {name: tuple(int(s) for s in shape) for name, shape in heads.items()}
        self.heads = nn.ModuleDict({name: _linear(proj_dim, _numel(shape), std) for name, shape in self.shapes.items()})

    def embed(self, layer: int, position: int | None = None) -> torch.Tensor:
        """Projected embedding ``[T, proj_dim]`` of (every task, ``layer``[, ``position``])."""
        if not 0 <= layer < self.num_layers:
            raise MtbenchError(f"hypernetwork layer {layer} out of range 0..{self.num_layers - 1}")
        tasks = self.task_embeddings()
        T = tasks.shape[0]
        parts = [tasks, self.layer_embeddings.weight[layer].expand(T, -1)]
        if self.position_embeddings is not None:
            if position is None or not 0 <= position < self.num_positions:
                raise MtbenchError(f"hypernetwork position {position} out of range 0..{self.num_positions - 1}")
            parts.append(self.position_embeddings.weight[position].expand(T, -1))
        return self.norm(self.projector(torch.cat(parts, dim=1)))

    def forward(self, layer: int, position: int | None = None,
                names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Generated tensors ``{name: [T, *shape]}`` of the heads ``names`` (all by default)."""
        h = self.embed(layer, position)
        names = list(self.shapes) if names is None else names
        return {n: self.heads[n](h).view(h.shape[0], *self.shapes[n]) for n in names}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def stream_task_index(tasks: Sequence[str], layout: StreamLayout | None = None) -> list[int] | None:
    """Index into ``tasks`` of each stream of ``layout`` (default: :func:`mtbench.streams.current_layout`).

    Returns None when the streams are exactly ``tasks`` in order (no gather needed).

    Raises:
        MtbenchError: no layout (outside the encoder loop) or a stream that is not a task (e.g. the shared stream):
            generated per-task weights need task streams (``StreamPlan.dedicated()``).
    """
    layout = layout if layout is not None else current_layout()
    if layout is None:
        raise MtbenchError("per-task generated weights are applied outside the encoder loop (no stream layout)")
    missing = [n for n in layout.names if n not in tasks]
    if missing:
        raise MtbenchError(f"stream(s) {missing} have no generated weights; streams must be tasks of {list(tasks)}")
    idx = [list(tasks).index(n) for n in layout.names]
    return None if idx == list(range(len(tasks))) else idx


def _select(t: torch.Tensor | None, idx: list[int] | None) -> torch.Tensor | None:
    if t is None or idx is None:
        return t
    return t[torch.tensor(idx, device=t.device)]


def stream_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tasks: Sequence[str],
                  layout: StreamLayout | None = None) -> torch.Tensor:
    """Per-task linear map on stacked task streams in one batched matmul: stream ``s`` (task ``t``) gets
    ``x_s W_t^T + b_t``.

    Args:
        x: ``[S*M, ..., in]`` streams stacked task-major (:mod:`mtbench.streams`).
        weight: ``[T, out, in]`` (``F.linear`` layout), one per task of ``tasks``.
        bias: ``[T, out]`` or None.
        tasks: task names indexing dim 0 of ``weight``/``bias``.
        layout: stream layout (default: the current one).

    Returns:
        ``[S*M, ..., out]``.

    Raises:
        MtbenchError: see :func:`stream_task_index`.
    """
    layout = layout if layout is not None else current_layout()
    idx = stream_task_index(tasks, layout)
    w, b = _select(weight, idx), _select(bias, idx)
    S = layout.size
    rest = x.shape[1:-1]
    xs = x.reshape(S, -1, x.shape[-1])
    out = torch.bmm(xs, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), xs, w.transpose(1, 2))
    return out.reshape(x.shape[0], *rest, w.shape[1])


def stream_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tasks: Sequence[str],
                      layout: StreamLayout | None = None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim with per-task generated affine parameters (HyperFormer's conditional LayerNorm,
    §2.3 Eq. 3; official ``MetaLayersAdapterController.apply_layer_norm``).

    Args:
        x: ``[S*M, ..., C]`` task streams; weight, bias: ``[T, C]``.

    Returns:
        ``[S*M, ..., C]``: ``γ_t ⊙ (x - μ)/σ + β_t`` on task t's rows.
    """
    layout = layout if layout is not None else current_layout()
    idx = stream_task_index(tasks, layout)
    w, b = _select(weight, idx), _select(bias, idx)
    S = layout.size
    xs = F.layer_norm(x, x.shape[-1:], eps=eps).reshape(S, -1, x.shape[-1])
    return (xs * w.unsqueeze(1) + b.unsqueeze(1)).reshape(x.shape)
