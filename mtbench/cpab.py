"""1-D CPAB diffeomorphisms of a signal, and the cached SVD of a frozen weight (DiTASK's building blocks).

CPAB (continuous piecewise-affine-based) transformations (Freifeld et al., "Transformations Based on Continuous
Piecewise-Affine Velocity Fields", TPAMI 2017; Detlefsen et al., "Deep Diffeomorphic Transformer Networks", CVPR
2018): the interval ``[0, 1]`` is split into ``tess_size`` equal cells; a velocity field ``v_θ`` that is affine in each
cell, continuous, and (``zero_boundary``) zero at 0 and 1 has ``tess_size - 1`` degrees of freedom ``θ``; the
transformation ``φ_θ`` is the flow of ``v_θ`` at time 1, integrated in closed form cell by cell. ``φ_θ`` is a
diffeomorphism of ``[0, 1]`` (monotone, ``φ(0) = 0``, ``φ(1) = 1``) and ``φ_0`` is the identity.

The integration is the ``difw`` package's (``Cpab(tess_size, backend="pytorch", zero_boundary=True)``, basis
``rref``, closed-form integration with analytic gradients; github.com/imartinezl/difw), the library DiTASK's official
code uses (``ipsitmantri/DiTASK models/lora.py``). ``difw`` compiles a small C++ extension on first import (about
1.5 min on 2 cores, cached by torch under ``~/.cache/torch_extensions``); its compile messages are silenced here.

:func:`warp_signal` resamples a signal ``S`` sampled at ``u_i = i/(n-1)`` at the warped points ``φ(u_i)`` with
``difw``'s linear interpolation, written in displacement form (position ``i + (φ(u_i) - u_i)(n-1)`` instead of
``φ(u_i)(n-1)``; equal in exact arithmetic) so that ``θ = 0`` returns ``S`` bit-exactly.
"""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache

import torch
from torch import nn

from mtbench.errors import MtbenchError


@lru_cache(maxsize=None)
def _difw():
    """Import ``difw`` once, silencing its extension-compile messages.

    Raises:
        MtbenchError: ``difw`` is not installed or its CPU extension does not build.
    """
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            import difw
    except Exception as e:  # noqa: BLE001 (ImportError or an extension build error)
        raise MtbenchError(f"the CPAB transform needs the 'difw' package ({type(e).__name__}: {e}); "
                           "pip install difw") from e
    return difw


class CPAB1D:
    """A 1-D CPAB transformation family with zero-velocity boundary (one per tessellation size and device).

    Args:
        tess_size: number of cells ``nc`` (DiTASK's rank ``r``: 64 shared, 4 per task); ``θ`` has ``nc - 1``
            entries.

    Raises:
        MtbenchError: ``tess_size < 2``; ``difw`` unavailable.
    """

    def __init__(self, tess_size: int):
        if tess_size < 2:
            raise MtbenchError(f"CPAB tess_size must be >= 2 (theta has tess_size - 1 entries), got {tess_size}")
        self.tess_size = int(tess_size)
        self._by_device: dict[str, object] = {}

    @property
    def num_params(self) -> int:
        """Length of ``θ``: ``tess_size - 1`` (continuity and the two boundary constraints)."""
        return self.tess_size - 1

    def _cpab(self, device: torch.device):
        key = "gpu" if device.type == "cuda" else "cpu"
        if key not in self._by_device:
            difw = _difw()
            with contextlib.redirect_stdout(io.StringIO()):
                self._by_device[key] = difw.Cpab(tess_size=self.tess_size, backend="pytorch", device=key,
                                                 zero_boundary=True)
        return self._by_device[key]

    def warp_grid(self, theta: torch.Tensor, n: int) -> torch.Tensor:
        """``φ_θ(u_i)`` at the ``n`` uniform points ``u_i = i/(n-1)`` of ``[0, 1]``.

        Args:
            theta: ``[K, tess_size - 1]`` (K transformations).
            n: number of points (≥ 2).

        Returns:
            ``[K, n]`` float32, differentiable in ``theta``.
        """
        if theta.ndim != 2 or theta.shape[1] != self.num_params:
            raise MtbenchError(f"theta must be [K, {self.num_params}], got {tuple(theta.shape)}")
        T = self._cpab(theta.device)
        grid = torch.linspace(0, 1, n, device=theta.device, dtype=torch.float32)
        return T.transform_grid(grid, theta.float())


def warp_signal(values: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """Resample signals at warped points by linear interpolation (``difw``'s ``interpolate``, displacement form).

    Args:
        values: ``[..., n]`` signals sampled at ``u_i = i/(n-1)``.
        phi: ``[K, n]`` warped points ``φ(u_i)`` in ``[0, 1]`` (from :meth:`CPAB1D.warp_grid`); broadcast against
            ``values``' leading dims as ``[K, ..., n]``.

    Returns:
        ``[K, ..., n]``: ``S'_i = S(φ(u_i))`` with ``S`` linear between samples; ``S' = S`` exactly where
        ``φ(u_i) = u_i``.
    """
    n = values.shape[-1]
    if n == 1:
        return values.expand(phi.shape[0], *values.shape)
    u = torch.linspace(0, 1, n, device=phi.device, dtype=phi.dtype)
    pos = torch.arange(n, device=phi.device, dtype=phi.dtype) + (phi - u) * (n - 1)  # [K, n]
    pos = pos.clamp(0, n - 1)
    i0 = pos.detach().floor().long().clamp(0, n - 1)
    i1 = (i0 + 1).clamp(max=n - 1)
    w = pos - i0.to(pos.dtype)
    lead = values.shape[:-1]
    shape = (phi.shape[0],) + (1,) * len(lead) + (n,)
    v = values.unsqueeze(0).expand(phi.shape[0], *values.shape)
    y0 = torch.gather(v, -1, i0.view(shape).expand_as(v))
    y1 = torch.gather(v, -1, i1.view(shape).expand_as(v))
    wv = w.view(shape).to(values.dtype)
    return y0 * (1 - wv) + y1 * wv


class FrozenSVD:
    """Cached thin SVD of a frozen weight, split into row chunks (DiTASK warps q, k, v of a fused ``qkv`` apart).

    The official code calls ``torch.svd(W)`` in every forward; the weight is frozen, so the factors are computed
    once per (weight version, device, dtype) and reused; an in-place change of the weight (loading a checkpoint)
    recomputes them.

    Args:
        chunks: number of equal row blocks of the weight (3 for a fused ``qkv``, else 1).

    Shapes: :meth:`factors` of a weight ``[out, in]`` returns ``U [k, out/k, m]``, ``S [k, m]``, ``Vh [k, m, in]``
    with ``k = chunks``, ``m = min(out/k, in)``, float32, no grad.
    """

    def __init__(self, chunks: int = 1):
        self.chunks = int(chunks)
        self._key = None
        self._factors = None

    @torch.no_grad()
    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (weight._version, weight.data_ptr(), weight.device, weight.dtype)
        if key != self._key:
            w = weight.detach().float().reshape(self.chunks, weight.shape[0] // self.chunks, weight.shape[1])
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            self._factors, self._key = (U, S, Vh), key
        return self._factors


def svd_warped_delta(weight: torch.Tensor, svd: FrozenSVD, cpab: CPAB1D, theta: torch.Tensor) -> torch.Tensor:
    """``W'_k - W`` for each transformation ``k``: ``U diag(S(φ_θk) - S) Vᵀ`` per row chunk (DiTASK, Mantri et al. CVPR 2025, method section; official ``models/lora.py::DiTASKLinear.transform_data``).

    ``W' = U diag(S') Vᵀ`` with the singular values warped, ``S' = S∘φ_θ``, the singular vectors kept; written as
    ``W + U diag(S' - S) Vᵀ`` (equal in exact arithmetic; exact at ``θ = 0`` instead of carrying the SVD's
    round-off).

    Args:
        weight: frozen ``[out, in]``.
        theta: ``[K, d]``.

    Returns:
        ``[K, out, in]`` float32.
    """
    U, S, Vh = svd.factors(weight)  # [k,o,m], [k,m], [k,m,in]
    phi = cpab.warp_grid(theta, S.shape[-1])  # [K, m]
    dS = warp_signal(S, phi) - S  # [K, k, m]
    delta = torch.einsum("kom,Kkm,kmi->Kkoi", U, dS, Vh)
    return delta.reshape(theta.shape[0], weight.shape[0], weight.shape[1])


class Theta(nn.Module):
    """One CPAB parameter vector ``θ`` ``[d]``, initialised as the official code (``kaiming_uniform_(a=√5)`` on a
    ``[1, d]`` tensor, i.e. uniform in ``±1/√d``), or zeros (identity warp)."""

    def __init__(self, d: int, init: str = "kaiming"):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d))
        if init == "kaiming":
            with torch.no_grad():
                self.theta.uniform_(-1 / d ** 0.5, 1 / d ** 0.5)
        elif init != "zero":
            raise MtbenchError(f"theta init must be kaiming or zero, got {init!r}")
