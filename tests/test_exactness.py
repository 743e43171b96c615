"""Exactness items of issue 6: official dropout semantics, exact p of the CPU dropout, TADFormer's released skip
layout."""

from __future__ import annotations

import torch

from mtbench.config import parse_method_specs
from mtbench.lora import LoRADropout, LoRALinear
from mtbench.registry import build_model, resolve_spec
from mtbench.streams import SHARED, StreamLayout, stream_layout
from mtbench.swin import create_backbone
from mtbench.tasks import TaskSpec

TASKS = [TaskSpec("semseg", 5, 1.0), TaskSpec("sal", 1, 5.0)]


def build(spec):
    torch.manual_seed(0)
    return build_model(resolve_spec(parse_method_specs(spec)[0]), create_backbone("swin_embedded"), TASKS)


def _layer():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(8, 6), r=4, scale=4.0, dropout=0.5, task_ranks={"a": 2})
    for p in layer.lora_parameters():
        torch.nn.init.normal_(p)
    return layer.train()


def test_cpu_dropout_has_exact_p():
    torch.manual_seed(0)
    drop = LoRADropout(0.05).train()
    x = torch.ones(4_000_000)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 5e-4  # 4.5 sigma; the former 8-bit mask dropped 13/256 = 0.0508
    assert torch.allclose(y[y != 0], torch.full((1,), 1 / 0.95))
    assert drop.keep_mask((3, 5), "cpu").dtype == torch.bool


def test_cpu_dropout_masks_follow_torch_seed():
    """The masks are drawn from NumPy's PCG64 seeded by torch's generator: torch.manual_seed fixes them, and
    consecutive masks differ."""
    drop = LoRADropout(0.3).train()
    torch.manual_seed(7)
    a, b = drop.keep_mask((64, 33), "cpu"), drop.keep_mask((64, 33), "cpu")
    torch.manual_seed(7)
    assert torch.equal(drop.keep_mask((64, 33), "cpu"), a) and not torch.equal(a, b)
    state = torch.get_rng_state()
    c = drop.keep_mask((5,), "cpu")
    torch.set_rng_state(state)  # a resumed run restores torch's RNG state and draws the same mask
    assert torch.equal(drop.keep_mask((5,), "cpu"), c)


def test_one_dropout_mask_at_the_proj_split():
    """MTLoRA/TADFormer official: the task inputs come from the shared branch's dropped-out input."""
    layer = _layer()
    x = torch.randn(3, 7, 8)
    seen = {}

    def make(d):
        seen["d"] = d
        return d

    with stream_layout(StreamLayout((SHARED, "a"), 3)):
        shared, task = layer.split_forward(x, 2, make)
    d = seen["d"]
    assert (d == 0).any() and not torch.equal(d, x[:, 2:])  # dropped out
    kept = d != 0
    assert torch.allclose(d[kept], 2 * x[:, 2:][kept])
    # the shared branch used the same mask
    assert torch.allclose(shared[:, 2:] - layer.base(x[:, 2:]), 4 * d @ layer.lora_A.t() @ layer.lora_B.t(), atol=1e-5)
    assert torch.allclose(task, layer.base(x[:, 2:]) + 4 * d @ layer.task_A["a"].t() @ layer.task_B["a"].t(),
                          atol=1e-5)


def test_proj_split_without_task_inputs_reads_the_shared_input_once():
    """``make_task_inputs=None`` (MTLoRA's split): the task streams' down-projections are one matmul on the shared
    dropped-out input, with the outputs and gradients of repeating that input per task, and no per-task copy kept."""
    from mtbench.streams import repeat_streams

    def step(make):
        torch.manual_seed(0)
        layer = LoRALinear(torch.nn.Linear(8, 6), r=4, scale=4.0, dropout=0.5, task_ranks={"a": 3, "b": 3, "c": 3})
        layer.base.requires_grad_(False)
        for p in layer.lora_parameters():
            torch.nn.init.normal_(p)
        layer.train()
        x = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        torch.manual_seed(2)
        with stream_layout(StreamLayout((SHARED, "a", "b", "c"), 3)), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            shared, task = layer.split_forward(x, 0, make)  # no prompt rows, as MTLoRA
        (shared.sum() + (task * torch.linspace(-1, 1, task.numel()).view(task.shape)).sum()).backward()
        grads = [x.grad] + [p.grad for p in layer.lora_parameters()]
        return shared, task, grads, sum(saved.values())

    s0, t0, g0, saved0 = step(lambda d: repeat_streams(d, 3))
    s1, t1, g1, saved1 = step(None)
    assert t1.shape == t0.shape == (9, 7, 6)
    assert torch.equal(s0, s1) and torch.allclose(t0, t1, atol=1e-5)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert saved0 - saved1 >= 3 * 3 * 7 * 8 * 4  # the 3 task copies of the [3, 7, 8] input


def test_no_dropout_on_task_branch_inputs():
    """fc1/fc2 of the last block (official MTLoRA): task rows are deterministic in training mode."""
    layer = _layer()
    x = torch.randn(2 * 5, 8)
    with stream_layout(StreamLayout((SHARED, "a"), 5)):
        y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1[:5], y2[:5])  # shared branch: dropout
    assert torch.equal(y1[5:], y2[5:])
    assert torch.allclose(y1[5:], layer.base(x[:5]) + 4 * x[5:] @ layer.task_A["a"].t() @ layer.task_B["a"].t(),
                          atol=1e-5)


def test_tadformer_tpc_reads_the_dropped_input():
    model = build("tadformer:dropout=0.5").train()
    ext = model.extensions_at(0, 1)[0]
    got = {}
    orig = type(ext).split

    def spy(self, ctx, values):
        got["values"], got["attn"] = values, ctx.attention.values[:, len(model.task_names):]
        return orig(self, ctx, values)

    type(ext).split = spy
    try:
        model(torch.randn(1, 3, 64, 64))
    finally:
        type(ext).split = orig
    v, a = got["values"], got["attn"]
    kept = v != 0
    assert (~kept).any() and torch.allclose(v[kept], 2 * a[kept], atol=1e-6)


def test_released_skip_layout_scrambles_within_windows():
    """With the gate fully open the task streams are the skip feature: the released layout permutes each window's
    values (channels and tokens), the correct one does not."""
    outs = {}
    x = torch.randn(1, 3, 64, 64)
    for layout in ("correct", "released"):
        model = build(f"tadformer_official:skip_layout={layout}").eval()
        with torch.no_grad():
            for g in model.gates:
                g.g.fill_(60.0)
            feats = model.encode(x)
        outs[layout] = feats["semseg"][3]  # last stage: no PatchMerging after it, skip reaches the tap directly
    a, b = outs["correct"], outs["released"]
    # one image, and the last stage's 2x2 map is one 2x2 window: the values of the whole tap are one window's
    assert a.shape[0] == 1 and tuple(a.shape[2:]) == tuple(model.backbone.blocks(3)[-1].window_size) == (2, 2)
    assert not torch.allclose(a, b)
    assert torch.allclose(a.flatten().sort().values, b.flatten().sort().values, atol=1e-6)


def test_tadformer_official_sets_released_layout():
    cfg = resolve_spec(parse_method_specs("tadformer_official")[0]).config
    assert cfg.skip_layout == "released"
    assert resolve_spec(parse_method_specs("tadformer")[0]).config.skip_layout == "correct"


def test_merge_unmerge_lora():
    """Merged outputs equal unmerged within 1e-5; unmerge restores the frozen weights bit-exactly."""
    from mtbench.lora import merged_lora

    x = torch.randn(1, 3, 64, 64)
    for spec in ("lora:targets=qkv+proj+fc1+fc2", "mtlora", "tadformer"):
        model = build(spec).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear) and m.r > 0:
                    torch.nn.init.normal_(m.lora_B, std=0.05)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            ref = model(x)
            with merged_lora(model) as n:
                assert n > 0
                out = model(x)
                assert any(not torch.equal(p, before[k]) for k, p in model.named_parameters())
        for t in ref:
            assert (out[t] - ref[t]).abs().max() < 1e-5, spec
        assert all(torch.equal(p, before[k]) for k, p in model.named_parameters()), spec
