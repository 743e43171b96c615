"""The core's seams: own window/rel-pos helpers against timm, the core loop against timm's blocks, the task-indexed
container in shared and dedicated form (test-only per-task-bias method), decoder registry and auxiliary losses."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import window_partition

from mtbench.encoder import BlockContext, run_block
from mtbench.errors import MtbenchError
from mtbench.lora import LoRALinear
from mtbench.streams import SHARED, StreamLayout, TaskIndexed, first_and_rest, stream_layout, unstack_streams
from mtbench.swin import create_backbone, partition_windows, relative_position_bias
from mtbench.tasks import TaskSpec
from methods_for_tests import TaskBias, TaskBiasConfig

TASKS = [TaskSpec("semseg", 5, 1.0), TaskSpec("sal", 1, 5.0), TaskSpec("normals", 3, 10.0)]
NAMES = [t.name for t in TASKS]


def test_own_helpers_equal_timm():
    torch.manual_seed(0)
    bb = create_backbone("swin_embedded").eval()
    for i in range(bb.num_stages):
        for block in bb.blocks(i):
            with torch.no_grad():
                block.attn.relative_position_bias_table.normal_()
            assert torch.equal(relative_position_bias(block.attn), block.attn._get_rel_pos_bias())
    block = bb.blocks(0)[0]
    x = torch.randn(2, 16, 16, 32)
    ours, _ = partition_windows(block, x)
    assert torch.equal(ours, window_partition(x, block.window_size).view(-1, 16, 32))


def test_run_block_equals_timm_block():
    torch.manual_seed(0)
    bb = create_backbone("swin_embedded", pretrained=True).eval()
    x = bb.embed(torch.randn(2, 3, 64, 64))
    for i in range(bb.num_stages):
        for j, block in enumerate(bb.blocks(i)):  # unshifted and shifted blocks, window shrunk at the last stage
            ctx = BlockContext(i, j, 2, block, StreamLayout((SHARED,), 2), model=None)
            with torch.no_grad():
                ours, _ = run_block(block, x, ctx, [], split=False)
                ref = block(x)
            assert (ours - ref).abs().max() < 1e-5
            x = ref
        x = bb.tap(i, x)


def _bias_model(share):
    torch.manual_seed(0)
    return TaskBias(create_backbone("swin_embedded", pretrained=True), TASKS, TaskBiasConfig(share=share)).eval()


def _set_bias(model, task, value):
    with torch.no_grad():
        for ext in model.block_extensions.values():
            m = ext[0].bias.module_for(task) if task != SHARED else ext[0].bias.shared
            m.bias.fill_(value)


@pytest.mark.parametrize("share", ["shared", "dedicated"])
def test_task_bias_method_through_the_seam(share):
    model = _bias_model(share)
    model.apply_trainability()
    x = torch.randn(2, 3, 64, 64)
    plain = model.backbone(x)
    calls = []
    hook = model.backbone.blocks(1)[0].norm1.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.no_grad():
        feats = model.encode(x)
    hook.remove()
    assert calls == [2 * (3 if share == "dedicated" else 1)]  # streams stacked on the batch, one block call
    for t in NAMES:  # zero biases: the frozen backbone's features
        for a, b in zip(feats[t], plain):
            assert (a - b).abs().max() < 1e-5
    per_task = share == "dedicated"
    n_bias = sum(p.numel() for p in model.trainable_parameters()) - sum(
        p.numel() for p in model.decoders.parameters())
    assert n_bias == (3 if per_task else 1) * sum(b.dim for i in range(4) for b in model.backbone.blocks(i))
    _set_bias(model, "sal" if per_task else SHARED, 0.5)
    with torch.no_grad():
        after = model.encode(x)
    for t in NAMES:
        changed = not torch.allclose(after[t][2], feats[t][2])
        assert changed == (t == "sal" or not per_task), t
    out = model.train()(x)
    sum(o.mean() for o in out.values()).backward()
    grads = [p.grad for ext in model.block_extensions.values() for p in ext.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_dedicated_task_equals_shared_model_with_that_bias():
    ded, sh = _bias_model("dedicated"), _bias_model("shared")
    for k, t in enumerate(NAMES):
        _set_bias(ded, t, 0.1 * (k + 1))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fd = ded.encode(x)
        for k, t in enumerate(NAMES):
            _set_bias(sh, SHARED, 0.1 * (k + 1))
            fs = sh.encode(x)[t]
            for a, b in zip(fd[t], fs):
                assert (a - b).abs().max() < 1e-5


def test_task_indexed_container():
    c = TaskIndexed(["a", "b"], lambda t: torch.nn.Linear(3, 2), share="dedicated")
    x = torch.randn(3 * 4, 3)
    with stream_layout(StreamLayout(("a", "b"), 4)):
        y = c(x[:8])
    assert torch.allclose(y[:4], c.per_task["a"](x[:4])) and torch.allclose(y[4:], c.per_task["b"](x[4:8]))
    assert c.stacked("weight", ["b", "a"]).shape == (2, 2, 3)
    with pytest.raises(MtbenchError):
        TaskIndexed(["a"], lambda t: torch.nn.Identity(), share="both")


def test_lora_streams_matrix_mode():
    """Shared stream: W x0 + s B A x0; task stream: W x0 + s B_t A_t x_t (MTLoRA 'matrix' mode)."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(6, 5), r=2, scale=4.0, dropout=0.0, task_ranks={"a": 3, "b": 3})
    for p in layer.lora_parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 4, 6)
    with stream_layout(StreamLayout((SHARED, "a", "b"), 4)):
        y = layer(x.reshape(12, 6)).view(3, 4, 5)
    base = layer.base(x[0])
    assert torch.allclose(y[0], base + 4 * x[0] @ layer.lora_A.t() @ layer.lora_B.t(), atol=1e-5)
    for k, t in ((1, "a"), (2, "b")):
        assert torch.allclose(y[k], base + 4 * x[k] @ layer.task_A[t].t() @ layer.task_B[t].t(), atol=1e-5)


@pytest.mark.parametrize("ranks", [{"a": 3, "b": 3}, {"a": 2, "b": 3}])
def test_lora_task_outputs_batched_and_per_task_paths(ranks):
    """Equal task ranks take one batched baddbmm, unequal ones a matmul per task: same outputs; each task's
    factors get gradient from its own rows only, the frozen weight none."""
    torch.manual_seed(1)
    layer = LoRALinear(torch.nn.Linear(6, 5), r=2, scale=4.0, dropout=0.0, task_ranks=ranks, task_scale=0.5)
    layer.base.requires_grad_(False)
    for p in layer.lora_parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 4, 6, requires_grad=True)
    with stream_layout(StreamLayout((SHARED, "a", "b"), 4)):
        y = layer(x.reshape(12, 6)).view(3, 4, 5)
    base = layer.base(x[0])
    for k, t in ((1, "a"), (2, "b")):
        ref = base + 0.5 * x[k] @ layer.task_A[t].t() @ layer.task_B[t].t()
        assert torch.allclose(y[k], ref, atol=1e-5)
    y[1].sum().backward()  # task a's rows only
    assert layer.task_A["a"].grad is not None and layer.task_A["a"].grad.abs().sum() > 0
    assert layer.task_A["b"].grad is None or layer.task_A["b"].grad.abs().sum() == 0
    assert layer.base.weight.grad is None
    assert x.grad[2].abs().sum() == 0 and x.grad[1].abs().sum() > 0 and x.grad[0].abs().sum() > 0


def test_stream_views_backward_is_one_concatenation():
    """first_and_rest / unstack_streams are views of the stacked tensor; gradients reach the right rows."""
    x = torch.randn(6, 3, requires_grad=True)
    a, rest = first_and_rest(x, 3)
    assert a.data_ptr() == x.data_ptr() and a.shape == (2, 3) and rest.shape == (4, 3)
    (2 * a.sum() + 3 * rest.sum()).backward()
    assert torch.equal(x.grad, torch.tensor([2.0] * 2 + [3.0] * 4).unsqueeze(1).expand(6, 3))
    parts = unstack_streams(x, 3)
    assert [p.shape for p in parts] == [(2, 3)] * 3 and parts[2].data_ptr() == x[4:].data_ptr()
    with pytest.raises(MtbenchError, match="cannot hold 4 stacked streams"):
        first_and_rest(x, 4)


def test_configure_cpu_flushes_denormals_and_can_be_switched_off():
    import subprocess
    import sys

    code = ("import torch; from mtbench.cpu import configure_cpu; s = configure_cpu(allocator=False); "
            "print(s['flush_denormal'], (torch.tensor([1e-39]) * 1.0).item() == 0.0, s['malloc_tuned'])")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert on == ["True", "True", "False"]
    env = {**__import__("os").environ, "MTBENCH_CPU_TUNING": "off"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert off.split() == ["False", "False", "False"]


def test_decoder_registry_and_aux_losses():
    from mtbench.config import MethodSpec
    from mtbench.measure import count_params
    from mtbench.registry import build_model, resolve_spec

    rm = resolve_spec(MethodSpec("decoder_only", {}))
    small = build_model(rm, create_backbone("swin_embedded"), TASKS)
    wide = build_model(rm, create_backbone("swin_embedded"), TASKS, decoder="mtlora_hrnet")
    assert small.decoder_name == "hrnet_270" and wide.decoder_name == "mtlora_hrnet"
    hidden = {"hrnet_270": 270, "mtlora_hrnet": 1080}
    for m in (small, wide):
        h = hidden[m.decoder_name]
        per_task = (64 * 18 + 128 * 36 + 256 * 72 + 256 * 144) + (
            270 * h + h) + 2 * h + (h * 5 + 5)
        assert sum(p.numel() for p in m.decoders[NAMES[0]].parameters()) == per_task
    assert count_params(wide).decoders - count_params(small).decoders == 3 * (270 * 810 + 810 + 2 * 810) + 810 * 9
    with pytest.raises(MtbenchError, match="unknown decoder"):
        build_model(rm, create_backbone("swin_embedded"), TASKS, decoder="nope")
    preds, aux = small(torch.randn(1, 3, 64, 64), return_aux=True)
    assert aux == {} and set(preds) == set(NAMES)
