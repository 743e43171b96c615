"""Multi-scale deformable attention (mtbench.deformable): against a plain loop, gradcheck, DETR init, FLOP count."""

from __future__ import annotations

import math

import torch

from mtbench.deformable import MSDeformAttn, grid_reference_points, ms_deform_attn_sample
from mtbench.measure import count_macs


def _bilinear(img: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Hand bilinear read of ``img [D, H, W]`` at normalised (x, y), zeros outside (align_corners=False)."""
    D, H, W = img.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(D, dtype=img.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                out = out + wy * wx * img[:, yy, xx]
    return out


def _loop(values, locations, weights):
    B, Nq, M, L, P, _ = locations.shape
    D = values[0].shape[2]
    out = torch.zeros(B, Nq, M * D, dtype=values[0].dtype)
    for b in range(B):
        for q in range(Nq):
            for m in range(M):
                acc = torch.zeros(D, dtype=values[0].dtype)
                for lvl in range(L):
                    for p in range(P):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        acc = acc + weights[b, q, m, lvl, p] * _bilinear(values[lvl][b, m], x, y)
                out[b, q, m * D:(m + 1) * D] = acc
    return out


def _inputs(dtype=torch.float32, B=2, Nq=3, M=2, D=3, shapes=((4, 5), (2, 3)), P=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(B, M, D, h, w, generator=g, dtype=dtype) for h, w in shapes]
    # include points outside [0, 1] to exercise the zero padding
    locations = torch.rand(B, Nq, M, len(shapes), P, 2, generator=g, dtype=dtype) * 1.3 - 0.15
    weights = torch.rand(B, Nq, M, len(shapes), P, generator=g, dtype=dtype)
    weights = weights / weights.sum(dim=(-1, -2), keepdim=True)
    return values, locations, weights


def test_sampling_matches_loop_over_heads_levels_points():
    values, locations, weights = _inputs()
    assert torch.allclose(ms_deform_attn_sample(values, locations, weights), _loop(values, locations, weights),
                          atol=1e-5)


def test_sampling_gradcheck_float64():
    values, locations, weights = _inputs(torch.float64, B=1, Nq=2, M=2, D=2, shapes=((3, 4), (2, 2)), P=2)
    # keep the points away from pixel centres' grid lines, where bilinear sampling is not differentiable
    locations = locations.clamp(0.05, 0.95)
    args = [v.requires_grad_() for v in values] + [locations.requires_grad_(), weights.requires_grad_()]
    assert torch.autograd.gradcheck(lambda v0, v1, loc, w: ms_deform_attn_sample([v0, v1], loc, w), args,
                                    eps=1e-6, atol=1e-5)


def test_module_gradcheck_float64():
    torch.manual_seed(0)
    attn = MSDeformAttn(4, heads=2, levels=2, points=2).double()
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.1)
    q = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(1, 3, 2, dtype=torch.float64) * 0.6 + 0.2
    vals = [torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b, c: attn(a, ref, [b, c]), (q, *vals), eps=1e-6, atol=1e-5)


def test_detr_initialisation():
    attn = MSDeformAttn(16, heads=4, levels=2, points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points right (angle 0), head 1 down (angle pi/2), radius k+1 for point k, same on every level
    assert torch.allclose(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(bias[0, :, :, 1], torch.zeros(2, 3), atol=1e-6)
    assert torch.allclose(bias[1, 0, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0
    assert attn.value_proj.bias.abs().sum() == 0


def test_module_equals_projections_of_the_loop():
    torch.manual_seed(1)
    attn = MSDeformAttn(4, heads=2, levels=2, points=2)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.5)
    q = torch.randn(1, 5, 4)
    ref = grid_reference_points(1, 5)[None]
    vals = [torch.randn(1, 4, 3, 4), torch.randn(1, 4, 2, 2)]
    out = attn(q, ref, vals)
    pv = [attn.value_proj(v.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(1, 2, 2, *v.shape[-2:])
          for v in vals]
    off = attn.sampling_offsets(q).view(1, 5, 2, 2, 2, 2)
    loc = ref[:, :, None, None, None] + off / torch.tensor([[4.0, 3.0], [2.0, 2.0]])[None, None, None, :, None]
    w = attn.attention_weights(q).view(1, 5, 2, 4).softmax(-1).view(1, 5, 2, 2, 2)
    assert torch.allclose(out, attn.output_proj(_loop(pv, loc, w)), atol=1e-5)


def test_fvcore_counts_grid_sample():
    attn = MSDeformAttn(8, heads=2, levels=1, points=3)
    q = torch.randn(1, 6, 8)
    ref = grid_reference_points(2, 3)[None]
    v = torch.randn(1, 8, 2, 3)
    flops = count_macs(lambda_module(attn), (q, ref, v))
    linears = 6 * 8 * (2 * 1 * 3 * 2) + 6 * 8 * (2 * 3) + 6 * 8 * 8 + 6 * 8 * 8  # offsets, weights, value, output
    sampling = 4 * (2 * 4 * 6 * 3)  # 4 MACs per sampled element: [B*M, D, Nq, P]
    assert flops == linears + sampling


class lambda_module(torch.nn.Module):  # noqa: N801  (fvcore traces a module with tensor inputs)
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q, ref, v):
        return self.attn(q, ref, [v])
