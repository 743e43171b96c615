"""Evaluation of saved models (``mtbench eval``): rebuild a result's method, load its state, recompute the metrics.

The method, options, backbone, initialisation, dataset and tasks come from the result file; the trained state is
the ``.safetensors`` beside it (or ``--state PATH``, e.g. a model trained elsewhere with the same method). The
recomputed metrics are compared with the ones stored in the file (the test metrics for ``--split test``, the
selected epoch's validation metrics for ``--split val``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Absolute difference below which a recomputed metric counts as reproduced (the 4th decimal of a percentage).
TOLERANCE = 5e-5


@dataclass
class EvalReport:
    """What :func:`evaluate_result` found.

    Attributes:
        label: the result's table label.
        n_images: images evaluated.
        metrics: recomputed ``{task: {metric: value}}``.
        rows: one ``{"task", "metric", "recomputed", "stored", "diff"}`` per metric (``stored``/``diff`` None when the
            file has no stored value for it).
        max_abs_diff: largest absolute difference to a stored value (0 when none is stored).
        summary: one line for the user.
    """

    label: str
    n_images: int
    metrics: dict[str, dict[str, float]]
    rows: list[dict] = field(default_factory=list)
    max_abs_diff: float = 0.0
    summary: str = ""


def evaluate_result(result: str | Path, split: str = "test", data_root: str | None = None, state: str | None = None,
                    device: str = "auto", batch_size: int = 32) -> EvalReport:
    """Recompute the metrics of a result file's model on ``split``.

    Raises:
        MtbenchError: missing result or state file, a state that does not fit the method, or missing data.
    """
    import torch

    from mtbench.data import build_dataset
    from mtbench.identity import identity_of
    from mtbench.runner import load_trained
    from mtbench.tasks import resolve_tasks
    from mtbench.train import evaluate, make_loader, resolve_device

    dev = resolve_device(device)
    model, res = load_trained(result, state)
    tasks = resolve_tasks(res.run.dataset, res.run.tasks)
    data = build_dataset(res.run.dataset, split, root=data_root, tasks=res.run.tasks, seed=0)
    model.to(dev)
    with torch.no_grad():
        metrics, _ = evaluate(model, make_loader(data, batch_size, False, 0, 0), tasks, dev,
                              amp=bool(res.train.recipe.get("amp", False)))
    if split == "test":
        stored = res.metrics
    else:
        best = [h for h in res.train.history if h.get("epoch") == res.train.best_epoch]
        stored = best[0].get("val", {}) if best else {}
    rows, worst = [], 0.0
    for task, values in metrics.items():
        for name, value in values.items():
            ref = stored.get(task, {}).get(name)
            diff = None if ref is None else value - ref
            if diff is not None and diff == diff:  # not NaN
                worst = max(worst, abs(diff))
            rows.append({"task": task, "metric": name, "recomputed": value, "stored": ref, "diff": diff})
    src = state or "the saved state"
    if not any(r["stored"] is not None for r in rows):
        summary = f"no stored {split} metrics to compare with; recomputed from {src}"
    elif worst <= TOLERANCE:
        summary = f"reproduced: every stored {split} metric within {TOLERANCE:g} (largest difference {worst:.2g})"
    else:
        summary = f"DIFFERENT: largest difference {worst:.4f} to the stored {split} metrics ({src})"
    return EvalReport(identity_of(res).label(), len(data), metrics, rows, worst, summary)
