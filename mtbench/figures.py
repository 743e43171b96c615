"""Figures drawn from trained models and result files (matplotlib).

:func:`attention_figure` reproduces the layout of TADFormer's Fig. 7 (CVPR 2025): for a few test images, the task
attention map of each task prompt, overlaid on the image. It works for any method whose model exposes
``task_attention_maps(images, stage) -> {task: [B, H_s, W_s]}``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mtbench.errors import MtbenchError


def attention_figure(model, images: torch.Tensor, out: str | Path, stage: int = 0, title: str = "") -> Path:
    """Draw image | one attention map per task, one row per image, and save it as PNG.

    Args:
        model: a trained model with ``task_attention_maps``.
        images: ``[B,3,H,W]`` normalised images.
        out: output PNG path (parent directories are created).
        stage: backbone stage whose last block's maps are drawn.

    Raises:
        MtbenchError: the method has no task attention maps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtbench.data.transforms import denormalize_image

    if not hasattr(model, "task_attention_maps"):
        raise MtbenchError(f"method {getattr(model, 'method_name', '?')!r} has no task attention maps; "
                           "use a method with task prompts (tadformer)")
    with torch.no_grad():
        maps = model.task_attention_maps(images, stage=stage)
    tasks = list(maps)
    size = images.shape[-2:]
    b = images.shape[0]
    fig, axes = plt.subplots(b, 1 + len(tasks), figsize=(2.2 * (1 + len(tasks)), 2.2 * b), squeeze=False)
    for i in range(b):
        rgb = denormalize_image(images[i])
        axes[i, 0].imshow(rgb)
        for j, t in enumerate(tasks):
            m = F.interpolate(maps[t][i][None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
            m = (m - m.min()) / (m.max() - m.min() + 1e-12)
            axes[i, j + 1].imshow(rgb)
            axes[i, j + 1].imshow(m.numpy(), cmap="jet", alpha=0.55)
            if i == 0:
                axes[i, j + 1].set_title(t, fontsize=9)
        if i == 0:
            axes[i, 0].set_title("image", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def cost_scaling_figure(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """FLOPs and latency versus the number of tasks, one line per (decoder, input size), log scale; saved as PNG.

    Args:
        rows: dicts of :func:`mtbench.measure.interaction_cost` (``decoder, tasks, height, width, flops,
            latency_ms``).
        out: output PNG path (parent directories are created).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    keys = sorted({(r["decoder"], r["height"], r["width"]) for r in rows})
    for dec, h, w in keys:
        sel = sorted((r for r in rows if (r["decoder"], r["height"], r["width"]) == (dec, h, w)),
                     key=lambda r: r["tasks"])
        label = f"{dec.split('+')[-1]} {h}x{w}"
        style = "-" if "mha" in dec else "--"
        axes[0].plot([r["tasks"] for r in sel], [r["gflops"] for r in sel], style, marker="o", label=label)
        axes[1].plot([r["tasks"] for r in sel], [r["latency_ms"] for r in sel], style, marker="o", label=label)
    for ax, name in zip(axes, ("GFLOPs (2 x fvcore's multiply-accumulates)", "latency (ms, batch 1)")):
        ax.set_yscale("log")
        ax.set_xlabel("number of tasks T")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
