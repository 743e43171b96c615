"""Hypernetwork building block (mtbench/hypernet.py) and the methods built on it: HyperFormer(++), Polyhistor(-Lite)."""

from __future__ import annotations

import pytest
import torch
from cli_entry import mtbench
from torch.nn import functional as F

from mtbench.config import MethodSpec
from mtbench.errors import MtbenchError
from mtbench.hypernet import HyperNetwork, TaskEmbeddings, stream_layer_norm, stream_linear
from mtbench.measure import count_params
from mtbench.registry import build_model, resolve_spec
from mtbench.streams import SHARED, StreamLayout, stream_layout
from mtbench.swin import create_backbone
from mtbench.tasks import TaskSpec, resolve_tasks

TASKS = [TaskSpec("semseg", 5, 1.0), TaskSpec("sal", 1, 5.0), TaskSpec("normals", 3, 10.0)]
NAMES = [t.name for t in TASKS]
VARIANTS = ["hyperformer", "hyperformer_pp", "polyhistor", "polyhistor_lite"]


def build(name, tasks=TASKS, backbone="swin_embedded"):
    torch.manual_seed(0)
    return build_model(resolve_spec(MethodSpec(name, {})), create_backbone(backbone), tasks)


def test_hypernetwork_outputs_differ_per_task_and_layer_and_get_gradients():
    torch.manual_seed(0)
    hn = HyperNetwork(TaskEmbeddings(NAMES, 8), num_layers=3, heads={"w": (4, 5), "b": (4,)}, hidden=16, proj_dim=8)
    out0, out1 = hn(0), hn(1)
    assert out0["w"].shape == (3, 4, 5) and out0["b"].shape == (3, 4)
    for t in range(3):  # every task differs from every other, and each task's weights differ between layers
        assert not torch.allclose(out0["w"][t], out1["w"][t])
        for u in range(t + 1, 3):
            assert not torch.allclose(out0["w"][t], out0["w"][u])
    (out0["w"].sum() + out1["b"].pow(2).sum()).backward()
    for name, p in hn.named_parameters():
        if name == "layer_embeddings.weight":  # only the rows of the layers used get gradients
            assert p.grad[:2].abs().sum() > 0 and p.grad[2].abs().sum() == 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_hypernetwork_position_embedding_and_errors():
    torch.manual_seed(0)
    hn = HyperNetwork(TaskEmbeddings(NAMES, 8), num_layers=2, heads={"w": (3,)}, hidden=16, proj_dim=8,
                      num_positions=2)
    assert not torch.allclose(hn(0, 0)["w"], hn(0, 1)["w"])
    with pytest.raises(MtbenchError, match="position"):
        hn(0)
    with pytest.raises(MtbenchError, match="layer 2 out of range"):
        hn(2, 0)


def test_stream_linear_and_layer_norm_equal_per_task_loops():
    torch.manual_seed(0)
    x = torch.randn(3 * 2, 4, 4, 6)  # three task streams of 2 images, NHWC
    w, b = torch.randn(3, 5, 6), torch.randn(3, 5)
    gamma, beta = torch.randn(3, 6), torch.randn(3, 6)
    for order in (NAMES, NAMES[::-1]):
        layout = StreamLayout(tuple(order), 2)
        with stream_layout(layout):
            y = stream_linear(x, w, b, NAMES)
            z = stream_layer_norm(x, gamma, beta, NAMES)
        for s, name in enumerate(order):
            t = NAMES.index(name)
            rows = slice(2 * s, 2 * s + 2)
            assert torch.allclose(y[rows], F.linear(x[rows], w[t], b[t]), atol=1e-5)
            assert torch.allclose(z[rows], F.layer_norm(x[rows], (6,), gamma[t], beta[t]), atol=1e-5)
    with stream_layout(StreamLayout((SHARED, *NAMES), 2)), pytest.raises(MtbenchError, match="no generated weights"):
        stream_linear(torch.randn(8, 6), w, b, NAMES)
    with pytest.raises(MtbenchError, match="outside the encoder"):
        stream_linear(x, w, b, NAMES)


@pytest.mark.parametrize("name", VARIANTS)
def test_generated_adapters_differ_per_task_and_layer(name):
    model = build(name)
    ext0 = model.extensions_at(0, 0)[0]
    ext1 = model.extensions_at(0, 1)[0]
    if name.startswith("polyhistor"):
        w0, w1 = ext0.weight("attn", "down"), ext1.weight("attn", "down")
    else:  # the adapters each block applies: its stream output for a zero input is ``LN_t(U_t GeLU(D_t 0))``
        y = torch.zeros(len(NAMES), 1, 1, 32)
        with stream_layout(StreamLayout(tuple(NAMES), 1)):
            w0, w1 = ext0.adapt(y, 0), ext1.adapt(y, 0)
    T = len(NAMES)
    assert w0.shape[0] == T
    for t in range(T):
        assert not torch.allclose(w0[t], w1[t])  # block 0 and block 1 of the stage get different adapters
        for u in range(t + 1, T):
            assert not torch.allclose(w0[t], w0[u])
    # the task streams carry different features (one backbone call, task-specific adapters)
    feats = model.eval().encode(torch.randn(1, 3, 64, 64))
    assert not torch.allclose(feats["semseg"][-1], feats["sal"][-1])


@pytest.mark.parametrize("name", VARIANTS)
def test_only_declared_parameters_change_and_hypernetwork_trains(name):
    model = build(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = sum((o - 0.5).pow(2).mean() for o in model(torch.randn(1, 3, 64, 64)).values())
    loss.backward()
    opt.step()  # one AdamW step moves every parameter with a nonzero gradient
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    hyper = [n for n in trainable if "heads." in n or "task_embeddings" in n or "projector" in n]
    assert hyper and set(hyper) <= changed
    frozen_weights = [n for n, p in model.backbone.named_parameters() if model.backbone.role_of(p) == "weight"]
    assert frozen_weights and not any(p.requires_grad for n, p in model.backbone.named_parameters()
                                      if n in frozen_weights)


def test_hyperformer_adapter_equals_hand_computation():
    model = build("hyperformer")
    ext = model.extensions_at(1, 1)[0]  # the second block of stage 1: its layer embedding is layer 1's
    y = torch.randn(len(NAMES) * 2, 4, 4, 64)
    with stream_layout(StreamLayout(tuple(NAMES), 2)):
        out = ext.adapt(y, 1)
    g = model.hypernets[1](1)
    for t in range(len(NAMES)):
        rows = y[2 * t:2 * t + 2]
        z = F.linear(F.gelu(F.linear(rows, g["mlp_down"][t], g["mlp_down_bias"][t]), approximate="tanh"),
                     g["mlp_up"][t], g["mlp_up_bias"][t])
        ref = F.layer_norm(z, (64,), g["mlp_ln_weight"][t], g["mlp_ln_bias"][t]) + rows
        assert torch.allclose(out[2 * t:2 * t + 2], ref, atol=1e-5)
    assert g["mlp_down"].shape == (3, 2, 64)  # bottleneck 64 // 32


def test_polyhistor_lite_weight_is_kronecker_of_template_and_scaling_kernel():
    model = build("polyhistor_lite")
    ext = model.extensions_at(2, 1)[0]  # stage width 128 = 4 x 32: n = 4
    with torch.no_grad():
        ext.scaling["mlp_up"].normal_()
    w = ext.weight("mlp", "up")
    names = ["mlp_up_A", "mlp_up_B"]
    g = ext._hypernet[0](ext.layer, names=names)
    template = g[names[0]] @ g[names[1]].transpose(1, 2)
    assert template.shape == (3, 32, 8) and w.shape == (3, 128, 32)
    for t in range(3):
        assert torch.allclose(w[t], torch.kron(template[t], ext.scaling["mlp_up"]), atol=1e-6)
    assert ext.layer == 2 * 2 + 1  # global layer index (embedded depths 2, 2, 2, 2)


def test_polyhistor_embedded_counts_closed_form():
    T, k = 3, 14
    dims, depths = [32, 64, 128, 256], [2, 2, 2, 2]
    projector = (2 * 64) * 128 + 128 + 128 * 64 + 64 + 2 * 64  # MLP + LayerNorm
    embeddings = T * 64 + 8 * 64
    biases = sum(dd * T * 2 * (d // 4 + d) for d, dd in zip(dims, depths))
    full_heads = sum(4 * 65 * k * (d + d // 4) for d in dims)
    lite_heads = 4 * 65 * k * (32 + 8)
    scaling = sum(dd * 4 * (d // 32) ** 2 for d, dd in zip(dims, depths))
    assert count_params(build("polyhistor")).method == projector + embeddings + biases + full_heads
    assert count_params(build("polyhistor_lite")).method == projector + embeddings + biases + lite_heads + scaling


@pytest.mark.slow
def test_swin_t_counts():
    tasks = resolve_tasks("pascal_context")
    want = {"hyperformer": 9_002_522, "hyperformer_pp": 5_569_677, "polyhistor": 8_568_704,
            "polyhistor_lite": 2_454_440}
    for name, n in want.items():
        assert count_params(build(name, tasks, "swin_tiny_patch4_window7_224")).trainable == n


@pytest.mark.parametrize("spec,message", [
    ("polyhistor:rank=0", "polyhistor: rank must be > 0, got 0"),
    ("hyperformer_pp:reduction_factor=-2", "hyperformer: reduction_factor must be > 0, got -2"),
])
def test_bad_options_are_one_line_exit_2(tmp_path, spec, message):
    res = mtbench("run", "--methods", spec, "--results-dir", str(tmp_path), timeout=300)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0] == f"error: {message}", res.stderr
    assert not any(tmp_path.iterdir())
