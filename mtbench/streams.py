"""Task streams stacked on the batch dimension, and the task-indexed container (the core's one per-task mechanism).

Inside the encoder a tensor may carry several *streams* stacked task-major on dim 0: ``[S*B, ...]`` where stream
``s`` occupies rows ``s*B' .. (s+1)*B'-1`` (``B'`` = the tensor's per-stream leading size, e.g. ``B`` images or
``B*nW`` windows). Each stream has a name: :data:`SHARED` for the shared (task-agnostic) stream, or a task name.
The encoder loop (:mod:`mtbench.encoder`) publishes the current :class:`StreamLayout` with :func:`stream_layout`;
any module inside a block reads it with :func:`current_layout` and never needs another argument.

:class:`TaskIndexed` applies task ``t``'s module to task ``t``'s slice of a stacked tensor in one call. Its
``share`` flag is the shared/dedicated convention of the multi-task PEFT literature (TDSS Table 1 "sha." / "ded.";
TADFormer §4.2): ``shared`` = one module applied to every stream; ``dedicated`` = one module per task. Per-task LoRA,
adapters, biases, prompts and hypernetwork-generated weights all use it (or :func:`per_stream`, the dispatch it is
built on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from mtbench.errors import MtbenchError

#: Name of the shared (task-agnostic) stream.
SHARED = "shared"
#: Values of the shared/dedicated flag.
SHARE_MODES = ("shared", "dedicated")


@dataclass(frozen=True)
class StreamLayout:
    """Names of the streams stacked on dim 0, task-major.

    Attributes:
        names: one entry per stream, :data:`SHARED` or a task name, e.g. ``("shared", "semseg", "sal")``.
        batch: images per stream ``B``.
    """

    names: tuple[str, ...]
    batch: int

    @property
    def size(self) -> int:
        """Number of streams ``S``."""
        return len(self.names)

    @property
    def has_shared(self) -> bool:
        return SHARED in self.names

    @property
    def tasks(self) -> tuple[str, ...]:
        """Task streams in order (the shared stream left out)."""
        return tuple(n for n in self.names if n != SHARED)

    def index(self, name: str) -> int:
        return self.names.index(name)


_LAYOUTS: list[StreamLayout | None] = [None]


@contextmanager
def stream_layout(layout: StreamLayout | None) -> Iterator[None]:
    """Publish ``layout`` to the modules called inside the ``with`` block (the encoder loop does this)."""
    _LAYOUTS.append(layout)
    try:
        yield
    finally:
        _LAYOUTS.pop()


def current_layout() -> StreamLayout | None:
    """The layout of the tensors the current block processes, or None outside the encoder (one plain batch)."""
    return _LAYOUTS[-1]


def split_streams(x: torch.Tensor, num_streams: int) -> torch.Tensor:
    """View ``[S*M, ...]`` as ``[S, M, ...]``.

    Raises:
        MtbenchError: dim 0 not divisible by ``S``.
    """
    if x.shape[0] % num_streams:
        raise MtbenchError(f"a tensor of {x.shape[0]} rows cannot hold {num_streams} stacked streams")
    return x.view(num_streams, x.shape[0] // num_streams, *x.shape[1:])


def unstack_streams(x: torch.Tensor, num_streams: int) -> tuple[torch.Tensor, ...]:
    """``[S*M, ...]`` -> ``S`` views ``[M, ...]``, one per stream.

    ``torch.split``, whose backward concatenates the streams' gradients once; indexing a stacked view
    (``split_streams(x, S)[s]``) would allocate and zero-fill a gradient of the whole tensor for every stream read
    (issue 6: a third of MTLoRA's training step).

    Raises:
        MtbenchError: dim 0 not divisible by ``S``.
    """
    if x.shape[0] % num_streams:
        raise MtbenchError(f"a tensor of {x.shape[0]} rows cannot hold {num_streams} stacked streams")
    return x.split(x.shape[0] // num_streams)


def first_and_rest(x: torch.Tensor, num_streams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[S*M, ...]`` -> (the first stream ``[M, ...]``, the others ``[(S-1)*M, ...]``), as views with one
    concatenating backward (see :func:`unstack_streams`).

    Raises:
        MtbenchError: dim 0 not divisible by ``S``.
    """
    if x.shape[0] % num_streams:
        raise MtbenchError(f"a tensor of {x.shape[0]} rows cannot hold {num_streams} stacked streams")
    m = x.shape[0] // num_streams
    first, rest = x.split([m, x.shape[0] - m])
    return first, rest


def repeat_streams(x: torch.Tensor, num_streams: int) -> torch.Tensor:
    """``[M, ...]`` -> ``[S*M, ...]`` with the same rows in every stream."""
    return x.unsqueeze(0).expand(num_streams, *x.shape).reshape(num_streams * x.shape[0], *x.shape[1:])


def per_stream(x: torch.Tensor, fn: Callable[[str, torch.Tensor], torch.Tensor],
               layout: StreamLayout | None = None) -> torch.Tensor:
    """Apply ``fn(stream name, slice)`` to each stream's slice of ``x`` ``[S*M, ...]`` and restack the results.

    With no layout (outside the encoder) ``x`` is one shared stream: ``fn(SHARED, x)``.
    """
    layout = layout if layout is not None else current_layout()
    if layout is None or layout.size == 1:
        return fn(layout.names[0] if layout else SHARED, x)
    parts = unstack_streams(x, layout.size)
    return torch.cat([fn(name, parts[s]) for s, name in enumerate(layout.names)])


class TaskIndexed(nn.Module):
    """Per-task modules applied to their own task's slice of a stacked batch, or one module for all.

    Args:
        tasks: task names, in order.
        make: factory ``make(task) -> nn.Module`` (called once with ``"shared"`` when ``share="shared"``).
        share: ``"shared"`` (one module for every stream) | ``"dedicated"`` (one module per task).
        on_shared_stream: what a dedicated container does to the :data:`SHARED` stream's slice: ``"identity"``
            (leave it unchanged) or a module applied to it.

    Shapes: ``forward(x, *args)``: ``x`` ``[S*M, ...]`` stacked per :func:`current_layout`; output ``[S*M, ...']``
    (each module's output shape). Extra positional arguments are passed to each module unchanged.

    Raises:
        MtbenchError: unknown ``share``; a stream whose task has no module.
    """

    def __init__(self, tasks: Sequence[str], make: Callable[[str], nn.Module], share: str = "dedicated",
                 on_shared_stream: str | nn.Module = "identity"):
        super().__init__()
        if share not in SHARE_MODES:
            raise MtbenchError(f"share={share!r} is not one of {', '.join(SHARE_MODES)}")
        self.share = share
        self.tasks = list(tasks)
        if share == "shared":
            self.shared = make(SHARED)
        else:
            self.per_task = nn.ModuleDict({t: make(t) for t in self.tasks})
            self.shared_stream = on_shared_stream if isinstance(on_shared_stream, nn.Module) else None

    def module_for(self, name: str) -> nn.Module | None:
        """The module applied to stream ``name`` (None = identity)."""
        if self.share == "shared":
            return self.shared
        if name == SHARED:
            return self.shared_stream
        if name not in self.per_task:
            raise MtbenchError(f"no module for task stream {name!r}; tasks: {', '.join(self.tasks)}")
        return self.per_task[name]

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        if self.share == "shared":
            return self.shared(x, *args)

        def apply(name: str, part: torch.Tensor) -> torch.Tensor:
            m = self.module_for(name)
            return part if m is None else m(part, *args)

        return per_stream(x, apply)

    def stacked(self, param: str, names: Sequence[str]) -> torch.Tensor:
        """``[len(names), ...]``: the parameter ``param`` of each named stream's module, stacked (for batched
        ``bmm``-style kernels, e.g. hypernetwork-generated weights)."""
        return torch.stack([getattr(self.module_for(n), param) for n in names])

    def extra_repr(self) -> str:
        return f"share={self.share}, tasks={self.tasks}"
