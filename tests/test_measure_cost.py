"""The cost measurements of mtbench.measure against hand-computed values: FLOPs of a Linear, a window-attention
block and an HRNet head, synchronised timing, reported skipped operators, and CPU peak memory."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from mtbench import measure
from mtbench.decoders import HRNetHead
from mtbench.errors import MtbenchError
from mtbench.measure import LatencyStats, count_flops, peak_memory, sdpa_macs, synchronizer, time_once


def test_linear_flops_hand_computed():
    lin = nn.Linear(16, 32)
    fc = count_flops(lin, torch.randn(4, 16))
    assert fc.macs == 4 * 16 * 32  # one MAC per input feature per output feature per row; bias not counted
    assert fc.gflops == pytest.approx(2 * 4 * 16 * 32 / 1e9)
    assert fc.torch_flops == 2 * 4 * 16 * 32
    assert fc.mismatch == [] and fc.skipped == {}


class _StackedLowRank(nn.Module):
    """``base + z up`` per stream in one ``baddbmm`` (the split layers' stacked output, mtbench.lora)."""

    def forward(self, base, z, up):
        return torch.baddbmm(base, z, up)


def test_baddbmm_flops_hand_computed():
    """fvcore 0.1.5 has no baddbmm handle (it would skip it and count 0); mtbench's counts b·n·k·m, as torch does."""
    base, z, up = torch.randn(1, 10, 24), torch.randn(5, 10, 3), torch.randn(5, 3, 24)  # broadcast base as in lora
    fc = count_flops(_StackedLowRank(), (base, z, up))
    assert fc.macs == 5 * 10 * 3 * 24
    assert fc.torch_flops == 2 * 5 * 10 * 3 * 24
    assert fc.mismatch == [] and fc.skipped == {}


class _WindowAttnBlock(nn.Module):
    """qkv -> attention inside windows (mtbench.swin.window_attention, F.scaled_dot_product_attention) -> proj."""

    def __init__(self, dim, heads, window):
        super().__init__()
        from timm.models.swin_transformer import WindowAttention

        self.attn = WindowAttention(dim, num_heads=heads, window_size=window)

    def forward(self, windows):
        from mtbench.swin import window_attention

        return self.attn.proj(window_attention(self.attn, windows, None).values)



@pytest.mark.parametrize("groups,transposed", [(1, False), (8, False), (64, False), (4, True)])
def test_train_step_flops_of_grouped_convolutions_hand_computed(groups, transposed):
    """Forward 2·B·H·W·C_out·(C_in/groups)·k²; backward: input gradient and weight gradient cost the same each.
    torch's own formula counts a grouped conv's weight gradient as dense (``groups`` times too much)."""
    B, C, H, W, k = 2, 64, 20, 24, 3
    x = torch.randn(B, C, H, W, requires_grad=True)
    w = torch.randn(C, C // groups, k, k, requires_grad=True)
    conv = nn.functional.conv_transpose2d if transposed else nn.functional.conv2d
    total, fwd, by_op = measure.count_train_step_flops(lambda: conv(x, w, padding=1, groups=groups).sum())
    forward = 2 * B * H * W * C * (C // groups) * k * k
    assert by_op["aten.convolution"] == forward
    assert by_op["aten.convolution_backward"] == 2 * forward
    assert fwd == forward  # the forward count stops before backward (sum() counts no FLOPs)
    assert total == 3 * forward
    x.grad = w.grad = None
    w.requires_grad_(False)  # input gradient only
    _, _, by_op = measure.count_train_step_flops(lambda: conv(x, w, padding=1, groups=groups).sum())
    assert by_op["aten.convolution_backward"] == forward


def test_profile_counts_inference_as_evaluated_and_the_train_step_unmerged():
    """Inference FLOPs are counted with the shared LoRA merged, as evaluation and the timed inference run the model:
    LoRA then costs exactly mtl_full's MACs. The training step runs unmerged, so its forward counts the LoRA
    matmuls on top, and the frozen weights get no weight gradient."""
    from mtbench.lora import LoRALinear
    from mtbench.measure import Workload, profile_methods

    full, lora = profile_methods(["mtl_full", "lora"], "synthetic", batch_size=2, rounds=1, warmup=0, memory=False,
                                 compare_to="mtl_full")
    inf_full, inf_lora = full["flops"]["inference"], lora["flops"]["inference"]
    n_lora = sum(isinstance(m, LoRALinear) for m in Workload("lora", "synthetic", 2, "cpu").model.modules())
    assert inf_full["merged_lora_layers"] == 0 and inf_lora["merged_lora_layers"] == n_lora > 0
    assert inf_lora["macs"] == inf_full["macs"]
    st_full, st_lora = full["flops"]["train_step"], lora["flops"]["train_step"]
    assert st_full["forward_torch_gflops"] == pytest.approx(inf_full["torch_gflops"], rel=1e-9)
    assert st_lora["forward_torch_gflops"] > inf_lora["torch_gflops"]
    assert st_lora["backward_torch_gflops"] < st_full["backward_torch_gflops"]
    r_full, r_lora = full["ratios"], lora["ratios"]
    assert r_full["inference_flops"] == r_full["train_flops"] == 1.0 and r_full["train_time"]["median"] == 1.0
    assert r_lora["inference_flops"] == pytest.approx(inf_lora["torch_gflops"] / inf_full["torch_gflops"], rel=1e-12)
    assert r_lora["train_flops"] == pytest.approx(st_lora["torch_gflops"] / st_full["torch_gflops"], rel=1e-12)
    assert r_lora["train_flops"] < 1.0  # frozen weights: no weight gradients
    faults = lora["latency"]["minor_page_faults"]  # one count per timed call (Linux CI has getrusage)
    assert [len(faults["inference"]), len(faults["train"])] == [1, 1]
    assert all(isinstance(n, int) and n >= 0 for n in faults["inference"] + faults["train"])


def test_flops_count_derived_weights_as_evaluation_uses_them():
    """DiTASK builds its warped weights once per evaluation and caches them; count_flops runs the model once before
    counting, so neither fvcore's trace nor torch's counter includes the rebuild (before, fvcore counted it and the
    two disagreed by an order of magnitude), and the count does not depend on what ran before."""
    from mtbench.measure import FLOP_TOLERANCE, Workload

    w = Workload("ditask", "synthetic", 2, "cpu")
    first = count_flops(w.model, w.image1)
    w.train_step()  # changes theta: the cache is stale
    second = count_flops(w.model, w.image1)
    assert first.macs == second.macs and abs(first.rel_diff) <= FLOP_TOLERANCE
    plain = count_flops(Workload("mtl_full", "synthetic", 2, "cpu").model, w.image1)
    assert first.macs < 2.5 * plain.macs  # the rebuild alone was 1.15 GMACs against 0.05 GMACs of the network

def test_window_attention_block_flops_include_attention_matmuls():
    B_, ws, C, heads = 3, 4, 8, 2
    N = ws * ws
    block = _WindowAttnBlock(C, heads, (ws, ws))
    fc = count_flops(block, torch.randn(B_, N, C))
    qkv = B_ * N * C * 3 * C
    attn = B_ * heads * N * N * (C // heads) * 2  # Q K^T and softmax(.) V, head dim C/heads
    proj = B_ * N * C * C
    assert fc.by_operator["scaled_dot_product_attention"] == attn
    assert fc.macs == qkv + attn + proj
    assert fc.torch_flops == 2 * (qkv + attn + proj)  # torch's counter agrees exactly, attention included
    assert fc.mismatch == []


def test_sdpa_macs_with_different_value_width():
    assert sdpa_macs([2, 3, 5, 4], [2, 3, 7, 4], [2, 3, 7, 6]) == 2 * 3 * 5 * 7 * (4 + 6)


def test_hrnet_head_flops_hand_computed():
    head = HRNetHead((8, 16, 32, 32), out_channels=3, channels=(2, 4, 6, 8), hidden_ratio=2).eval()
    feats = [torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 32, 2, 2), torch.randn(1, 32, 2, 2)]

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, a, b, c, d):
            return self.head([a, b, c, d], (16, 16))

    fc = count_flops(Wrap(), tuple(feats))
    reducers = 8 * 2 * 64 + 16 * 4 * 16 + 32 * 6 * 4 + 32 * 8 * 4  # 1x1 convs at each tap's resolution
    fuse = 20 * 40 * 64 + 40 * 3 * 64  # 270->1080 analogue (20->40) and 40->3 on the 8x8 grid
    assert fc.by_operator["conv"] == reducers + fuse == 62720
    assert fc.torch_flops == 2 * 62720  # torch counts convolutions only
    bn = 2 * 40 * 64  # fvcore: eval BatchNorm with affine = 2 per element
    up = 4 * (2 + 4 + 6 + 8 - 2) * 64 + 4 * 3 * 256  # fvcore: 4 per output element of a bilinear upsample
    assert fc.by_operator["batch_norm"] == bn and fc.by_operator["upsample_bilinear2d"] == up
    assert fc.macs == 62720 + bn + up
    # 2 x MACs and torch differ by more than 2%: the operators responsible are named
    assert abs(fc.rel_diff) > 0.02
    assert {m["operator"] for m in fc.mismatch} == {"batch_norm", "upsample_bilinear2d"}


def test_skipped_operator_is_reported():
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Softmax(dim=-1))
    fc = count_flops(model, torch.randn(2, 8))
    assert fc.skipped == {"aten::gelu": 1, "aten::softmax": 1}
    assert fc.macs == 2 * 8 * 8


def test_count_flops_restores_mode_and_grad_flags():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    model[0].bias.requires_grad_(False)
    count_flops(model, torch.randn(1, 4))
    assert model.training and model[0].weight.requires_grad and not model[0].bias.requires_grad


def test_timing_waits_for_the_device():
    """A fake asynchronous device: work runs in a thread after fn returns; sync waits for it. The measured time
    includes the work only because time_once synchronises before reading the clock."""
    pending: list[threading.Thread] = []

    def launch():
        th = threading.Thread(target=time.sleep, args=(0.08,))
        th.start()
        pending.append(th)

    def sync():
        while pending:
            pending.pop().join()

    assert time_once(launch, sync) >= 80
    assert time_once(launch, lambda: None) < 80  # without synchronisation the work would be missed
    sync()


def test_cuda_synchronizer_calls_cuda_synchronize(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronizer(torch.device("cuda", 0))()
    assert calls == [torch.device("cuda", 0)]
    synchronizer(torch.device("cpu"))()
    assert len(calls) == 1


def test_latency_stats_percentiles():
    s = LatencyStats.from_samples([10, 20, 30, 40, 50], items=4)
    assert (s.median_ms, s.p10_ms, s.p90_ms, s.n) == (30, 14, 46, 5)
    assert s.items_per_s == pytest.approx(4 * 1000 / 30)


def test_ratio_stats_are_per_round():
    r = measure.ratio_stats([2, 6, 3], [1, 2, 3])
    assert r == {"min": 1.0, "median": 2.0, "max": 3.0}


def test_cpu_peak_memory_sees_a_step_allocation():
    def step():
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
        x += 1
        del x

    m = peak_memory(step, torch.device("cpu"))
    assert 60 <= m["rss_step_mb"] < 200
    assert "VmHWM" in m["what"]


def test_cpu_peak_memory_sees_a_step_under_the_tuned_allocator():
    """With glibc keeping freed blocks (mtbench.cpu), a step served from them would not grow the resident set;
    peak_memory first returns them to the system, so the step's 64 MiB still show (fresh process)."""
    import subprocess
    import sys

    code = ("import torch\nfrom mtbench.cpu import configure_cpu\nfrom mtbench.measure import peak_memory\n"
            "assert configure_cpu()['malloc_tuned']\n"
            "for _ in range(3):\n    x = torch.ones(200 * 2**20 // 4); x += 1; del x\n"
            "def step():\n    x = torch.ones(64 * 2**20 // 4); x += 1; del x\n"
            "print(peak_memory(step, torch.device('cpu'))['rss_step_mb'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 60 <= float(out.split()[-1]) < 200


def test_scaled_tasks_repeat_the_dataset_kinds():
    from mtbench.tasks import resolve_tasks

    base = [t.name for t in resolve_tasks("synthetic")]
    names = [t.name for t in measure.scaled_tasks("synthetic", 6)]
    assert names[:len(base)] == base and names[len(base):] == [f"{n}#2" for n in base[:6 - len(base)]]
    with pytest.raises(MtbenchError, match="number of tasks must be >= 1, got 0"):
        measure.scaled_tasks("synthetic", 0)


def test_decoder_flops_grow_with_the_number_of_tasks():
    """Each extra task adds one decoder head: the count grows with T, by the same head cost for a repeated kind."""
    counts, works = [], []
    for n in (1, 5):
        tasks = measure.scaled_tasks("synthetic", n)
        works.append(measure.Workload("decoder_only", "synthetic", 1, "cpu", tasks=tasks))
        counts.append(count_flops(works[-1].model, works[-1].image1).macs)
    w5 = works[1]
    feats = [torch.randn(1, c, s, s) for c, s in zip(w5.model.backbone.feature_dims, (8, 4, 2, 2))]
    head = {t: count_flops(w5.model.decoders[t], (feats, (64, 64))).macs for t in w5.model.task_names}
    assert w5.model.task_names == ["semseg", "human_parts", "sal", "normals", "semseg#2"]
    assert head["semseg#2"] == head["semseg"] > 0  # a repeated kind costs its kind's head
    assert counts[1] - counts[0] == sum(head[t] for t in w5.model.task_names[1:])  # one head per added task


_REPO = Path(__file__).resolve().parents[1]  # the checkout; the benchmark scripts are in _REPO / "benchmarks"


def _load_benchmark(monkeypatch, name: str):
    """The script ``benchmarks/NAME.py`` as a module, imported as when it is run (its folder on ``sys.path``)."""
    import importlib.util

    folder = _REPO / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_benchmark(name: str, *args: str):
    """Run ``benchmarks/NAME.py ARGS`` as a user does (``PYTHONPATH`` = the checkout); the completed process."""
    import os
    import subprocess

    return subprocess.run([sys.executable, str(_REPO / "benchmarks" / f"{name}.py"), *args], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(_REPO)})


def test_benchmark_ops_times_every_operator_call(monkeypatch):
    """benchmarks/ops.py: the dispatch timer counts each aten call once, forward and backward, and the script prints
    a per-operator table whose rows add up to the printed sum; a method with several options is one column."""
    import re

    ops = _load_benchmark(monkeypatch, "ops")
    a = torch.randn(64, 32, requires_grad=True)
    timer = ops.OperatorTimer()
    with timer:
        (a @ a.t()).sum().backward()
    assert timer.calls["mm"] == 3  # forward, and one per input in backward (a appears twice)
    assert timer.calls["sum"] == 1 and all(v >= 0 for v in timer.seconds.values())

    res = _run_benchmark("ops", "--methods", "mtl_full,lora:r=2,scale=2", "--dataset", "synthetic", "--warmup", "0",
                         "--repeats", "1", "--rows", "500")
    assert res.returncode == 0, res.stderr
    train = res.stdout.split("inference (")[0]
    rows = [line.split("|")[1:-1] for line in train.splitlines() if line.startswith("| ") and "**" not in line]
    header, body = rows[0], rows[1:]
    assert [h.strip() for h in header] == ["operator", "mtl_full", "lora (r=2, scale=2)"]
    assert any(r[0].strip() == "mm" for r in body)
    total = float(re.search(r"\*\*sum of operators\*\* \| (\d+)", train).group(1))
    assert abs(sum(float(r[1]) for r in body) - total) <= 1 + 0.05 * total

    bad = _run_benchmark("ops", "--methods", "nope")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("error: unknown method 'nope'; valid:")
    assert ops.split_methods("lora:targets=qkv+proj,r=16,mtlora@task, ,tadformer") == [
        "lora:targets=qkv+proj,r=16", "mtlora@task", "tadformer"]
    with pytest.raises(SystemExit, match="option 'r=16' comes before any method name"):
        ops.split_methods("r=16,lora")


_FRAGMENT = (
    "import torch\nfrom mtbench.cpu import track_live_memory\n"
    "from mtbench.measure import peak_memory, _proc_status_kb\n"
    "{setup}"
    "x = torch.ones(20 * 2**20 // 4); del x\n"  # under glibc's default this raises the mmap threshold to 20 MiB
    "keep = []\n"
    "def step():\n"
    "    big = []\n"
    "    for _ in range(24):\n"  # 24 x 4 MiB, each followed by a 256 KiB block that stays allocated
    "        big.append(torch.ones(2**20)); keep.append(torch.ones(2**16))\n"
    "    del big[:]\n"
    "before = _proc_status_kb('VmRSS')\n"
    "m = peak_memory(step, torch.device('cpu'))\n"
    "print(m['rss_step_mb'], (_proc_status_kb('VmRSS') - before) / 1024)\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc controls")
def test_track_live_memory_returns_freed_blocks():
    """With the fixed mmap threshold, 96 MiB of 4 MiB tensors freed at the end of a step leave the resident set,
    and the step's peak is those 96 MiB; under glibc's default (after a 20 MiB block was freed) they stay resident."""
    import subprocess

    def run(setup):
        out = subprocess.run([sys.executable, "-c", _FRAGMENT.format(setup=setup)], capture_output=True, text=True,
                             check=True).stdout.split()
        return float(out[0]), float(out[1])

    peak, left = run("assert track_live_memory()\n")
    assert 96 <= peak < 115 and left < 12  # 24 x 256 KiB stay
    _, left_default = run("")
    assert left_default > 80  # what the fixed threshold removes: freed tensors counted as resident


def test_isolated_cpu_memory_is_marked_as_following_live_allocations():
    """The fresh-process measurement every profile uses names live-memory tracking in its record, which is how
    tables and plots tell its peaks from older ones (mtbench.measure.memory_method); a plain in-process
    peak_memory (glibc's default threshold) does not."""
    from mtbench.measure import measure_memory_isolated, memory_method

    mem = measure_memory_isolated("lora", "synthetic", 2, torch.device("cpu"), modes=("train",))
    assert mem["train"]["rss_step_mb"] > 0
    assert memory_method({"memory": mem}) == "cpu-live"
    assert memory_method({"memory": {"train": peak_memory(lambda: None, torch.device("cpu"))}}) == "cpu-heap"


def test_fvcore_imports_without_torch_jit_warning():
    """fvcore 0.1.5 scripts its focal loss at import, which recent torch answers with a FutureWarning that
    ``mtbench profile`` printed on stderr; mtbench imports it with that warning filtered (and only that one)."""
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('error', FutureWarning)\n"
            "from mtbench.measure import _fvcore_nn; _fvcore_nn().FlopCountAnalysis\n"
            "warnings.warn('other', FutureWarning)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1] == "FutureWarning: other", res.stderr
    assert "torch.jit.script" not in res.stderr


def test_benchmark_cost_verdict_states_issue_6_targets(monkeypatch):
    """benchmarks/cost.py's verdict: one row per target of a measured method (by name, or NAME@MODE), none for a
    method with options or without targets; met = the ratio rounded as printed is at most the target."""
    cost = _load_benchmark(monkeypatch, "cost")
    ratios = {
        "mtl_full": {"train": 1.0, "inference": 1.0, "memory": 1.0},
        "mtlora": {"train": 1.65, "inference": 1.104, "memory": 1.76},
        "mtlora@task": {"train": 2.0, "inference": 1.2, "memory": 0.85},
        "lora": {"train": 0.84, "inference": 1.03, "memory": 0.69},
        "lora:r=8": {"train": 0.8, "inference": 1.0, "memory": 0.6},
        "tadformer_official": {"train": 1.91, "inference": 1.3049, "memory": 1.93},
    }
    rows = {(m, q): (ratio, target, met) for m, q, ratio, target, met in cost.verdict(ratios)}
    assert rows == {
        ("mtlora", "train"): (1.65, 1.0, False),
        ("mtlora", "inference"): (1.104, 1.10, True),  # prints as 1.10
        ("mtlora", "memory"): (1.76, 1.0, False),
        ("mtlora@task", "train"): (2.0, 1.0, False),
        ("mtlora@task", "inference"): (1.2, 1.10, False),
        ("mtlora@task", "memory"): (0.85, 1.0, True),
        ("lora", "memory"): (0.69, 1.0, True),
        ("tadformer_official", "train"): (1.91, 1.3, False),
        ("tadformer_official", "inference"): (1.3049, 1.3, True),
    }


def test_benchmark_cost_script_prints_table_and_targets():
    """benchmarks/cost.py run as a user runs it (small size, one round): the cost table has mtl_full at ratio 1 and
    the targets table repeats lora's memory ratio from it with the verdict that ratio implies."""
    import re

    res = _run_benchmark("cost", "--methods", "lora", "--size", "224", "--rounds", "1")
    assert res.returncode == 0, res.stderr
    table = {r[0]: r[1:] for r in (
        [c.strip() for c in line.split("|")[1:-1]] for line in res.stdout.split("Issue 6 targets")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| method"))}
    assert list(table) == ["mtl_full", "lora"]
    assert table["mtl_full"][1] == table["mtl_full"][4] == table["mtl_full"][7] == "1.00"
    assert "Issue 6 targets (set for --size 448 --threads 2, not this run's)" in res.stdout
    memory = table["lora"][7]
    assert re.search(rf"^\| lora \| memory \| {memory} \| 1\.00 \| {'yes' if float(memory) <= 1 else 'no'} \|$",
                     res.stdout, re.M)
