"""Inter-task attention decoders (mtbench.intertask) and their place in the decoder registry."""

from __future__ import annotations

import pytest
import torch
from cli_entry import mtbench, mtbench_many

from mtbench.decoders import resolve_decoder
from mtbench.errors import MtbenchError
from mtbench.intertask import DeformableInterTaskMixer, InterTaskAttention
from mtbench.measure import count_macs


def test_one_task_zero_offsets_is_the_bilinear_read_out():
    torch.manual_seed(0)
    mixer = DeformableInterTaskMixer(dim=4, heads=2, num_tasks=1, points=3)
    attn = mixer.attn
    torch.nn.init.zeros_(attn.sampling_offsets.bias)  # weights already 0: every point at the query's own pixel
    h, w = 3, 4
    tokens = torch.randn(2, h * w, 4)
    expected = attn.output_proj(attn.value_proj(tokens))  # bilinear read at a pixel centre = the pixel's value
    assert torch.allclose(mixer(tokens, 1, h, w), expected, atol=1e-5)

    # half a pixel to the right: the mean of the pixel and its right neighbour (zero beyond the last column)
    attn.sampling_offsets.bias.data.view(2, 1, 3, 2)[..., 0] = 0.5
    v = attn.value_proj(tokens).view(2, h, w, 4)
    right = torch.cat([v[:, :, 1:], torch.zeros(2, h, 1, 4)], dim=2)
    expected = attn.output_proj(((v + right) / 2).reshape(2, h * w, 4))
    assert torch.allclose(mixer(tokens, 1, h, w), expected, atol=1e-5)


def _feats(tasks, B=2, sizes=((8, 8), (4, 4), (2, 2), (2, 2)), ch=(18, 36, 72, 144)):
    return {t: [torch.randn(B, c, *s) for c, s in zip(ch, sizes)] for t in tasks}


@pytest.mark.parametrize("mixer", ["mha", "deformable"])
def test_identity_at_init_then_mixes_tasks(mixer):
    torch.manual_seed(0)
    tasks = ["semseg", "depth", "sal"]
    mod = InterTaskAttention(tasks, (18, 36, 72, 144), mixer=mixer)
    feats = _feats(tasks)
    out, aux = mod(feats)
    assert aux == {} and all(torch.equal(out[t][i], feats[t][i]) for t in tasks for i in range(4))
    torch.nn.init.normal_(mod.out_proj.weight, std=0.1)
    out, _ = mod(feats)
    changed = {t: out[t][0] for t in tasks}
    feats2 = {t: [f.clone() for f in fs] for t, fs in feats.items()}
    feats2["depth"][0] += 1.0  # another task's map changes semseg's output: information crosses tasks
    out2, _ = mod(feats2)
    assert not torch.allclose(out2["semseg"][0], changed["semseg"])
    assert all(torch.equal(out2[t][i], feats[t][i]) for t in tasks for i in (1, 2, 3))


def test_cost_full_quadratic_deformable_linear_in_tasks():
    def flops(mixer, T):
        tasks = [f"t{i}" for i in range(T)]
        mod = InterTaskAttention(tasks, (18, 36, 72, 144), mixer=mixer)
        feats = _feats(tasks, B=1, sizes=((12, 12), (6, 6), (3, 3), (3, 3)))

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mod = mod

            def forward(self, *maps):
                return self.mod({t: [m, *feats[t][1:]] for t, m in zip(tasks, maps)})[0][tasks[0]][0]

        return count_macs(Wrap(), tuple(feats[t][0] for t in tasks))

    n = 144
    mha2, mha4 = flops("mha", 2), flops("mha", 4)
    # the attention term is (T*N)^2 * 2*dim; everything else is linear in T*N
    assert mha4 - 2 * mha2 == (4 * n) ** 2 * 128 - 2 * (2 * n) ** 2 * 128
    d2, d4 = flops("deformable", 2), flops("deformable", 4)
    # T*N queries, each with offsets/weights/samples on T maps: the T^2 term is N*T^2*(heads*points*3*dim +
    # 4*dim*points) (offset and weight linears, 4 MACs per bilinear sample); the rest is linear in T*N
    assert d4 - 2 * d2 == n * (4 ** 2 - 2 * 2 ** 2) * (4 * 4 * 3 * 64 + 4 * 64 * 4)
    assert d4 < mha4


def test_registry_names():
    spec = resolve_decoder("inter_task_deformable", "swin_embedded")
    assert spec.name == "hrnet_270+inter_task_deformable"
    assert resolve_decoder(spec.name, "swin_embedded").name == spec.name
    assert resolve_decoder("mtlora_hrnet+inter_task_mha", "swin_embedded").name == "mtlora_hrnet+inter_task_mha"
    with pytest.raises(MtbenchError, match="inter_task_deformable"):
        resolve_decoder("hrnet_270+nope", "swin_embedded")


def _cli(*args):
    return mtbench(*args, timeout=600)


def test_interaction_cost_command_writes_json_and_plot(tmp_path):
    import json

    res = _cli("interaction-cost", "--tasks", "2,3", "--sizes", "64x64", "--repeats", "1", "--device", "cpu",
               "--out", str(tmp_path / "cost"))
    assert res.returncode == 0, res.stderr
    rows = json.loads((tmp_path / "cost.json").read_text())
    assert {(r["decoder"].split("+")[1], r["tasks"]) for r in rows} == {
        (d, t) for d in ("inter_task_mha", "inter_task_deformable") for t in (2, 3)}
    assert all(r["macs"] > 0 and r["gflops"] == 2 * r["macs"] / 1e9 and r["latency_ms"] > 0 for r in rows)
    assert (tmp_path / "cost.png").stat().st_size > 10_000
    assert "T=3: mtlora_hrnet+inter_task_mha / mtlora_hrnet+inter_task_deformable" in res.stdout


BAD_INPUT = [
    (["interaction-cost", "--tasks", "x..8"], "--tasks 'x..8'"),
    (["interaction-cost", "--sizes", "448"], "--sizes '448'"),
    (["interaction-cost", "--decoder", "nosuch"], "unknown decoder 'nosuch'"),
    (["interaction-cost", "--tasks", "2,2"], "--tasks '2,2' / --sizes '448x448,448x576': a value is given twice"),
    (["interaction-cost", "--decoder", "inter_task_mha,mtlora_hrnet+inter_task_mha"], "names one decoder twice"),
    (["interaction-cost", "--out", ""], "--out '' is not an output stem"),
    (["interaction-cost", "--decoder", "inter_task_mha,hrnet_270"],
     "--decoder hrnet_270: no interaction stage to measure (identity); decoders with one: tsai, inter_task_mha"),
    (["run", "--methods", "mtlora", "--decoder", "hrnet_270+nosuch"], "unknown decoder 'hrnet_270+nosuch'"),
]


def test_bad_input_is_one_line_exit_2():
    """Each case through the installed entry point (one process for the batch: :func:`cli_entry.mtbench_many`)."""
    for (args, message), res in zip(BAD_INPUT, mtbench_many(*(a for a, _ in BAD_INPUT)), strict=True):
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], \
            (args, res.stderr)
