"""Upstream pretraining of the embedded small Swin (the stand-in for ImageNet pretraining of Swin-T).

The backbone is trained on the synthetic dataset's ``upstream`` split — rendered from its own seeds, disjoint from
train/val/test — with a weakly supervised objective that is none of the benchmark's tasks: multi-label presence of
each object kind in the cells of an 8x8 and a 4x4 grid (class-balanced BCE) (:func:`mtbench.data.synthetic.grid_presence`), predicted by
1x1 convs from the finest backbone taps at least as large as each grid. The heads are thrown away; the backbone is stored (float16, about
4.6 MB) as ``mtbench/assets/swin_embedded.safetensors`` with the recipe in the file's metadata.

Rerun with ``mtbench pretrain`` (about 7 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtbench.swin import EMBEDDED_SWIN_ARGS, EMBEDDED_WEIGHTS, create_backbone
from mtbench.train import build_scheduler, schedule_step

UPSTREAM_SIZE = 4000


def pretrain_embedded(
    epochs: int = 30,
    out: str | Path | None = None,
    seed: int = 0,
    device: torch.device | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    n: int = UPSTREAM_SIZE,
    log: Callable[[str], None] = print,
) -> tuple[Path, str]:
    """Train the embedded Swin from scratch on the upstream split and save its weights.

    Args:
        epochs: passes over the ``n`` upstream images.
        out: output path (default :data:`mtbench.swin.EMBEDDED_WEIGHTS`).
        seed: torch seed.
        device: training device (CPU default).
        batch_size, lr: AdamW recipe (cosine schedule, 1 warm-up epoch, weight decay 0.05).
        n: number of upstream images.
        log: receives one line per epoch.

    Returns:
        ``(path, summary line)``.
    """
    from safetensors.torch import save_file

    from mtbench.data.synthetic import NUM_KINDS, SyntheticMultiTask, grid_presence

    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    data = SyntheticMultiTask("upstream", n=n, tasks=("semseg",), train_aug=True)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
    backbone = create_backbone("swin_embedded", pretrained=False, drop_path_rate=0.1).to(device)
    # each grid is predicted from the finest tap that is at least as large as the grid (pooled down to it)
    sizes = [64 // (backbone.patch_size * s) for s in (2, 4, 8, 8)]
    tap = {g: max(i for i, sz in enumerate(sizes) if sz >= g) for g in (8, 4)}
    heads = nn.ModuleDict({f"g{g}": nn.Conv2d(backbone.feature_dims[i], NUM_KINDS, 1) for g, i in tap.items()}
                          ).to(device)
    params = list(backbone.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    total = epochs * len(loader)
    warm = len(loader)
    scheduler = build_scheduler(opt, 0.0, warm, total)  # 1 warm-up epoch, cosine to 0
    step = 0
    t0 = time.perf_counter()
    last = ""
    for epoch in range(1, epochs + 1):
        backbone.train()
        run_loss, hits, count = 0.0, 0.0, 0
        for batch in loader:
            schedule_step(scheduler, step)
            images = batch["image"].to(device)
            sem = batch["semseg"].to(device)
            feats = backbone(images)
            loss = 0.0
            for grid, i in tap.items():
                key, feat = f"g{grid}", feats[i]
                logits = heads[key](feat)
                if logits.shape[-1] != grid:
                    logits = F.adaptive_avg_pool2d(logits, grid)
                target = grid_presence(sem, NUM_KINDS, grid)
                # class-balanced BCE (HED weighting): occupied cells are rare, so weight them by the empty fraction
                pos = target.mean().clamp(1e-3, 1 - 1e-3)
                weight = torch.where(target > 0, 1 - pos, pos) * 2
                loss = loss + F.binary_cross_entropy_with_logits(logits, target, weight=weight)
                if grid == 8:  # F1 of the occupied cells, a readable progress number
                    pred = (logits > 0).float()
                    tp = float((pred * target).sum())
                    hits += 2 * tp / max(float(pred.sum() + target.sum()), 1.0) * images.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            step += 1
            run_loss += float(loss.detach()) * images.shape[0]
            count += images.shape[0]
        last = (f"epoch {epoch}/{epochs} loss {run_loss / count:.4f} 8x8-cell F1 {100 * hits / count:.1f}% "
                f"({time.perf_counter() - t0:.0f}s)")
        log(last)
    out = Path(out) if out else EMBEDDED_WEIGHTS
    out.parent.mkdir(parents=True, exist_ok=True)
    # store in timm's key layout (the wrapper's keys plus 'layers.' for the stages) so load_checkpoint reads it
    state = {}
    for k, v in backbone.state_dict().items():
        if k.startswith("stages."):
            k = "layers." + k[len("stages."):]
        if "relative_position_index" in k or "attn_mask" in k:
            continue
        state[k] = v.detach().to(torch.float16).cpu().contiguous()
    meta = {"objective": "multi-label kind presence on 8x8 and 4x4 grids (upstream split)", "epochs": str(epochs),
            "n_images": str(n), "batch_size": str(batch_size), "lr": str(lr), "seed": str(seed),
            "architecture": json.dumps(EMBEDDED_SWIN_ARGS), "final": last,
            "command": f"mtbench pretrain --epochs {epochs} --seed {seed}"}
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.chmod(0o644)
    tmp.replace(out)
    return out, last
