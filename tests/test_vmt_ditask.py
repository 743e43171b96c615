"""VMT-Adapter(-Lite) and DiTASK: CPAB transform, exactness at θ = 0, backbone passes independent of T, counts,
freezing."""

from __future__ import annotations

import pytest
import torch

from mtbench.config import MethodSpec
from mtbench.cpab import CPAB1D, FrozenSVD, svd_warped_delta, warp_signal
from mtbench.encoder import BlockContext
from mtbench.errors import MtbenchError
from mtbench.measure import count_params
from mtbench.registry import build_model, resolve_spec
from mtbench.streams import SHARED, StreamLayout, stream_layout
from mtbench.swin import create_backbone
from mtbench.tasks import TaskSpec, resolve_tasks
from methods.ditask import DiTASKLinear

TASKS = [TaskSpec("semseg", 5, 1.0), TaskSpec("human_parts", 9, 2.0), TaskSpec("sal", 1, 5.0),
         TaskSpec("normals", 3, 10.0)]


def build(name, options=None, tasks=TASKS, backbone="swin_embedded"):
    rm = resolve_spec(MethodSpec(name, {k: str(v) for k, v in (options or {}).items()}))
    return build_model(rm, create_backbone(backbone, pretrained=backbone == "swin_embedded"), tasks)


# ---------------------------------------------------------------- CPAB


def test_cpab_identity_exact_and_matches_difw():
    torch.manual_seed(0)
    cpab = CPAB1D(64)
    assert cpab.num_params == 63
    S = torch.linspace(5.0, 0.1, 48) ** 2
    phi0 = cpab.warp_grid(torch.zeros(1, 63), 48)
    assert torch.equal(warp_signal(S, phi0)[0], S)  # identity, bit-exact
    theta = ((torch.rand(2, 63) - 0.5) * 2).requires_grad_()
    phi = cpab.warp_grid(theta, 48)
    assert torch.all(phi[:, 1:] > phi[:, :-1])  # a diffeomorphism of [0, 1]
    assert torch.allclose(phi[:, 0], torch.zeros(2), atol=1e-6) and torch.allclose(phi[:, -1], torch.ones(2))
    assert (phi - torch.linspace(0, 1, 48)).abs().max() > 1e-2  # it does move
    # difw's pure-PyTorch closed form (one θ at a time: its backward fails on batches) agrees, values and gradients
    import difw

    ref_T = difw.Cpab(tess_size=64, backend="pytorch", device="cpu", zero_boundary=True)
    ref_T.params.use_slow = True
    w = torch.randn(48)
    (phi[1] * w).sum().backward()
    th1 = theta[1:].detach().clone().requires_grad_()
    ref = ref_T.transform_grid(torch.linspace(0, 1, 48), th1)
    (ref[0] * w).sum().backward()
    assert torch.allclose(phi[1], ref[0], atol=1e-5)
    assert torch.allclose(theta.grad[1], th1.grad[0], atol=1e-5) and theta.grad[1].abs().sum() > 0
    warped = warp_signal(S, phi)
    assert warped.shape == (2, 48) and (warped - S).abs().max() > 1e-2


def test_svd_cache_and_warped_delta():
    torch.manual_seed(0)
    W = torch.randn(24, 8)
    svd = FrozenSVD(3)
    U, S, Vh = svd.factors(W)
    assert torch.allclose((U * S[:, None, :]) @ Vh, W.view(3, 8, 8), atol=1e-5)
    assert svd.factors(W)[0] is U  # cached
    with torch.no_grad():
        W.mul_(2)  # an in-place change recomputes
    assert torch.allclose(svd.factors(W)[1], 2 * S)
    delta = svd_warped_delta(W, svd, CPAB1D(4), torch.zeros(2, 3))
    assert delta.shape == (2, 24, 8) and torch.equal(delta, torch.zeros_like(delta))


# ---------------------------------------------------------------- DiTASK


def test_ditask_theta_zero_reproduces_frozen_layer_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 48)
    layer = DiTASKLinear(base, 8, tasks=["a", "b"], task_r=4, dropout=0.05, chunks=3, init="zero").eval()
    x = torch.randn(5, 7, 16)
    assert torch.equal(layer(x), base(x))
    with stream_layout(StreamLayout((SHARED, "a", "b"), 5)):  # shared + task streams: each its own input
        xs = torch.randn(15, 7, 16)
        assert torch.allclose(layer(xs), base(xs), atol=1e-6)
    with torch.no_grad():
        layer.theta.theta.uniform_(-0.5, 0.5)
    assert not torch.allclose(layer(x), base(x), atol=1e-3)  # a nonzero θ changes the layer
    # the warped weight keeps the singular vectors: W' = U diag(S') Vᵀ with S' = S∘φ
    U, S, Vh = torch.linalg.svd(base.weight.detach().view(3, 16, 16))
    Wp = layer.shared_weight().detach().view(3, 16, 16)
    Sp = torch.linalg.svdvals(Wp)
    S_warp = (U.transpose(1, 2) @ Wp @ Vh.transpose(1, 2)).diagonal(dim1=1, dim2=2)
    assert torch.allclose(torch.sort(S_warp, descending=True).values, Sp, atol=1e-4)


def test_ditask_model_theta_zero_equals_frozen_backbone_and_every_theta_gets_a_gradient():
    torch.manual_seed(0)
    model = build("ditask", {"init": "zero"}).eval()
    ref = create_backbone("swin_embedded", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.encode(x)
        plain = ref(x)
    for t in model.task_names:
        for f, g in zip(feats[t], plain):
            assert torch.allclose(f, g, atol=1e-5)
    model.train()
    loss = sum((o - 0.5).pow(2).mean() for o in model(x).values())
    loss.backward()
    thetas = [p for p in model.parameters() if model.param_category(p)[0] == "method"]
    assert len(thetas) == 8 * 4 + 4 * 3 * 4  # shared θ per layer; task θ in proj/fc1/fc2 of 4 last blocks
    final = model.backbone.blocks(3)[1]  # its shared stream feeds no decoder (as MTLoRA's and the official code)
    unused = {id(layer.theta.theta) for layer in (final.attn.proj, final.mlp.fc1, final.mlp.fc2)}
    assert all(p.grad is None or not p.grad.any() for p in thetas if id(p) in unused)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in thetas if id(p) not in unused)
    with torch.no_grad():
        model.backbone.blocks(0)[0].mlp.fc1.theta.theta.uniform_(-0.5, 0.5)
    model.eval()
    with torch.no_grad():  # a nonzero θ moves the features away from the frozen model
        assert not torch.allclose(model.encode(x)["sal"][0], plain[0], atol=1e-3)


def test_ditask_task_theta_only_in_last_block_per_stage():
    model = build("ditask")
    for i in range(model.backbone.num_stages):
        blocks = model.backbone.blocks(i)
        for j, block in enumerate(blocks):
            last = j == len(blocks) - 1
            assert block.attn.qkv.task_names == [] and block.attn.qkv.svd.chunks == 3
            for layer in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                assert layer.task_names == ([t.name for t in TASKS] if last else [])
                assert layer.theta.theta.numel() == 63
                if last:
                    assert layer.task_theta.stacked("theta", ["sal"]).shape == (1, 3)


@pytest.mark.parametrize("name", ["vmt_adapter_lite"])  # the others: tests/test_core.py
def test_only_declared_parameters_change_and_method_params_train(name):
    torch.manual_seed(0)
    model = build(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        loss = sum((o - 0.5).pow(2).mean() for o in model(x).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    method = {n for n, p in model.named_parameters() if model.param_category(p)[0] == "method"}
    assert changed <= trainable
    assert method <= changed, f"method parameters that did not train: {sorted(method - changed)[:5]}"


# ---------------------------------------------------------------- VMT-Adapter


def _count_backbone_rows(model, x):
    """Rows (tokens) entering every block's qkv and fc1 in one forward."""
    rows = []
    hooks = []
    for i in range(model.backbone.num_stages):
        for block in model.backbone.blocks(i):
            for mod in (block.attn.qkv, block.mlp.fc1):
                hooks.append(mod.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[:-1].numel())))
    with torch.no_grad():
        feats = model.encode(x)
    for h in hooks:
        h.remove()
    return rows, feats


def test_vmt_adapter_backbone_runs_once_whatever_the_number_of_tasks():
    x = torch.randn(3, 3, 64, 64)
    counts = {}
    for T in (2, 4):
        torch.manual_seed(0)
        model = build("vmt_adapter", tasks=TASKS[:T]).eval()
        rows, feats = _count_backbone_rows(model, x)
        counts[T] = rows
        assert set(feats) == {t.name for t in TASKS[:T]}
    assert counts[2] == counts[4]
    # one pass over 3 images: 64/4 = 16x16 tokens in stage 0, 8x8, 4x4, 2x2 after
    assert counts[2] == [3 * n for n in (256,) * 4 + (64,) * 4 + (16,) * 4 + (4,) * 4]
    mtlora_rows, _ = _count_backbone_rows(build("mtlora", tasks=TASKS[:4]).eval(), x)
    assert sum(mtlora_rows) > sum(counts[4])  # MTLoRA's task blocks run the MLP per task


def test_vmt_adapter_task_features_generic_at_init_then_specific():
    torch.manual_seed(0)
    model = build("vmt_adapter").eval()
    ref = create_backbone("swin_embedded", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.encode(x)
        plain = ref(x)
    for t in model.task_names:  # W_up = 0, γ = 1, β = 0: the frozen backbone
        assert all(torch.allclose(f, g, atol=1e-5) for f, g in zip(feats[t], plain))
    ext = model.extensions_at(1, 0)[0]  # a non-final block: its extraction reaches the stage's task features
    with torch.no_grad():
        torch.nn.init.normal_(ext.up.weight, std=0.1)
        ext.extract.module_for("sal").gamma.fill_(3.0)
        feats = model.encode(x)
    assert torch.allclose(feats["semseg"][1], feats["normals"][1], atol=1e-6)
    assert not torch.allclose(feats["sal"][1], feats["semseg"][1], atol=1e-3)
    assert torch.allclose(feats["sal"][0], feats["semseg"][0], atol=1e-6)  # stage 0 untouched


def test_vmt_adapter_lite_ties_projections():
    model = build("vmt_adapter_lite")
    ext = model.extensions_at(0, 0)[0]
    assert not hasattr(ext, "up") and ext.down.weight.shape == (8, 32)
    pb = count_params(model)
    dims = [32, 32, 64, 64, 128, 128, 256, 256]
    assert pb.method == sum(c * c // 4 + c // 4 + c + 2 * 4 * c for c in dims)


def test_fork_needs_shared_only_layout():
    model = build("vmt_adapter")
    block = model.backbone.blocks(0)[0]
    ctx = BlockContext(0, 0, 2, block, StreamLayout((SHARED, "semseg"), 2), model)
    with pytest.raises(MtbenchError, match="fork needs the shared stream alone"):
        ctx.fork(torch.zeros(2, 4, 4, 8), torch.zeros(8, 4, 4, 8))
    ctx = BlockContext(0, 0, 2, block, StreamLayout((SHARED,), 2), model)
    with pytest.raises(MtbenchError, match="task rows"):
        ctx.fork(torch.zeros(2, 4, 4, 8), torch.zeros(6, 4, 4, 8))


# ---------------------------------------------------------------- counts in the papers' setting


def test_paper_setting_counts():
    tasks = resolve_tasks("pascal_context")
    pb = count_params(build("ditask", {"qkv_task_theta": True}, tasks, "swin_tiny_patch4_window7_224"))
    assert pb.trainable == 3_549_482  # the official code's count
    assert pb.method == 63 * 4 * 12 + 3 * 3 * 4 * 4 + 3 * 12 * 4
    encoder_side = pb.method + sum(pb.backbone_unfrozen.values())
    assert encoder_side == 1_602_858  # the paper's 1.61M counts no decoder
    pb = count_params(build("vmt_adapter", None, tasks, "swin_tiny_patch4_window7_224"))
    assert pb.method == 1_119_120 and pb.trainable == 1_119_120 + 1_946_624 and pb.backbone_unfrozen == {}
