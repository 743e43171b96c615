"""CPU execution settings that every compute command applies: threads, denormals, and glibc's allocator.

Measured on the papers' setting (Swin-T 448x448, 4 PASCAL-Context tasks, training step at batch 2, 2 threads;
issue 6), each setting applied to every method alike:

* **Threads**: every core for intra-op parallelism (torch defaults to the physical cores, often fewer), unless
  ``$OMP_NUM_THREADS`` says otherwise.
* **Flush denormals to zero** (``torch.set_flush_denormal``): float32 values below 1.2e-38 are treated as 0. Tiny
  gradients made ``gelu_backward`` up to 2x slower; the values lost are far below anything a float32 sum keeps.
* **glibc malloc thresholds** (Linux/glibc only): tensors above glibc's mmap threshold (at most 32 MB) are
  ``mmap``-ed and returned to the system when freed, so every training step faulted in fresh zeroed pages again:
  5.3 GB of page faults and 2.5-3.5 s of system time per MTLoRA step. ``M_MMAP_THRESHOLD`` = 1 GiB and no heap
  trimming keep freed blocks for reuse (the remedy PyTorch's CPU tuning guide gives with jemalloc/tcmalloc, done
  with glibc's own ``mallopt``). The cost: the process keeps its peak resident memory until it exits.
  ``mtbench profile`` measures peak memory in child processes that do *not* apply it, so a step's peak is not
  hidden by blocks kept from before. Those children apply :func:`track_live_memory` instead.

Set ``MTBENCH_CPU_TUNING=off`` to keep torch's and glibc's defaults (threads are still set).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: What :func:`configure_cpu` applied in this process (recorded in profiles).
APPLIED: dict[str, object] = {}


def _glibc():
    """The C library when it is glibc (Linux), else None (musl and other systems lack these malloc controls)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError outside glibc)
    except (OSError, AttributeError):
        return None
    return libc


def _tune_glibc_malloc() -> bool:
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_free_memory() -> bool:
    """Give the memory glibc keeps in free blocks back to the system (``malloc_trim(0)``), so that the next
    allocations fault in fresh pages and show in the resident set again (used by :func:`mtbench.measure.peak_memory`,
    whose measurement a tuned allocator would otherwise hide). Returns whether memory was released (False without
    glibc)."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


#: glibc's initial mmap threshold, fixed by :func:`track_live_memory`
LIVE_MMAP_THRESHOLD = 128 * 1024


def track_live_memory() -> bool:
    """Make this process's resident set follow its live allocations, for peak-memory measurement (Linux/glibc).

    ``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` (glibc's initial value, now fixed): every block of at least 128 KiB (every
    activation-sized tensor) gets its own ``mmap`` and is given back to the system when freed, so the peak resident
    set is the peak of what is allocated, the CPU counterpart of ``torch.cuda.max_memory_allocated``. Under glibc's
    default the threshold rises, up to 32 MiB, each time a mapped block is freed; from then on those sizes come from
    the heap, and freed heap blocks stay resident, so a step's peak also counts memory no tensor holds any more. That
    depends on the order of a method's allocations, not on what it needs: MTLoRA's training step (papers' setting,
    ``--activation-checkpoint lora_inputs``) peaked at 2157-2279 MB over 4 runs under the default and at 1428 MB
    in every run with the fixed threshold (issue 6).

    Returns:
        Whether the threshold was set (False without glibc, where the allocator's own behaviour is measured).
    """
    libc = _glibc()
    ok = libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, LIVE_MMAP_THRESHOLD))
    APPLIED["live_memory"] = ok
    return ok


def configure_cpu(*, allocator: bool = True) -> dict[str, object]:
    """Apply the CPU settings of the module docstring to this process (idempotent).

    Args:
        allocator: also tune glibc's malloc (False in processes that measure peak memory).

    Returns:
        ``{"threads": int, "flush_denormal": bool, "malloc_tuned": bool}``, also kept in :data:`APPLIED`.
    """
    n = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    tuned = os.environ.get("MTBENCH_CPU_TUNING", "on").lower() not in ("off", "0", "false", "no")
    flush = bool(tuned and torch.set_flush_denormal(True))
    malloc = bool(APPLIED.get("malloc_tuned")) or (tuned and allocator and _tune_glibc_malloc())
    APPLIED.update(threads=torch.get_num_threads(), flush_denormal=flush, malloc_tuned=malloc)
    return dict(APPLIED)
