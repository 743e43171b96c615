"""TDSS (methods/tdss.py): TDSA per-task parameters, the gradient-free frozen backbone, the lateral path, ablations."""

from __future__ import annotations

import pytest
import torch
from cli_entry import mtbench

from methods.tdss import TDSA, SkillGate
from mtbench.config import MethodSpec
from mtbench.measure import count_params
from mtbench.registry import build_model, resolve_spec
from mtbench.swin import create_backbone
from mtbench.tasks import resolve_tasks


def _build(opts=None, tasks=None, decoder=None):
    torch.manual_seed(0)
    specs = resolve_tasks("synthetic", tasks)
    return build_model(resolve_spec(MethodSpec("tdss", opts or {})), create_backbone("swin_embedded"), specs,
                       decoder=decoder)


def _tdsas(model):
    return [m for m in model.modules() if isinstance(m, TDSA)]


def test_tdsa_per_task_parameters_are_only_the_gates():
    two, four = _build(tasks=["semseg", "sal"]), _build()
    assert len(_tdsas(four)) == 2 * 8  # attention + FFN of each of the 8 blocks
    for tdsa in _tdsas(four):
        per_task = {n for n, _ in tdsa.named_parameters() if n.startswith("gates.per_task.")}
        assert {n.split(".", 3)[3] for n in per_task} == {"gamma.weight", "beta.weight"}
        assert all(isinstance(tdsa.gates.module_for(t), SkillGate) for t in four.task_names)
        assert {n for n, _ in tdsa.named_parameters()} - per_task == {"down.weight", "down.bias", "up.weight",
                                                                      "up.bias", "skills"}
    # two more tasks add exactly 2 x (W_gamma, W_beta) [R, M] per TDSA to the method's parameters
    grow = sum(2 * 2 * t.down.out_features * t.skills.shape[0] for t in _tdsas(four))
    assert count_params(four).method - count_params(two).method == grow


def test_no_backbone_activation_requires_grad():
    model = _build()
    model.train()
    bb = model.backbone
    assert not any(p.requires_grad for p in bb.parameters())
    seen = []
    merges = {id(m) for s in bb.stages if hasattr(s, "downsample") for m in s.downsample.modules()}

    def hook(mod, inp, out):
        if id(mod) in merges and inp[0].requires_grad:
            return  # the frozen PatchMerging applied to the task lateral features (the lateral path)
        seen.append((type(mod).__name__, out.requires_grad if torch.is_tensor(out) else False))
        assert not any(torch.is_tensor(a) and a.requires_grad for a in inp)

    handles = [m.register_forward_hook(hook) for m in bb.modules() if m is not bb]
    lateral = []
    handles += [t.register_forward_hook(lambda m, i, o: lateral.append(o.requires_grad)) for t in _tdsas(model)]
    preds = model(torch.randn(2, 3, 64, 64))
    for h in handles:
        h.remove()
    assert len(seen) > 50 and not any(rg for _, rg in seen)
    assert lateral and all(lateral)
    sum(p.float().mean() for p in preds.values()).backward()
    assert all(t.up.weight.grad is not None and t.up.weight.grad.abs().sum() > 0 for t in _tdsas(model))
    assert all(p.grad is None for p in bb.parameters())


def test_lateral_features_start_as_the_backbone_and_differ_by_task():
    model = _build().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model.backbone(x)
        feats = model.encode(x)
    for t in model.task_names:  # W_u = 0 at init: every task's features are the backbone's
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(feats[t], plain))
    for tdsa in _tdsas(model):
        torch.nn.init.normal_(tdsa.up.weight, std=0.05)
    with torch.no_grad():
        feats = model.encode(x)
    assert not torch.allclose(feats["semseg"][3], feats["sal"][3], atol=1e-4)
    assert not torch.allclose(feats["semseg"][0], plain[0], atol=1e-4)


def test_tdsa_equations_by_hand():
    torch.manual_seed(0)
    tdsa = TDSA(6, 3, ["a", "b"], skills=4)
    torch.nn.init.normal_(tdsa.up.weight)
    x = torch.randn(1, 2, 2, 6)
    out = tdsa(x).view(2, 1, 2, 2, 6)
    h = tdsa.down(x)
    for i, t in enumerate(["a", "b"]):
        g = tdsa.gates.module_for(t)
        gamma = torch.softmax(h @ g.gamma.weight.T, -1) @ tdsa.skills  # Eq. 3-5
        beta = torch.softmax(h @ g.beta.weight.T, -1) @ tdsa.skills
        expected = tdsa.up(torch.nn.functional.gelu(gamma * h + beta))  # Eq. 6-7
        assert torch.allclose(out[i], expected, atol=1e-6)


def test_ablation_options_change_the_right_parameters():
    base = count_params(_build()).method
    tdsas = _tdsas(_build())
    skills_and_gates = sum(t.skills.numel() + sum(p.numel() for p in t.gates.parameters()) for t in tdsas)
    assert count_params(_build({"sre": "false"})).method == base - skills_and_gates
    assert count_params(_build({"gating": "false"})).method == base - sum(
        sum(p.numel() for p in t.gates.parameters()) for t in tdsas)
    assert count_params(_build({"insert": "attn"})).method == base // 2
    assert len(_build({"layers": "2"}).interaction.layers) == 2
    model = _build({"sre": "false"}).eval()
    with torch.no_grad():
        preds = model(torch.randn(1, 3, 64, 64))
    assert set(preds) == set(model.task_names)


def test_paper_setting_count():
    specs = resolve_tasks("pascal_context")
    model = build_model(resolve_spec(MethodSpec("tdss", {})), create_backbone("swin_tiny_patch4_window7_224"), specs)
    pb = count_params(model)
    assert pb.method == 2_366_304 and pb.trainable == 3_316_224 and pb.backbone_unfrozen == {}


def test_other_decoder_replaces_tsai():
    assert _build(decoder="hrnet_270").decoder_name == "hrnet_270"


@pytest.mark.slow
def test_params_command_shows_tdss_beside_the_paper():
    res = mtbench("params", "--methods", "tdss", timeout=600)
    assert res.returncode == 0, res.stderr
    assert "3,316,224" in res.stdout and "3.52" in res.stdout and "decoder tsai" in res.stdout
