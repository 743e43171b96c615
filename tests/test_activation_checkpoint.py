"""Activation checkpointing of blocks (``--activation-checkpoint``, :data:`mtbench.encoder.ACTIVATION_CHECKPOINT`):
the same outputs and gradients as without it (LoRA dropout and drop-path masks are drawn again identically in the
recomputation), fewer tensors kept for backward, and a one-line error for a bad mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtbench.config import parse_method_specs
from mtbench.lora import LoRALinear, lora_input_recompute, recompute_lora_inputs
from mtbench.registry import build_model, resolve_spec
from mtbench.swin import create_backbone
from mtbench.tasks import TaskSpec

TASKS = [TaskSpec("semseg", 5, 1.0), TaskSpec("sal", 1, 5.0)]


def _step(spec: str, mode: str):
    """Outputs, gradients and bytes saved for backward of one training step in ``mode``."""
    torch.manual_seed(0)
    model = build_model(resolve_spec(parse_method_specs(spec)[0]), create_backbone("swin_embedded"), TASKS).train()
    model.activation_checkpoint = mode
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(5)  # the dropout masks of the step
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in out.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads, sum(saved.values())


@pytest.mark.parametrize("spec,mode", [("mtlora", "task"), ("tadformer", "task"), ("tadformer_official", "all"),
                                       ("tdss", "all"), ("vpt_deep", "task"), ("mtlora", "lora_inputs"),
                                       ("tadformer", "lora_inputs"), ("lora:share=dedicated", "task")])
def test_checkpointed_step_equals_plain_step(spec, mode):
    out0, g0, saved0 = _step(spec, "none")
    out1, g1, saved1 = _step(spec, mode)
    for k in out0:
        assert torch.equal(out0[k], out1[k]), k
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), (n, (g0[n] - g1[n]).abs().max().item())
    assert saved1 < saved0  # the checkpointed blocks keep only their inputs


def test_task_mode_checkpoints_only_the_blocks_with_several_streams():
    _, _, saved_none = _step("mtlora", "none")
    _, _, saved_inputs = _step("mtlora", "lora_inputs")
    _, _, saved_task = _step("mtlora", "task")
    _, _, saved_all = _step("mtlora", "all")
    assert saved_all < saved_task < saved_inputs < saved_none
    _, _, shared_none = _step("lora", "none")  # one stream everywhere: nothing to checkpoint in "task" mode
    _, _, shared_task = _step("lora", "task")
    assert shared_task == shared_none


def test_eval_and_no_grad_never_checkpoint(monkeypatch):
    import mtbench.encoder

    calls = []
    real = mtbench.encoder.checkpoint
    monkeypatch.setattr(mtbench.encoder, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = build_model(resolve_spec(parse_method_specs("mtlora")[0]), create_backbone("swin_embedded"), TASKS)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model.activation_checkpoint = "all"
        out = model(x)
    assert all(torch.equal(ref[k], out[k]) for k in ref)
    model(x)  # eval mode with gradients on
    assert calls == []
    model.train()
    with torch.no_grad():
        model(x)
    assert calls == []
    model(x)  # training with gradients: every block is checkpointed
    assert len(calls) == sum(model.backbone.depths)


@pytest.mark.parametrize("cmd", [["run", "--methods", "mtlora", "--activation-checkpoint", "sometimes"],
                                 ["profile", "--methods", "mtlora", "--activation-checkpoint", "sometimes"]])
def test_bad_mode_is_one_line_error(cmd, tmp_path):
    entry = Path(sys.executable).parent / "mtbench"  # the installed entry point, as a user types it
    res = subprocess.run([str(entry), *cmd, "--results-dir", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    expected = "error: unknown --activation-checkpoint 'sometimes'; valid: none, lora_inputs, task, all"
    assert lines == [expected], res.stderr


def _ln_lora_step(recompute: bool, inplace: bool = False):
    """LayerNorm -> LoRALinear (dropout 0.5, task streams off) -> loss; gradients and the bytes saved for backward."""
    torch.manual_seed(0)
    norm, layer = torch.nn.LayerNorm(8), LoRALinear(torch.nn.Linear(8, 6), r=3, scale=2.0, dropout=0.5)
    layer.base.requires_grad_(False)
    torch.nn.init.normal_(layer.lora_B)
    recompute_lora_inputs(torch.nn.ModuleDict({"norm": norm, "reduction": layer}))  # PatchMerging's pair
    x = torch.randn(4, 5, 8, requires_grad=True)
    saved = {}  # storages kept for backward (one tensor saved twice is kept once)

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with lora_input_recompute(recompute), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = norm(x)
        if inplace:
            h.mul_(2.0)  # the LoRA input is no longer the LayerNorm's output: it must be kept, not recomputed
        torch.manual_seed(3)
        out = layer(h)
    (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
    return [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)], sum(saved.values())


def test_lora_input_recompute_gives_the_same_gradients_and_keeps_no_copy():
    grads_saved, bytes_saved = _ln_lora_step(False)
    grads_rec, bytes_rec = _ln_lora_step(True)
    for a, b in zip(grads_saved, grads_rec):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert bytes_saved - bytes_rec == 4 * 5 * 8 * 4  # the dropped-out float copy of the [4, 5, 8] input is gone
    grads_plain, _ = _ln_lora_step(False, inplace=True)
    grads_inplace, _ = _ln_lora_step(True, inplace=True)  # changed in place: falls back to the kept copy
    for a, b in zip(grads_plain, grads_inplace):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(grads_plain[1], grads_saved[1])  # the in-place change does change A's gradient


def test_lora_input_recompute_under_autocast():
    """AMP (CPU bfloat16 here, CUDA float16 in runs): the recomputing backward works in the gradients' precision and
    gives the gradients of the kept-copy path."""
    def grads(mode):
        torch.manual_seed(0)
        model = build_model(resolve_spec(parse_method_specs("mtlora")[0]), create_backbone("swin_embedded"), TASKS)
        model.train().activation_checkpoint = mode
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in out.values()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    g0, g1 = grads("none"), grads("lora_inputs")
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert g1[n].dtype == torch.float32
        assert torch.allclose(g0[n], g1[n], rtol=1e-2, atol=1e-4), n


def _split_mlp_step(recompute: bool, task_mode: str = "own"):
    """A split block's MLP (fc1 -> GELU -> fc2, both LoRALinear with a shared branch and task branches) on 3 stacked
    streams (shared, a, b); gradients, the bytes saved for backward and the MLP's activation type. ``task_mode``:
    ``own`` (MTLoRA: per-task A, B of equal ranks) or ``shared_ab`` (TADFormer's TA-module: the shared A, B with a
    trainable module between them, here a Linear per layer shared by the tasks)."""
    from timm.layers import Mlp

    from mtbench.streams import SHARED, StreamLayout, stream_layout

    torch.manual_seed(0)
    mlp = Mlp(8, 32, 8)
    mlp.requires_grad_(False)
    ranks = {"a": 3, "b": 3} if task_mode == "own" else None
    mlp.fc1 = LoRALinear(mlp.fc1, r=4, scale=2.0, task_ranks=ranks)
    mlp.fc2 = LoRALinear(mlp.fc2, r=4, scale=2.0, task_ranks=ranks)
    mids = []
    if task_mode == "shared_ab":
        mids = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]
        mlp.fc1.set_task_mid(mids[0])
        mlp.fc2.set_task_mid(mids[1])
    for p in (*mlp.fc1.parameters(), *mlp.fc2.parameters()):
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    recompute_lora_inputs(mlp)
    x = torch.randn(3 * 2, 5, 8, requires_grad=True)  # 3 streams of 2 images, 5 tokens
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with lora_input_recompute(recompute), stream_layout(StreamLayout((SHARED, "a", "b"), 2)), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mlp(x)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    params = [p for m in (mlp, *mids) for p in m.parameters() if p.requires_grad]
    return [x.grad.clone()] + [p.grad.clone() for p in params], saved, type(mlp.act).__name__


@pytest.mark.parametrize("task_mode,n_params", [("own", 2 * 6), ("shared_ab", 2 * 2 + 2 * 2)])
def test_split_block_mlp_keeps_one_stream_of_fc1_output(task_mode, n_params):
    """In a split block, ``fc1``'s stacked output is ``W x_shared + b`` plus each stream's low-rank update (MTLoRA's
    own task factors, or TADFormer's filtered down-projection on the shared B); the GELU keeps that one stream and
    the rank-R factors instead of every stream's output, and ``fc2``'s LoRA recomputes its input from them too: the
    same gradients, and at least 2 of the 3 streams' [2, 5, 32] fc1 outputs not kept."""
    grads_saved, kept_saved, act = _split_mlp_step(False, task_mode)
    grads_rec, kept_rec, _ = _split_mlp_step(True, task_mode)
    bytes_saved, bytes_rec = sum(kept_saved.values()), sum(kept_rec.values())
    stacked = 3 * 2 * 5 * 32 * 4  # bytes of the 3 streams' fc1 output (or of its GELU)
    assert stacked in kept_saved.values() and stacked not in kept_rec.values()
    assert act == "LowRankGELU"
    # input; own: fc1, fc2's shared A, B and a's, b's A, B; shared_ab: their shared A, B and the mids' weight, bias
    assert len(grads_saved) == len(grads_rec) == 1 + n_params
    assert all(g.abs().sum() > 0 for g in grads_rec)
    for a, b in zip(grads_saved, grads_rec):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert bytes_saved - bytes_rec >= 2 * (2 * 5 * 32 * 4)
