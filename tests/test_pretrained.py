"""The packaged embedded Swin weights: present, small, loadable, and better than random init for a frozen encoder."""

from __future__ import annotations

import pytest
import torch

from mtbench.swin import EMBEDDED_WEIGHTS, create_backbone


def test_embedded_weights_are_packaged_and_load():
    assert EMBEDDED_WEIGHTS.is_file()
    assert EMBEDDED_WEIGHTS.stat().st_size <= 10 * 2**20
    from safetensors import safe_open

    with safe_open(str(EMBEDDED_WEIGHTS), "pt") as f:
        meta = f.metadata()
    assert "upstream" in meta["objective"] and meta["command"].startswith("mtbench pretrain")
    from safetensors.torch import load_file

    stored = list(load_file(str(EMBEDDED_WEIGHTS)).values())  # Microsoft key layout, mapped by timm on load
    for seed in (0, 1):  # the loaded values do not depend on the random init they replace
        torch.manual_seed(seed)
        pre = create_backbone("swin_embedded", pretrained=True)
        for name, p in pre.named_parameters():
            assert any(t.shape == p.shape and torch.equal(t, p) for t in stored), f"{name} is not the packaged tensor"
    rnd = create_backbone("swin_embedded", pretrained=False)
    p_pre = dict(pre.named_parameters())
    assert any(not torch.equal(p, p_pre[n]) for n, p in rnd.named_parameters())


@pytest.mark.slow
def test_frozen_encoder_is_better_with_pretrained_weights(tmp_path):
    """decoder_only trained briefly: pretrained weights beat random init on every task (minutes on CPU)."""
    from mtbench.runner import RunRequest, build_datasets, plan, resolve_device, run_one

    scores = {}
    for init in ("pretrained", "random"):
        req = RunRequest(methods="decoder_only", init=init, epochs=3, results_dir=str(tmp_path), train_size=800)
        tasks, runs, recipe = plan(req)
        result = run_one(req, tasks, runs[0], recipe, build_datasets(req, tasks), resolve_device("cpu"))
        scores[init] = result.primary
    for task in ("semseg", "human_parts", "sal"):
        assert scores["pretrained"][task] > scores["random"][task] + 2.0
    assert scores["pretrained"]["normals"] < scores["random"]["normals"]
