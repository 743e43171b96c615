"""Core: backbone taps and fidelity to timm, LoRA layers, registry, configs, #TP counts, structural freezing."""

from __future__ import annotations

import pytest
import torch

from mtbench.config import MethodSpec, parse_method_specs
from mtbench.errors import MtbenchError
from mtbench.lora import LoRALinear
from mtbench.measure import count_params
from mtbench.registry import build_model, list_methods, resolve, resolve_spec
from mtbench.swin import create_backbone, partition_windows, reverse_windows, window_attention
from mtbench.tasks import TaskSpec, resolve_tasks

TASKS = [TaskSpec("semseg", 5, 1.0), TaskSpec("human_parts", 9, 2.0), TaskSpec("sal", 1, 5.0),
         TaskSpec("normals", 3, 10.0)]


def build(name: str, options: dict | None = None, backbone=None, tasks=TASKS):
    rm = resolve_spec(MethodSpec(name, {k: str(v) for k, v in (options or {}).items()}))
    return build_model(rm, backbone or create_backbone("swin_embedded"), tasks)


@pytest.fixture(scope="module")
def swin_t_counts():
    """#TP of every configuration the papers report, built once in the papers' setting (Swin-T 448, PASCAL)."""
    tasks = resolve_tasks("pascal_context")
    out = {}
    for label in ["decoder_only", "mtl_full", "mtlora:r=16", "mtlora:r=32", "mtlora:r=64", "mtlora_plus",
                  "single_task", "lora"]:
        spec = parse_method_specs(label)[0]
        model = build_model(resolve_spec(spec), create_backbone("swin_tiny_patch4_window7_224"), tasks)
        out[label] = count_params(model)
    return out


@pytest.mark.parametrize("label,expected", [
    ("mtlora:r=16", 4_953_146), ("mtlora:r=32", 6_083_642), ("mtlora:r=64", 8_344_634),
    ("decoder_only", 1_946_624), ("mtl_full", 29_464_442), ("mtlora_plus", 3_469_370),
    ("single_task", 112_017_896),
])
def test_paper_setting_counts(swin_t_counts, label, expected):
    assert swin_t_counts[label].trainable == expected


def test_mtlora_breakdown_matches_official_terms(swin_t_counts):
    pb = swin_t_counts["mtlora:r=16"]
    assert pb.decoders == 1_946_624
    assert pb.backbone_unfrozen == {"norm": 23_040, "patch_embed": 4_896, "patch_merging": 1_548_288,
                                    "rel_pos": 23_322}
    # TA-LoRA 70,656 r + TS-LoRA 276,480 (official closed form)
    assert pb.method == 70_656 * 16 + 276_480
    assert pb.total == 27_517_818 + 1_946_624 + pb.method


def test_lora_default_counts(swin_t_counts):
    pb = swin_t_counts["lora"]
    assert pb.method == 4 * (1 + 3) * 4416  # r(C + 3C) per qkv, r=4, block widths sum to 4416
    assert pb.backbone_unfrozen == {}


def test_backbone_taps_shapes_and_roles():
    bb = create_backbone("swin_tiny_patch4_window7_224")
    assert bb.stage_dims == [96, 192, 384, 768]
    assert bb.feature_dims == [192, 384, 768, 768]
    roles = {}
    for name, role in bb.roles.items():
        roles[role] = roles.get(role, 0) + dict(bb.named_parameters())[name].numel()
    assert roles["rel_pos"] == 23_322 and roles["patch_merging"] == 1_548_288 and roles["patch_embed"] == 4_896
    assert sum(roles.values()) == 27_517_818
    emb = create_backbone("swin_embedded")
    feats = emb(torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2), (2, 256, 2, 2)]


def test_window_blocks_reproduce_timm_block():
    torch.manual_seed(0)
    bb = create_backbone("swin_embedded").eval()
    x = bb.embed(torch.randn(3, 3, 64, 64))
    for block in bb.blocks(0):  # block 0 unshifted, block 1 shifted
        ours_windows, ctx = partition_windows(block, block.norm1(x))
        out = window_attention(block.attn, ours_windows, block.attn_mask)
        ours = reverse_windows(block, block.attn.proj(out.values), ctx)
        assert torch.allclose(ours, block._attn(block.norm1(x)), atol=1e-5)
        with_maps = window_attention(block.attn, ours_windows, block.attn_mask, return_prompt_maps=True)
        assert torch.allclose(with_maps.values, out.values, atol=1e-5)
        x = block(x)


def test_prompts_in_windows_shapes_and_masking():
    torch.manual_seed(0)
    bb = create_backbone("swin_embedded").eval()
    block = bb.blocks(0)[1]  # shifted block
    x = bb.embed(torch.randn(2, 3, 64, 64))
    windows, ctx = partition_windows(block, block.norm1(x))
    prompts = torch.randn(2, 4, 32)
    out = window_attention(block.attn, windows, block.attn_mask, prompts, return_prompt_maps=True)
    assert out.values.shape == (2 * ctx.num_windows, 4 + 16, 32)
    assert out.prompt_probs.shape == (2 * ctx.num_windows, 1, 4, 16)
    # prompt rows see every token of their window, with no shift mask and no rel-pos bias: by hand, softmax over the
    # window's prompt and patch columns of q·k * scale, its image's prompts in front of every window
    tokens = torch.cat([prompts.repeat_interleave(ctx.num_windows, dim=0), windows], dim=1)
    heads = block.attn.num_heads
    q, k, _ = block.attn.qkv(tokens).reshape(tokens.shape[0], 20, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    ref = torch.softmax(q @ k.transpose(-2, -1) * block.attn.scale, dim=-1)[:, :, :4, 4:]
    assert block.attn_mask is not None and (block.attn_mask < 0).any()  # a shifted block: the patches are masked
    assert torch.allclose(out.prompt_probs, ref, atol=1e-6)
    assert (out.prompt_probs.sum(-1) < 1).all()  # the prompt columns take the rest


def test_lora_linear_identity_at_init_and_task_branches():
    base = torch.nn.Linear(8, 6)
    layer = LoRALinear(base, r=4, scale=4.0, dropout=0.0, task_ranks={"a": 2})
    x = torch.randn(5, 8)
    assert torch.allclose(layer(x), base(x))
    assert layer.lora_A.shape == (4, 8) and layer.lora_B.shape == (6, 4)
    assert layer.task_A["a"].shape == (2, 8) and layer.task_B["a"].shape == (6, 2)
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    expected = base(x) + 4.0 * (x @ layer.lora_A.t()).sum(-1, keepdim=True).expand(-1, 6)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(MtbenchError):
        LoRALinear(base, r=-1)


def _task_block(model, block, x):
    """The last block of stage 0 run by the core with MTLoRA's split (issue 6: was ``model.task_block``)."""
    from mtbench.encoder import BlockContext, run_block
    from mtbench.streams import SHARED, StreamLayout, split_streams, stream_layout

    ctx = BlockContext(0, 1, 2, block, StreamLayout((SHARED,), x.shape[0]), model)
    with stream_layout(ctx.layout):
        out, _ = run_block(block, x, ctx, model.extensions_at(0, 1), split=True)
    parts = split_streams(out, ctx.layout.size)
    return parts[0], {t: parts[k + 1] for k, t in enumerate(model.task_names)}


def test_mtlora_task_streams_equal_shared_at_init():
    """With every LoRA B at zero, each task stream equals the shared stream, which equals the frozen block."""
    torch.manual_seed(0)
    model = build("mtlora").eval()
    bb = model.backbone
    x = bb.embed(torch.randn(2, 3, 64, 64))
    block = bb.blocks(0)[-1]
    shared, tasks = _task_block(model, block, x)
    assert torch.allclose(shared, block(x), atol=1e-5)
    for t in model.task_names:
        assert torch.allclose(tasks[t], shared, atol=1e-5)
    with torch.no_grad():
        block.mlp.fc2.task_B["sal"].normal_()
    _, tasks = _task_block(model, block, x)
    assert not torch.allclose(tasks["sal"], shared, atol=1e-4)
    assert torch.allclose(tasks["semseg"], shared, atol=1e-5)


ALL = [m.name for m in list_methods()] + ["mtlora_plus"]


@pytest.mark.parametrize("name", ALL)
def test_only_declared_parameters_change(name):
    """A few AdamW steps change only parameters the method declares trainable; frozen ones stay bit-identical."""
    torch.manual_seed(0)
    model = build(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 64, 64)
    for _ in range(3):
        out = model(x)
        loss = sum((o - 0.5).pow(2).mean() for o in out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed, "nothing trained"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    assert any(n.startswith("decoders.") for n in changed)
    pb = count_params(model)
    assert pb.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert pb.trainable == pb.method + pb.decoders + sum(pb.backbone_unfrozen.values())


def test_decoder_only_freezes_whole_backbone():
    model = build("decoder_only")
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.decoders.parameters())


def test_model_output_shapes_and_bad_input():
    model = build("lora").eval()
    out = model(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "semseg": (1, 5, 64, 64), "human_parts": (1, 9, 64, 64), "sal": (1, 1, 64, 64), "normals": (1, 3, 64, 64)}
    with pytest.raises(MtbenchError, match="64x64"):
        model(torch.randn(1, 3, 32, 32))


def test_parse_method_specs():
    specs = parse_method_specs("tadformer:r=32,filter=static,mtlora:r=64,lora")
    assert [(s.name, s.options) for s in specs] == [
        ("tadformer", {"r": "32", "filter": "static"}), ("mtlora", {"r": "64"}), ("lora", {})]
    for bad in ["", "r=3", "mtlora:r", "mtlora:r=1,r=2"]:
        with pytest.raises(MtbenchError):
            parse_method_specs(bad)


def test_config_validation_errors():
    with pytest.raises(MtbenchError, match="unknown method 'nosuch'; valid: .*mtlora"):
        resolve("nosuch")
    with pytest.raises(MtbenchError, match="^mtlora: r must be > 0, got -4$"):
        resolve_spec(MethodSpec("mtlora", {"r": "-4"}))
    with pytest.raises(MtbenchError, match="^lora: r must be > 0, got 0$"):
        resolve_spec(MethodSpec("lora", {"r": "0"}))
    with pytest.raises(MtbenchError, match=r"^tadformer: dropout must be in \[0, 1\), got -0.1$"):
        resolve_spec(MethodSpec("tadformer", {"dropout": "-0.1"}))
    with pytest.raises(MtbenchError, match="^tdss: layers must be >= 0, got -1$"):
        resolve_spec(MethodSpec("tdss", {"layers": "-1"}))
    assert resolve_spec(MethodSpec("tdss", {"layers": "0"})).config.layers == 0  # the bound itself is accepted
    assert resolve_spec(MethodSpec("lora", {"dropout": "0"})).config.dropout == 0
    with pytest.raises(MtbenchError, match="no option 'rank'"):
        resolve_spec(MethodSpec("mtlora", {"rank": "4"}))
    with pytest.raises(MtbenchError, match="not a valid int"):
        resolve_spec(MethodSpec("mtlora", {"r": "big"}))
    with pytest.raises(MtbenchError, match="unknown task 'depthh'"):
        resolve_tasks("synthetic", ["semseg", "depthh"])
    rm = resolve_spec(MethodSpec("mtlora_plus", {"r": "32"}))
    assert rm.config.plus is True and rm.config.r == 32
    assert rm.method_key == "mtlora_plus_r=32"
    # an option at its preset value is no departure: `profile` writes where `run` writes (the run identity's key)
    assert resolve_spec(MethodSpec("mtlora", {"r": "16"})).method_key == "default"
    assert resolve_spec(MethodSpec("mtlora_plus", {"r": "16", "plus": "true"})).method_key == "mtlora_plus"


def test_config_bounds_are_declared_once_and_listed():
    """Bounds live in the field metadata (mtbench/config.py); ``mtbench list`` shows what each option accepts."""
    from mtbench.config import MethodConfig, _bounds_text

    assert [_bounds_text(m) for m in ({"gt": 0}, {"ge": 2}, {"ge": 0, "lt": 1}, {"gt": 0, "le": 1}, {})] == \
        ["> 0", ">= 2", "in [0, 1)", "in (0, 1]", ""]
    described = {name: help_ for name, _, help_ in resolve("mtlora")[0].config_cls.describe_options()}
    assert described["r"].endswith("(> 0)") and described["dropout"].endswith("(in [0, 1))")
    assert all(issubclass(resolve(n)[0].config_cls, MethodConfig) for n in ("lora", "ditask", "tdss"))


def test_single_task_backbones_are_independent():
    model = build("single_task")
    params = [list(b.parameters())[0] for b in model.task_backbones.values()]
    assert len({id(p) for p in params}) == len(TASKS)
    assert all(torch.equal(params[0], p) for p in params)  # same initial weights


def test_backbone_clone_keeps_roles():
    bb = create_backbone("swin_embedded")
    other = bb.clone()
    assert [bb.role_of(p) for p in bb.parameters()] == [other.role_of(p) for p in other.parameters()]
