"""The PEFT baselines of Table 1 (adapter, vl_adapter, bitfit, compacter(_pp), vpt_shallow/deep, lora) in both
multi-task conventions: structural freezing, task isolation when dedicated, one backbone call per batch, VPT's padded
bias/mask, the PHM layer, and the #TP the papers print on the old benchmark's decoder."""

from __future__ import annotations

import pytest
import torch
from cli_entry import mtbench, mtbench_many

import mtbench.swin as swin
from mtbench.adapters import PHMLinear, PHMRule, bottleneck_width
from mtbench.config import MethodSpec
from mtbench.encoder import BlockContext, run_block
from mtbench.errors import MtbenchError
from mtbench.measure import count_params
from mtbench.registry import build_model, resolve_spec
from mtbench.streams import SHARED, StreamLayout
from mtbench.swin import create_backbone
from mtbench.tasks import TaskSpec

TASKS = [TaskSpec("semseg", 5, 1.0), TaskSpec("sal", 1, 5.0), TaskSpec("normals", 3, 10.0)]
NAMES = [t.name for t in TASKS]
METHODS = ["adapter", "bitfit", "compacter", "compacter_pp", "vpt_shallow", "vpt_deep", "lora"]
CASES = [(m, s) for m in METHODS for s in ("shared", "dedicated")]


def build(name: str, share: str, **opts):
    torch.manual_seed(0)
    rm = resolve_spec(MethodSpec(name, {"share": share, **{k: str(v) for k, v in opts.items()}}))
    return build_model(rm, create_backbone("swin_embedded", pretrained=True), TASKS)


def _loss(out):
    return sum((o - 0.3).pow(2).mean() for o in out.values())


@pytest.mark.parametrize("name,share", CASES)
def test_only_declared_parameters_change(name, share):
    model = build(name, share).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        opt.zero_grad()
        _loss(model(x)).backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable, sorted(changed - trainable)[:5]
    method_ids = model._method_param_ids
    method_names = {n for n, p in model.named_parameters() if id(p) in method_ids}
    assert method_names and method_names <= changed, sorted(method_names - changed)[:5]
    pb = count_params(model)
    assert pb.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)  # #TP by its definition
    assert pb.method == sum(p.numel() for n, p in model.named_parameters() if n in method_names)


def _task_params(model, task):
    return [p for n, p in model.named_parameters() if task in n.split(".") and p.requires_grad
            and not n.startswith("decoders.")]


@pytest.mark.parametrize("name", METHODS)
def test_dedicated_task_isolated_from_other_tasks_modules(name):
    model = build(name, "dedicated").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        params = _task_params(model, "sal")
        assert params, "no per-task module for sal"
        for p in params:
            p.add_(torch.randn_like(p) * 0.5)
        out = model(x)
    for t in NAMES:
        if t == "sal":
            assert not torch.allclose(out[t], ref[t], atol=1e-4), "sal's own modules had no effect"
        else:
            assert torch.allclose(out[t], ref[t], atol=1e-6), f"{t} changed when sal's modules were perturbed"


@pytest.mark.parametrize("name,share", CASES)
def test_backbone_runs_once_per_batch(name, share):
    """Every block's qkv runs once per forward; shared: on B images' windows, dedicated: T streams stacked."""
    model = build(name, share).eval()
    bb = model.backbone
    rows, embeds = [], []
    hooks = [bb.patch_embed.register_forward_pre_hook(lambda m, a: embeds.append(a[0].shape[0]))]
    for i in range(bb.num_stages):
        for block in bb.blocks(i):
            hooks.append(block.attn.qkv.register_forward_pre_hook(
                lambda m, a, i=i: rows.append((i, a[0].shape[0]))))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    for h in hooks:
        h.remove()
    streams = len(TASKS) if share == "dedicated" else 1
    windows = [16, 4, 1, 1]  # 64x64, patch 4, window 4: 4x4, 2x2, 1x1, 1x1 windows
    assert rows == [(i, streams * 2 * windows[i]) for i in range(bb.num_stages) for _ in bb.blocks(i)]
    assert len(embeds) == 1


@pytest.mark.parametrize("share", ["shared", "dedicated"])
def test_identity_at_init_where_the_method_starts_from_the_backbone(share):
    """BitFit's copies and LoRA's zero B leave the frozen backbone's features unchanged at init."""
    x = torch.randn(2, 3, 64, 64)
    plain = create_backbone("swin_embedded", pretrained=True).eval()(x)
    for name in ("bitfit", "lora"):
        model = build(name, share).eval()
        with torch.no_grad():
            feats = model.encode(x)
        for t in NAMES:
            for a, b in zip(feats[t], plain):
                assert (a - b).abs().max() < 1e-5, (name, t)


@pytest.mark.parametrize("stage,index", [(0, 0), (0, 1), (1, 1)])
def test_vpt_masked_prompts_leave_patch_tokens_as_the_unprompted_block(stage, index, monkeypatch):
    """With the prompt columns masked out of every patch row, the padded rel-pos bias and shift mask give the patch
    tokens exactly the unprompted (timm) block's output; unmasked, the prompts do change them."""
    model = build("vpt_shallow", "shared").eval()
    bb = model.backbone
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = bb.embed(x)
        for i in range(stage):
            for b in bb.blocks(i):
                feats = b(feats)
            feats = bb.tap(i, feats)
        for b in list(bb.blocks(stage))[:index]:
            feats = b(feats)
    block = bb.blocks(stage)[index]
    assert any(block.shift_size) == (index == 1)
    P = 5
    prompts = torch.randn(2, P, block.dim)
    ctx = BlockContext(stage, index, 2, block, StreamLayout((SHARED,), 2), model=model, prompts=prompts)
    with torch.no_grad():
        ref = block(feats)
        free, _ = run_block(block, feats, ctx, [], split=False)
    assert not torch.allclose(free, ref, atol=1e-3)

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def masked(q, k, v, attn_mask=None, dropout_p=0.0):
        m = attn_mask.expand(q.shape[0], q.shape[1], -1, -1).clone()
        m[..., P:, :P] = float("-inf")
        return sdpa(q, k, v, attn_mask=m, dropout_p=dropout_p)

    monkeypatch.setattr(swin.F, "scaled_dot_product_attention", masked)
    ctx = BlockContext(stage, index, 2, block, StreamLayout((SHARED,), 2), model=model, prompts=prompts)
    with torch.no_grad():
        hidden, _ = run_block(block, feats, ctx, [], split=False)
    assert (hidden - ref).abs().max() < 1e-5


def test_phm_layer_equals_the_dense_matrix_it_factorises():
    torch.manual_seed(0)
    rule = PHMRule(n=4, init_range=1.0)
    layer = PHMLinear(8, 12, rule)
    torch.nn.init.normal_(layer.bias)
    n, p, q = 4, 2, 3
    dense = torch.zeros(8, 12)
    for i in range(n):  # W = sum_i A_i ⊗ (s_i t_iᵀ), block (a, b) of W is A_i[a, b] * s_i t_iᵀ
        B_i = layer.left[i] @ layer.right[i]  # [p, q], rank 1
        assert torch.linalg.matrix_rank(B_i) == 1
        for a in range(n):
            for b in range(n):
                dense[a * p:(a + 1) * p, b * q:(b + 1) * q] += rule.rule[i, a, b] * B_i
    kron = sum(torch.kron(rule.rule[i], layer.left[i] @ layer.right[i]) for i in range(n))
    assert torch.allclose(dense, kron, atol=1e-6)
    assert torch.allclose(layer.weight(), dense, atol=1e-6)
    x = torch.randn(5, 8)
    assert torch.allclose(layer(x), x @ dense + layer.bias, atol=1e-5)
    assert sum(p.numel() for p in layer.parameters()) == 8 + 12 + 12  # rank-1 factors + bias; the rule is shared
    with pytest.raises(MtbenchError, match="divisible by n=4"):
        PHMLinear(6, 12, rule)


def test_shared_phm_rule_is_one_parameter_for_the_whole_model():
    model = build("compacter", "dedicated")
    rules = {id(m.phm_rule) for m in model.modules() if isinstance(m, PHMLinear)}
    assert rules == {id(model.phm_rule)}
    assert sum(1 for m in model.modules() if isinstance(m, PHMLinear)) == 2 * 2 * 8 * len(TASKS)


def test_deep_prompts_are_per_block_and_per_task():
    model = build("vpt_deep", "dedicated")
    shallow = build("vpt_shallow", "dedicated")
    dims = sum(b.dim for i in range(4) for b in model.backbone.blocks(i))
    extra = count_params(model).method - count_params(shallow).method
    assert extra == len(TASKS) * 50 * (dims - model.backbone.stage_dims[0])
    assert count_params(shallow).method == len(TASKS) * 50 * model.backbone.stage_dims[0]


def test_polyhistor_decoder_and_table1_counts():
    """The old benchmark's decoder (2,546,840 for PASCAL's 4 tasks) and the rows it reproduces (hand-computed in
    the method docstrings)."""
    from mtbench.tasks import resolve_tasks

    tasks = resolve_tasks("pascal_context")
    expected = {("decoder_only", ()): 2_546_840, ("adapter", ("share", "dedicated")): 11_240_216,
                ("vpt_deep", ("share", "dedicated")): 3_430_040}
    for (name, opt), n in expected.items():
        rm = resolve_spec(MethodSpec(name, dict([opt]) if opt else {}))
        model = build_model(rm, create_backbone("swin_tiny_patch4_window7_224"), tasks, decoder="polyhistor_hrnet")
        assert count_params(model).trainable == n, name
        del model


def test_bad_share_is_a_one_line_cli_error(tmp_path):
    r = mtbench("run", "--methods", "adapter:share=both", "--results-dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: adapter: share='both' is not one of shared, dedicated"]
    assert "Traceback" not in r.stderr + r.stdout
    assert not any(tmp_path.iterdir())


def test_bottleneck_width_is_c_over_reduction_never_clamped():
    """``C // reduction`` floors (97 // 4 = 24); 0 is refused with the largest accepted value, not clamped to 1."""
    assert [bottleneck_width(c, 4, "adapter") for c in (96, 97, 4)] == [24, 24, 1]
    with pytest.raises(MtbenchError, match=r"^hyperformer: bottleneck C // reduction_factor is 0 for C=32 with "
                                           r"reduction_factor=33; accepted: reduction_factor <= 32$"):
        bottleneck_width(32, 33, "hyperformer", "reduction_factor")


def test_bottleneck_below_one_is_a_one_line_cli_error_for_every_adapter_method(tmp_path):
    """The embedded Swin's smallest stage is C=32: every adapter-based method refuses a reduction above 32 the same
    way (HyperFormer, Polyhistor and VMT-Adapter clamped it to 1 before), and builds at 32 (bottleneck 1)."""
    cases = [("adapter", "reduction"), ("vmt_adapter", "reduction"), ("hyperformer", "reduction_factor"),
             ("polyhistor", "reduction_factor"), ("polyhistor_lite", "reduction_factor")]
    runs = mtbench_many(*(["run", "--methods", f"{m}:{k}=33", "--results-dir", str(tmp_path)] for m, k in cases))
    for (method, key), r in zip(cases, runs, strict=True):
        name = method.removesuffix("_lite")
        assert r.returncode == 2, (method, r.stderr)
        assert r.stderr.strip().splitlines() == [
            f"error: {name}: bottleneck C // {key} is 0 for C=32 with {key}=33; accepted: {key} <= 32"], r.stderr
    for method, key in cases:
        n = {red: count_params(build_model(resolve_spec(MethodSpec(method, {key: str(red)})),
                                           create_backbone("swin_embedded"), TASKS)).trainable for red in (16, 32)}
        assert n[32] < n[16], (method, n)  # the width-1 bottleneck at C=32 builds, and is narrower than width 2


def test_params_on_the_old_decoder_through_the_cli():
    r = mtbench("params", "--methods", "bitfit", "--decoder", "polyhistor_hrnet",
                env={**__import__("os").environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    for needle in ["decoder polyhistor_hrnet", "2,845,952", "2,621,618", "BitFit(ded.)", "BitFit(sha.)"]:
        assert needle in r.stdout, needle
    assert "✘" not in r.stdout
