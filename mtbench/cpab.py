"""1-D CPAB diffeomorphisms of a signal, and the cached SVD of a frozen weight (DiTASK's building blocks).

CPAB (continuous piecewise-affine-based) transformations (Freifeld et al., "Transformations Based on Continuous
Piecewise-Affine Velocity Fields", TPAMI 2017; Detlefsen et al., "Deep Diffeomorphic Transformer Networks", CVPR
2018): the interval ``[0, 1]`` is split into ``tess_size`` equal cells; a velocity field ``v_θ`` that is affine in each
cell, continuous, and (``zero_boundary``) zero at 0 and 1 has ``tess_size - 1`` degrees of freedom ``θ``; the
transformation ``φ_θ`` is the flow of ``v_θ`` at time 1, integrated in closed form cell by cell. ``φ_θ`` is a
diffeomorphism of ``[0, 1]`` (monotone, ``φ(0) = 0``, ``φ(1) = 1``) and ``φ_0`` is the identity.

The parametrisation is ``difw``'s (github.com/imartinezl/difw; the library DiTASK's official code calls,
``ipsitmantri/DiTASK models/lora.py``): ``θ`` maps to the per-cell affine coefficients ``(a_c, b_c) = B θ`` through
the null-space basis ``B`` of the continuity and boundary constraints that ``difw.core.tessellation.Tessellation``
computes (``rref`` basis, pure Python). The integration is written here, because ``difw`` 0.0.31's own integrators
do not work on this CPU (checked 2026-11-24, torch 2.x, gcc, 2 cores):

* its compiled CPU closed form (a C++ extension built with ``-Ofast -ffast-math``) returns non-monotone maps, e.g.
  steps of -0.59 between neighbouring grid points for ``θ ~ U(±0.06)`` at 64 cells (a diffeomorphism is monotone);
* its pure-PyTorch closed form is right (within 4e-7 of its numeric integrator) but its backward raises
  ``RuntimeError: The size of tensor a (48) must match the size of tensor b (96) at non-singleton dimension 0``
  for a batch of two ``θ``;
* its CUDA extension does not build here ("list index out of range").

:func:`integrate_closed_form` follows Freifeld et al. (TPAMI 2017, §4 "closed-form integration"): inside cell ``c``
the flow of ``v = a x + b`` is ``ψ(x, t) = e^{ta} x + (b/a)(e^{ta} - 1)`` (``x + t b`` when ``a = 0``); a point that
would leave its cell reaches the boundary ``x_c`` at ``t_hit = log(v(x_c)/v(x)) / a`` (``(x_c - x)/b`` when
``a = 0``), continues from there in the next cell with the remaining time, and stops where it stays in its cell.
It is vectorised over points and transformations (at most ``nc`` cell crossings), differentiable by autograd, and
the identity at ``θ = 0`` exactly. Tested against ``difw``'s pure-PyTorch closed form (values and gradients).

:func:`warp_signal` resamples a signal ``S`` sampled at ``u_i = i/(n-1)`` at the warped points ``φ(u_i)`` with
``difw``'s linear interpolation, written in displacement form (position ``i + (φ(u_i) - u_i)(n-1)`` instead of
``φ(u_i)(n-1)``; equal in exact arithmetic) so that ``θ = 0`` returns ``S`` bit-exactly.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from mtbench.errors import MtbenchError


@lru_cache(maxsize=None)
def cpab_basis(tess_size: int) -> torch.Tensor:
    """``difw``'s constraint null-space basis ``B`` ``[2*nc, nc-1]`` (float64) of zero-boundary CPA velocity fields
    on ``[0, 1]`` with ``nc = tess_size`` cells: ``(a_c, b_c) = (B θ)[2c], (B θ)[2c+1]``.

    Raises:
        MtbenchError: ``difw`` is not installed.
    """
    try:
        from difw.core.tessellation import Tessellation
    except ImportError as e:
        raise MtbenchError(f"the CPAB transform needs the 'difw' package ({e}); pip install difw") from e
    return torch.as_tensor(Tessellation(tess_size, 0.0, 1.0, True, basis="rref").B, dtype=torch.float64)


def integrate_closed_form(A: torch.Tensor, x: torch.Tensor, time: float = 1.0) -> torch.Tensor:
    """Closed-form flow ``φ(x) = ψ^{time}(x)`` of continuous piecewise-affine velocity fields on ``[0, 1]``
    (module docstring).

    Args:
        A: ``[K, nc, 2]`` per-cell ``(a_c, b_c)`` of ``K`` velocity fields (``v(x) = a_c x + b_c`` in cell ``c``).
        x: ``[n]`` points in ``[0, 1]``.
        time: integration time.

    Returns:
        ``[K, n]`` in ``A``'s dtype, differentiable in ``A``.
    """
    K, nc, _ = A.shape
    eps = torch.finfo(A.dtype).eps
    x = x.to(A.dtype).expand(K, -1)
    t = torch.full_like(x, float(time))
    c = (x * nc).floor().clamp(0, nc - 1).long()
    phi = x
    done = torch.zeros_like(x, dtype=torch.bool)
    for _ in range(nc + 1):
        a = torch.gather(A[..., 0], 1, c)
        b = torch.gather(A[..., 1], 1, c)
        small_a = a.abs() < eps
        a_safe = torch.where(small_a, torch.ones_like(a), a)
        eta = torch.exp(t * a)
        psi = torch.where(small_a, x + t * b, eta * x + (b / a_safe) * (eta - 1))
        v = a * x + b
        xc = torch.where(v > 0, (c + 1).to(A.dtype) / nc, c.to(A.dtype) / nc)
        vc = a * xc + b
        cc = c + torch.sign(v).long()
        no_hit = (v.abs() < eps) | (cc < 0) | (cc >= nc) | (vc.abs() < eps) | (torch.sign(v) != torch.sign(vc))
        b_safe = torch.where(b.abs() < eps, torch.ones_like(b), b)
        v_safe = torch.where(no_hit, torch.ones_like(v), v)
        ratio = torch.where(no_hit, torch.ones_like(v), vc / v_safe)
        thit = torch.where(small_a, (xc - x) / b_safe, torch.log(ratio) / a_safe)
        thit = torch.where(no_hit, torch.full_like(thit, float("inf")), thit)
        stay = (thit >= t) & ~done
        phi = torch.where(stay, psi, phi)
        done = done | stay
        if bool(done.all()):
            break
        x = torch.where(done, x, xc)
        t = torch.where(done, t, t - torch.where(done, torch.zeros_like(thit), thit))
        c = torch.where(done, c, cc)
    return phi


class CPAB1D:
    """A 1-D CPAB transformation family with zero-velocity boundary on ``[0, 1]``.

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
        self.basis = cpab_basis(self.tess_size)

    @property
    def num_params(self) -> int:
        """Length of ``θ``: ``tess_size - 1`` (continuity and the two boundary constraints)."""
        return self.tess_size - 1

    def velocity_coefficients(self, theta: torch.Tensor) -> torch.Tensor:
        """``[K, d]`` -> per-cell ``(a_c, b_c)`` ``[K, nc, 2]`` (float64)."""
        if theta.ndim != 2 or theta.shape[1] != self.num_params:
            raise MtbenchError(f"theta must be [K, {self.num_params}], got {tuple(theta.shape)}")
        B = self.basis.to(theta.device)
        return (theta.double() @ B.t()).view(theta.shape[0], self.tess_size, 2)

    def warp_grid(self, theta: torch.Tensor, n: int) -> torch.Tensor:
        """``φ_θ(u_i)`` at the ``n`` uniform points ``u_i = i/(n-1)`` of ``[0, 1]``.

        Args:
            theta: ``[K, tess_size - 1]`` (K transformations).
            n: number of points.

        Returns:
            ``[K, n]`` float32, differentiable in ``theta``.
        """
        A = self.velocity_coefficients(theta)
        grid = torch.linspace(0, 1, n, device=theta.device, dtype=torch.float32)  # the points warp_signal uses
        return integrate_closed_form(A, grid.double()).float()


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
    delta = (U.unsqueeze(0) * dS.unsqueeze(-2)) @ Vh.unsqueeze(0)  # [K, k, o, in]
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
