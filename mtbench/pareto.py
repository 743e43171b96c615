"""Cost-accuracy figures: Δm against #TP (TADFormer Fig. 1), GFLOPs, training memory and latency, with the Pareto
front, drawn from result and profile files only (matplotlib + seaborn).

:func:`pareto_front` is a pure function. :func:`cost_points` joins each result's Δm (recomputed as in
``mtbench table``) with the profile beside it (:func:`mtbench.results.profile_for_result`); the cost numbers come
from :mod:`mtbench.measure` through those files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from mtbench.errors import MtbenchError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The x axes ``mtbench plot --x`` knows: column, axis label with unit, file suffix.
AXES = {
    "tp": ("tp_m", "#TP (M trainable parameters)"),
    "gflops": ("gflops", "GFLOPs per image (= 2 x fvcore GMACs, inference)"),
    "memory": ("memory_mb", "training-step peak memory (MB)"),
    "latency": ("latency_ms", "inference latency, batch 1 (ms, median)"),
}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal points when minimising cost ``x`` and maximising ``y`` (Δm).

    A point is on the front unless another point is at most as costly and at least as good, and strictly better in
    one of the two. Equal points are all kept. Points with a NaN coordinate are never on the front.

    Args:
        points: ``(x, y)`` pairs.

    Returns:
        indices into ``points``, sorted by increasing ``x`` (then decreasing ``y``).
    """
    ok = [i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))]
    front = []
    for i in ok:
        xi, yi = points[i]
        dominated = any(points[j][0] <= xi and points[j][1] >= yi and (points[j][0] < xi or points[j][1] > yi)
                        for j in ok if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _group(label: str) -> str:
    """A method's configurations share a line: the label without its option list, e.g. ``mtlora (r=32)`` ->
    ``mtlora``; variants such as ``decoder_only [random init]`` stay apart."""
    import re

    return re.sub(r" \([^)]*\)", "", label).strip()


def cost_points(results_dir: str | Path, dataset: str, reported: bool = False) -> tuple[pd.DataFrame, str]:
    """One row per measured configuration (label, method = its line group, Δm, tp_m, gflops, memory_mb, latency_ms,
    memory_method = :func:`mtbench.measure.memory_method` of its profile, reported=False) and, with ``reported``, one
    per reported row of the papers for this dataset (Δm and #TP; training memory from TDSS Table 3, GB -> MB;
    memory_method ``reported``, reported=True). Also the device description of the profiles used.

    Raises:
        MtbenchError: nothing to plot (no result files and, with ``reported``, no reported rows).
    """
    from mtbench.measure import memory_method, train_peak_mb
    from mtbench.report import build_table, load_reported, results_frame
    from mtbench.results import load_profile, profile_for_result

    rows, devices = [], set()
    try:
        table, _ = build_table(results_dir, dataset)
        df = results_frame(results_dir, dataset)
    except MtbenchError:
        if not reported:
            raise
        table, df = None, None
    if table is not None:
        for label in table.index:
            g = df[df["label"] == label]
            row = {"label": label, "method": _group(label), "delta_m": table.loc[label, "Δm (%)"],
                   "tp_m": table.loc[label, "#TP (M)"], "gflops": math.nan, "memory_mb": math.nan,
                   "latency_ms": math.nan, "memory_method": "none", "reported": False}
            path = profile_for_result(g["path"].iloc[0])
            if path is not None:
                p = load_profile(path)
                row.update(gflops=p["flops"]["inference"]["gflops"], memory_mb=train_peak_mb(p),
                           latency_ms=p["latency"]["inference_batch1"]["median_ms"], memory_method=memory_method(p))
                devices.add(f"{p['env']['device_name']} ({p['env']['device']}, {p['env']['threads']} threads)")
            rows.append(row)
    if reported:
        rep = load_reported(dataset)
        for _, r in rep.drop_duplicates(subset=["row", "delta_m", "tp_m", "memory_gb"]).iterrows():
            if math.isnan(r["delta_m"]):
                continue
            rows.append({"label": f"{r['row']} [{r['paper']} {r['table']}]", "method": r["method"] or r["row"],
                         "delta_m": r["delta_m"], "tp_m": r["tp_m"], "gflops": math.nan,
                         "memory_mb": r["memory_gb"] * 1024, "latency_ms": math.nan, "memory_method": "reported",
                         "reported": True})
    if not rows:
        raise MtbenchError(f"nothing to plot for dataset {dataset!r} under {str(results_dir)!r}")
    return pd.DataFrame(rows), "; ".join(sorted(devices)) or "no profiles"


#: Markers of the cost plots; 7 is coprime with the 10 colours of ``tab10``, so :func:`method_styles` gives
#: ``10 * 7 = 70`` distinct (colour, marker) pairs.
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def method_styles(methods: list[str]) -> dict[str, tuple[tuple[float, float, float], str]]:
    """``{method: (RGB colour, marker)}`` for the legend of a cost plot, in the order given: method ``i`` gets colour
    ``i mod 10`` and marker ``i mod 7``, so no two of the first 70 methods share both (the registry has 24 names).
    Two methods ten places apart share a colour and differ in marker.

    Raises:
        MtbenchError: more than 70 methods (their styles would repeat).
    """
    import seaborn as sns

    palette = sns.color_palette("tab10")  # 10 RGB tuples
    if len(methods) > len(palette) * len(MARKERS):
        raise MtbenchError(f"cannot give {len(methods)} methods distinct plot styles; at most "
                           f"{len(palette) * len(MARKERS)} (plot fewer result directories)")
    return {m: (palette[i % len(palette)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(methods)}


def cost_figure(points: pd.DataFrame, x: str, dataset: str, device: str) -> Figure:
    """Draw Δm against one cost axis and return the matplotlib ``Figure`` (the caller saves and closes it).

    Measured points are filled, reported ones hollow and labelled "(reported)"; the configurations of one method
    (e.g. its ranks) are joined by a line in order of cost. The Pareto front of the measured points is drawn as a step
    line and its members labelled; adjustText moves the labels off each other and off the markers, in a fixed number of
    iterations (its default 1 s time limit would make where they go depend on the machine's speed).

    Each method's (colour, marker) pair (:func:`method_styles`) is chosen over *all* methods in ``points``, not only
    those with this axis's cost, so a method looks the same in the four figures of one ``mtbench plot``.

    Raises:
        MtbenchError: unknown axis, no point with both Δm and this cost, or more than 70 methods.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from adjustText import adjust_text

    if x not in AXES:
        raise MtbenchError(f"unknown --x {x!r}; valid: {', '.join(AXES)}")
    col, xlabel = AXES[x]
    style = method_styles(list(dict.fromkeys(points["method"])))
    pts = points.dropna(subset=[col, "delta_m"])
    if pts.empty:
        raise MtbenchError(f"no point has both Δm and {col} for dataset {dataset!r} (run `mtbench profile` for the "
                           "methods' costs, and train them for Δm)")
    methods = list(dict.fromkeys(pts["method"]))
    sns.set_theme(style="whitegrid")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if x == "tp" or (pts[col] > 0).all() and pts[col].max() / max(pts[col].min(), 1e-12) > 30:
        ax.set_xscale("log")  # before the labels, which adjustText places in display coordinates
    labels = []
    for m in methods:
        color, marker = style[m]
        for rep in (False, True):
            g = pts[(pts["method"] == m) & (pts["reported"] == rep)].sort_values(col)
            if g.empty:
                continue
            if len(g) > 1:
                ax.plot(g[col], g["delta_m"], color=color, lw=1, ls="--" if rep else "-", alpha=0.7)
            ax.scatter(g[col], g["delta_m"], s=60, marker=marker, label=f"{m}{' (reported)' if rep else ''}",
                       facecolors="none" if rep else color, edgecolors=color, linewidths=1.5, zorder=3)
            if rep:  # one label per name and point (a row two tables print alike is drawn once)
                for (name, x_, y_), _ in g.groupby([g["label"].str.split(" [", regex=False).str[0], col, "delta_m"],
                                                   sort=False):
                    labels.append(ax.text(x_, y_, f"{name} (reported)", fontsize=6, color=color))
    measured = pts[~pts["reported"]].reset_index(drop=True)
    if len(measured):
        idx = pareto_front(list(zip(measured[col], measured["delta_m"])))
        front = measured.loc[idx]
        ax.step(front[col], front["delta_m"], where="post", color="black", lw=1.2, alpha=0.6,
                label="Pareto front (measured)")
        labels += [ax.text(r[col], r["delta_m"], r["label"], fontsize=8) for _, r in front.iterrows()]
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Δm (%) vs single-task")
    ax.set_title(f"{dataset}: Δm vs {x} — {device}", fontsize=9)
    n_entries = len(ax.get_legend_handles_labels()[1])
    if n_entries > 8:  # many methods: legend outside the axes
        fig.set_size_inches(11, 6)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n_entries <= 30 else 2)
    else:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    if labels:  # after the layout, so the labels are placed in the final axes
        # away from every marker; a fixed number of steps, not adjustText's default 1 s, so runs agree
        adjust_text(labels, x=pts[col].to_numpy(), y=pts["delta_m"].to_numpy(), ax=ax, iter_lim=500,
                    force_static=(0.5, 1.0), expand=(1.3, 1.8),
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    return fig


def plot_cost(points: pd.DataFrame, x: str, dataset: str, device: str, out_dir: str | Path) -> list[Path]:
    """Draw Δm against one cost axis (:func:`cost_figure`) and write ``pareto_{dataset}_{x}.png`` and ``.pdf``
    under ``out_dir``, each atomically.

    Raises:
        MtbenchError: as :func:`cost_figure`.
    """
    import io

    import matplotlib.pyplot as plt

    from mtbench.results import atomic_write_bytes

    fig = cost_figure(points, x, dataset, device)
    paths = []
    for ext in ("png", "pdf"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=110)
        path = Path(out_dir) / f"pareto_{dataset}_{x}.{ext}"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths
