"""TADFormer (methods/tadformer.py): parameter counts of the papers' setting and behaviour on the embedded backbone."""

from __future__ import annotations

import functools
import pytest
import torch
import torch.nn.functional as F

from mtbench.config import MethodSpec, parse_method_specs
from mtbench.errors import MtbenchError
from mtbench.measure import count_params
from mtbench.registry import build_model, resolve, resolve_spec
from mtbench.swin import create_backbone, prompted_block
from mtbench.tasks import resolve_tasks
from methods.tadformer import DynamicTaskFilter, StageGate, StaticTaskFilters, per_sample_depthwise

TASKS = resolve_tasks("synthetic")
NAMES = [t.name for t in TASKS]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spin-waiting under
    # oversubscription multiplies the run time (36 s vs 200 s measured). Restored afterwards.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(spec: str, backbone=None):
    rm = resolve_spec(parse_method_specs(spec)[0])
    return build_model(rm, backbone if backbone is not None else create_backbone("swin_embedded"), TASKS)


@functools.lru_cache(maxsize=None)
def _swin_t_count(options: tuple) -> int:
    # Built on the meta device: parameter shapes only, no memory and no init cost (counts need no values).
    with torch.device("meta"):
        backbone = create_backbone("swin_tiny_patch4_window7_224", img_size=448)
        model = build_model(resolve_spec(MethodSpec("tadformer", dict(options))), backbone,
                            resolve_tasks("pascal_context"))
    return count_params(model).trainable


def swin_t_count(options: dict) -> int:
    """#TP of TADFormer with ``options`` on Swin-T 448 / PASCAL-Context's four tasks (the papers' setting)."""
    return _swin_t_count(tuple(sorted(options.items())))


# ------------------------------------------------------------------------------------------------ counts
TABLE1 = {  # (filter, tpc) -> r -> exact #TP on Swin-T 448 / PASCAL-Context (4 tasks)
    ("dtf", "paper"): {16: 3_548_670, 32: 4_767_294, 64: 7_370_430},
    ("dtf", "official"): {16: 3_557_502, 32: 4_776_126, 64: 7_379_262},  # paper Table 1: 3.56 / 4.78 / 7.38
    ("static", "official"): {16: 3_532_350, 32: 4_670_526, 64: 6_946_878},  # released code
}


@pytest.mark.parametrize("key", list(TABLE1))
def test_table1_counts(key):
    filt, tpc = key
    for r, exact in TABLE1[key].items():
        assert swin_t_count({"r": r, "filter": filt, "tpc": tpc}) == exact, (key, r)


def test_registered_paper_counts():
    info, _, _ = resolve("tadformer")
    assert len(info.paper_counts) >= 13
    for pc in info.paper_counts:
        if pc.exact is not None:
            assert swin_t_count(pc.options) == pc.exact, pc
        if pc.millions is not None and pc.exact is not None and round(pc.exact / 1e6, 2) != pc.millions:
            assert pc.note, f"{pc} differs from the paper without a note"


def test_table2_ablation_terms():
    r = 32
    off = {"r": r, "tpc": "official"}
    full = swin_t_count(off)
    base = swin_t_count({"r": r, "prompts": False, "dtf": False})  # tpc has no effect without prompts
    tpc_tp = swin_t_count({**off, "dtf": False})
    dtf = swin_t_count({"r": r, "prompts": False})
    tp_dtf = swin_t_count({**off, "use_tpc": False})
    dtf_term = 12 * (9 * r * r + 27 * r)
    prompt_term = 4 * 96 + 387_072  # prompts + prompt upsampling
    ln_term, gate_term = 8_832, 4
    assert base == 1_946_624 + 70_656 * r + 23_040 + 23_322 + 4_896 == 4_258_874  # paper 4.26
    assert tpc_tp - base == prompt_term + ln_term + gate_term and tpc_tp == 4_655_166  # paper 4.66
    assert dtf - base == dtf_term and dtf == 4_379_834  # paper 4.40 (see note)
    assert tp_dtf == full - gate_term == 4_776_122  # paper 4.78, "same as TADFormer"
    assert full == 4_776_126  # paper 4.78
    # the paper form drops the 12 TPC LayerNorms
    assert swin_t_count({"r": r, "dtf": False}) == tpc_tp - ln_term
    assert swin_t_count({"r": r, "skip": "mean"}) == 4_767_294 - gate_term


# ------------------------------------------------------------------------------------------------ config
def test_config_validation():
    with pytest.raises(MtbenchError, match="^tadformer: r must be > 0, got 0$"):
        build("tadformer:r=0")
    with pytest.raises(MtbenchError, match="filter"):
        resolve_spec(parse_method_specs("tadformer:filter=dynamic")[0])
    with pytest.raises(MtbenchError, match="no option"):
        resolve_spec(parse_method_specs("tadformer:task_r=4")[0])
    cfg = resolve_spec(parse_method_specs("tadformer_official")[0]).config
    assert (cfg.filter, cfg.tpc, cfg.prompt_update) == ("static", "official", "official")
    assert not resolve_spec(parse_method_specs("tadformer:prompts=false")[0]).config.tpc_active


# ------------------------------------------------------------------------------------------------ modules
def test_per_sample_depthwise_matches_conv():
    z, w = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 3, 3)
    ref = torch.stack([F.conv2d(z[b:b + 1], w[b].unsqueeze(1), padding=1, groups=4)[0] for b in range(3)])
    assert torch.allclose(per_sample_depthwise(z, w), ref, atol=1e-5)


def test_dtf_filters_depend_on_input():
    torch.manual_seed(0)
    r = 8
    dtf = DynamicTaskFilter(r)
    assert sum(p.numel() for p in dtf.parameters()) == 9 * r * r + 27 * r
    a, b = torch.randn(1, r, 7, 7), torch.randn(1, r, 7, 7)
    theta = dtf.generate(torch.cat([a, b, a]))
    assert theta.shape == (3, r, 3, 3)
    assert torch.equal(theta[0], theta[2])
    assert not torch.allclose(theta[0], theta[1])
    # FilterNorm: before the affine, each channel's taps have zero mean / unit std
    raw = dtf.generator(a.mean((2, 3))).view(1, r, 9)
    normed = (raw - raw.mean(-1, keepdim=True)) / raw.std(-1, keepdim=True)
    assert torch.allclose(theta[0].reshape(r * 9), normed.reshape(r * 9) * dtf.norm_std + dtf.norm_mean, atol=1e-5)
    out = dtf(torch.cat([a, b]))
    assert torch.allclose(out[:1], per_sample_depthwise(a, theta[:1]), atol=1e-5)


def test_dtf_in_model_is_input_conditioned():
    torch.manual_seed(0)
    model = build("tadformer").eval()
    dtf = model.filters[0]["proj"]  # input: the TPC features of each task, per window
    seen = []
    handle = dtf.register_forward_hook(lambda m, inp, out: seen.append(m.generate(inp[0]).detach()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(torch.cat([x, x[:1]]))
    handle.remove()
    n_windows = (16 // 4) ** 2  # stage 1 of the embedded Swin: 16x16 tokens in 4x4 windows
    theta = seen[0].view(len(NAMES), 3, n_windows, *seen[0].shape[1:])  # task-major windows: [T, B, nW, r, 3, 3]
    assert torch.equal(theta[0, 0], theta[0, 2])  # same image -> same filter
    assert not torch.allclose(theta[0, 0], theta[0, 1])  # different images -> different filters
    assert not torch.allclose(theta[0, 0], theta[1, 0])  # different task inputs (TPC) -> different filters


def test_static_filters_per_task():
    torch.manual_seed(0)
    f = StaticTaskFilters(4, ["a", "b"])
    z = torch.randn(2 * 3, 4, 5, 5)
    out = f(z)
    assert torch.allclose(out[:3], f.module_for("a")(z[:3]), atol=1e-6)
    assert torch.allclose(out[3:], f.module_for("b")(z[3:]), atol=1e-6)
    assert sum(p.numel() for p in f.parameters()) == 2 * 10 * 4


def test_gate_mixes_equally_at_init():
    gate = StageGate()
    assert gate.g.item() == 0.0
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(gate(a, b), 0.5 * a + 0.5 * b)


def test_gate_keeps_one_tensor_for_backward_with_autograds_gradients():
    """Training: the gate keeps ``skip - out`` (and σ(g)) for backward, not both inputs; its output equals the
    formula's bit for bit and its gradients equal autograd's through the formula."""
    gate = StageGate()
    with torch.no_grad():
        gate.g.fill_(0.7)
    skip, out = (torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in (0, 1))
    weight = torch.linspace(-1, 1, 120).view(4, 5, 6)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = gate(skip, out)
    (y * weight).sum().backward()
    got = [t.grad.clone() for t in (skip, out, gate.g)]
    assert sorted(saved) == [1, 120]
    for t in (skip, out, gate.g):
        t.grad = None
    w = torch.sigmoid(gate.g)
    ref = w * skip + (1 - w) * out
    (ref * weight).sum().backward()
    assert torch.equal(y, ref)
    for a, b in zip(got, (skip.grad, out.grad, gate.g.grad)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _task_streams(model, block, x, prompts):
    """Task streams of the last block of stage 0, run by the core (issue 6: was ``model.task_block(...)[2]``)."""
    from mtbench.encoder import BlockContext, run_block
    from mtbench.streams import SHARED, StreamLayout, stream_layout

    ctx = BlockContext(0, 1, 2, block, StreamLayout((SHARED,), x.shape[0]), model, prompts)
    with stream_layout(ctx.layout):
        out, _ = run_block(block, x, ctx, model.extensions_at(0, 1), split=True)
    return out[x.shape[0]:]


def test_gate_in_model():
    torch.manual_seed(0)
    model = build("tadformer").eval()
    assert all(g.g.item() == 0.0 for g in model.gates)
    bb = model.backbone
    x = bb.embed(torch.randn(2, 3, 64, 64))
    prompts = model.task_prompts.unsqueeze(0).expand(2, -1, -1)
    block = bb.blocks(0)[-1]
    outs = {}
    with torch.no_grad():
        for g in (0.0, 60.0, -60.0):
            model.gates[0].g.fill_(g)
            outs[g] = _task_streams(model, block, x, prompts)
    assert torch.allclose(outs[0.0], 0.5 * outs[60.0] + 0.5 * outs[-60.0], atol=1e-5)
    assert not torch.allclose(outs[60.0], outs[-60.0])


@pytest.mark.parametrize("update", ["vpt", "official"])
def test_shared_stream_matches_prompted_block(update):
    torch.manual_seed(0)
    model = build(f"tadformer:prompt_update={update}").eval()
    bb = model.backbone
    x = torch.randn(2, 32, 32, 32)
    prompts = torch.randn(2, len(NAMES), 32)
    block = bb.blocks(0)[-1]
    from mtbench.encoder import BlockContext, run_block
    from mtbench.streams import SHARED, StreamLayout, split_streams, stream_layout

    ctx = BlockContext(0, 1, 2, block, StreamLayout((SHARED,), 2), model, prompts)  # was model.task_block (issue 6)
    with torch.no_grad(), stream_layout(ctx.layout):
        x_ref, p_ref = prompted_block(block, x, prompts, prompt_residual=update == "vpt")
        x_all, p_out = run_block(block, x, ctx, model.extensions_at(0, 1), split=True)
        x_out = split_streams(x_all, ctx.layout.size)[0]
    assert torch.allclose(x_out, x_ref, atol=1e-5)
    assert torch.allclose(p_out, p_ref, atol=1e-5)


def test_baseline_is_shared_lora():
    torch.manual_seed(0)
    model = build("tadformer:prompts=false,dtf=false").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.encode(x)
        ref = model.backbone(x)
    for t in NAMES:
        for a, b in zip(feats[t], ref):
            assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------------ behaviour
def test_prompts_change_every_task_output():
    torch.manual_seed(0)
    model = build("tadformer").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.task_prompts.add_(torch.randn_like(model.task_prompts))
        after = model(x)
    for t in NAMES:
        assert not torch.allclose(before[t], after[t], atol=1e-6), t


def test_task_streams_differ_or_share():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for spec, distinct in (("tadformer", True), ("tadformer:prompts=false", False),
                               ("tadformer:use_tpc=false", False), ("tadformer:filter=static,use_tpc=false", True)):
            model = build(spec).eval()
            for m in model.modules():  # so that the TA-modules' up-projections are not zero
                if hasattr(m, "lora_B"):
                    torch.nn.init.normal_(m.lora_B, std=0.05)
            feats = model.encode(x)
            same = torch.allclose(feats[NAMES[0]][0], feats[NAMES[1]][0])
            assert same != distinct, spec


def test_only_declared_parameters_train():
    torch.manual_seed(0)
    model = build("tadformer").train()
    bb = model.backbone
    trainable = {id(p) for p in model.trainable_parameters()}
    reductions = bb.params_with_roles(("patch_merging",))
    assert reductions and not any(id(p) in trainable for p in reductions)
    frozen_weights = bb.params_with_roles(("weight", "bias"))
    assert not any(id(p) in trainable for p in frozen_weights)
    for p in bb.params_with_roles(("norm", "rel_pos", "patch_embed")):
        assert id(p) in trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(3):
        out = model(x)
        loss = sum(o.pow(2).mean() for o in out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert n not in changed, n
    must = ["task_prompts", "prompt_up.0.weight", "gates.0.g", "filters.0.proj.generator.weight",
            "filters.3.fc2.norm_std", "backbone.stages.0.blocks.0.attn.qkv.lora_A",
            "backbone.stages.2.blocks.1.mlp.fc2.lora_B", f"decoders.{NAMES[0]}.fuse.0.weight"]
    for n in must:
        assert n in changed, n


@pytest.mark.parametrize("spec", ["tadformer", "tadformer_official", "tadformer:prompts=false",
                                  "tadformer:prompts=false,dtf=false", "tadformer:use_tpc=false",
                                  "tadformer:dtf=false,tpc=official", "tadformer:filter=static,use_tpc=false",
                                  "tadformer:skip=mean", "tadformer:skip=none,prompt_update=official"])
def test_forward_backward(spec):
    torch.manual_seed(0)
    model = build(spec).train()
    for batch in (1, 3):  # 3 does not divide the 16 windows of stage 1
        out = model(torch.randn(batch, 3, 64, 64))
        assert set(out) == set(NAMES)
        for t in TASKS:
            assert out[t.name].shape == (batch, t.out_channels, 64, 64)
            assert torch.isfinite(out[t.name]).all()
        sum(o.mean() for o in out.values()).backward()
        grads = [p.grad for p in model.trainable_parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        model.zero_grad()


@pytest.mark.parametrize("spec", ["tadformer", "tadformer_official"])
def test_task_attention_maps(spec):
    torch.manual_seed(0)
    model = build(spec).eval()
    x = torch.randn(3, 3, 64, 64)
    maps = model.task_attention_maps(x)
    assert set(maps) == set(NAMES)
    for m in maps.values():
        assert m.shape == (3, 16, 16) and torch.isfinite(m).all()  # stage 1: 64 px / patch 4
    assert not torch.allclose(maps[NAMES[0]], maps[NAMES[1]])
    assert model.task_attention_maps(x, stage=1)[NAMES[0]].shape == (3, 8, 8)
    assert model._record_stage is None
    if spec == "tadformer":  # softmax rows over prompt + patch columns: the patch part of a window sums to < 1
        block = model.backbone.blocks(0)[-1]  # shifted: undo the map's unshift to find its windows
        ws, shift = block.window_size[0], block.shift_size[0]
        assert shift > 0
        for m in maps.values():
            windows = torch.roll(m, (-shift, -shift), dims=(1, 2)).view(3, 16 // ws, ws, 16 // ws, ws)
            sums = windows.sum(dim=(2, 4))
            assert ((sums > 0.05) & (sums < 1)).all(), sums
    with pytest.raises(MtbenchError):
        model.task_attention_maps(x, stage=7)
    with pytest.raises(MtbenchError, match="prompts"):
        build("tadformer:prompts=false").task_attention_maps(x)
