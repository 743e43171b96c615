"""Paper-style tables regenerated from result files only.

``table`` builds the papers' Table 1 layout — Method | one column per task's primary metric with its arrow | Δm (%)
| #TP (M) — from the result files of one dataset, one row per run identity (:mod:`mtbench.identity`: runs that
differ only in the seed), averaging its seeds (mean, with the seed count), and writes it as Markdown and LaTeX.
Warnings about a row (runs from different commits or a dirty tree, a setting other than the Δm references') are in
``table.attrs["warnings"]``, one line per row. Δm is recomputed from each result's test metrics against the dataset's current single-task
references (:func:`mtbench.results.load_references`), so tables stay right after references are (re)measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mtbench.errors import MtbenchError
from mtbench.identity import identity_of
from mtbench.metrics import delta_m, primary_higher_is_better
from mtbench.results import load_references, load_results
from mtbench.tasks import PRIMARY_METRIC

TASK_TITLES = {"semseg": "SemSeg", "human_parts": "Parts", "sal": "Sal", "normals": "Normals", "depth": "Depth",
               "edge": "Edge"}


def column_title(task: str) -> str:
    metric, higher = PRIMARY_METRIC[task]
    return f"{TASK_TITLES.get(task, task)} ({metric} {'↑' if higher else '↓'})"


def results_frame(results_dir: str | Path, dataset: str) -> pd.DataFrame:
    """One row per result file: label, method, key (the result directory), seed, tasks, primary metrics, #TP.

    Raises:
        MtbenchError: no result files for the dataset.
    """
    rows = []
    for path, r in load_results(results_dir, dataset):
        ident = identity_of(r)
        row = {"label": ident.label(), "method": r.run.method, "key": ident.path_key(), "seed": r.run.seed,
               "tasks": tuple(r.run.tasks), "tp": r.params["trainable"], "path": str(path), "identity": ident.key(),
               "setting": json.dumps(ident.setting(), sort_keys=True, default=str), "commit": r.run.git_commit,
               "dirty": bool(r.run.git_dirty),
               "options": tuple(sorted((k, str(v).lower()) for k, v in r.run.options.items())),
               "device": r.train.device}
        row.update({f"m:{t}": v for t, v in r.primary.items()})
        rows.append(row)
    if not rows:
        raise MtbenchError(f"no result files for dataset {dataset!r} under {str(results_dir)!r}; run `mtbench run` "
                           "first")
    return pd.DataFrame(rows)


def build_table(results_dir: str | Path, dataset: str) -> tuple[pd.DataFrame, str | None]:
    """The paper-style table (a DataFrame indexed by method label) and the reference source used for Δm."""
    from mtbench.registry import list_methods

    df = results_frame(results_dir, dataset)
    task_order = [t for t in PRIMARY_METRIC if f"m:{t}" in df.columns]
    refs, ref_source = load_references(dataset)
    ref_setting = references_setting(dataset)
    order = {m.name: i for i, m in enumerate(list_methods())}
    out_rows, warnings, stds = [], [], {}
    for _, g in df.groupby("identity", sort=False):
        label, key, tasks = g["label"].iloc[0], g["key"].iloc[0], g["tasks"].iloc[0]
        row = {"Method": label, "_order": (order.get(g["method"].iloc[0], 99), key)}
        warnings += [(row["_order"], w) for w in row_warnings(label, g, ref_setting)]
        prim, sd = {}, {}
        for t in tasks:
            prim[t] = float(g[f"m:{t}"].mean())
            row[column_title(t)] = prim[t]
            sd[column_title(t)] = float(g[f"m:{t}"].std(ddof=1)) if len(g) > 1 else float("nan")
        if refs and all(t in refs for t in tasks):
            higher = primary_higher_is_better(tasks)
            row["Δm (%)"] = delta_m(prim, refs, higher)  # Δm is linear: Δm of the means = mean of the runs' Δm
            per_run = pd.Series([delta_m({t: float(r[f"m:{t}"]) for t in tasks}, refs, higher)
                                 for _, r in g.iterrows()])
            sd["Δm (%)"] = float(per_run.std(ddof=1)) if len(g) > 1 else float("nan")
        else:
            row["Δm (%)"] = float("nan")
            sd["Δm (%)"] = float("nan")
        row["#TP (M)"] = float(g["tp"].mean()) / 1e6
        row["seeds"] = len(g)
        stds[label] = sd
        out_rows.append(row)
    table = pd.DataFrame(out_rows).sort_values("_order").drop(columns="_order").set_index("Method")
    cols = [column_title(t) for t in task_order if column_title(t) in table.columns]
    table = table[cols + ["Δm (%)", "#TP (M)", "seeds"]]
    table.attrs["warnings"] = [w for _, w in sorted(warnings, key=lambda x: x[0])]
    table.attrs["std"] = stds
    return table, ref_source


def within_noise(mean_a: float, std_a: float, mean_b: float, std_b: float) -> bool:
    """True when the intervals mean ± std of two rows overlap (a difference the seeds cannot resolve).

    Rows with fewer than two seeds have no interval (NaN std) and are never within noise.
    """
    if any(pd.isna(x) for x in (mean_a, std_a, mean_b, std_b)):
        return False
    return abs(mean_a - mean_b) <= std_a + std_b


def noise_marks(table: pd.DataFrame) -> dict[tuple[str, str], bool]:
    """``{(row label, column): True}`` for every cell within noise of its column's best row (better by mean:
    higher, or lower for ↓ columns); the best row itself is not marked. Uses ``table.attrs["std"]``."""
    stds = table.attrs.get("std", {})
    marks = {}
    for c in table.columns:
        if c in ("#TP (M)", "seeds"):
            continue
        col = table[c].dropna()
        if col.empty:
            continue
        best = col.idxmin() if c.endswith("↓)") else col.idxmax()
        for label, v in col.items():
            if label != best and within_noise(v, stds.get(label, {}).get(c, float("nan")), col[best],
                                              stds.get(best, {}).get(c, float("nan"))):
                marks[(label, c)] = True
    return marks


NOISE_NOTE = "≈: within noise of the column's best row (their mean ± std intervals over seeds overlap)."


def references_setting(dataset: str) -> dict | None:
    """The setting (identity without the method) of the single-task runs behind the dataset's Δm references, or
    None when the references are not mtbench runs (the papers' numbers) or do not exist."""
    from mtbench.identity import reference_identity
    from mtbench.results import REFERENCE_FILE

    if not REFERENCE_FILE.is_file():
        return None
    entry = json.loads(REFERENCE_FILE.read_text()).get(dataset)
    return reference_identity(entry, dataset).setting() if entry else None


def row_warnings(label: str, g: pd.DataFrame, ref_setting: dict | None) -> list[str]:
    """At most one line for a row's runs: different mtbench commits, a dirty tree, a setting other than the Δm
    references'."""
    problems = []
    commits = sorted({c[:8] for c in g["commit"] if c})
    if len(commits) > 1:
        problems.append(f"runs from {len(commits)} mtbench commits ({', '.join(commits)})")
    if g["dirty"].any():
        problems.append(f"{int(g['dirty'].sum())} of {len(g)} runs from a dirty tree")
    if ref_setting is not None:
        setting = json.loads(g["setting"].iloc[0])
        diff = [f"{k} {_short(setting[k])} vs {_short(ref_setting.get(k))}" for k in setting
                if setting[k] != ref_setting.get(k)]
        if diff:
            problems.append("setting differs from the Δm references' (" + "; ".join(diff) + ")")
    return [f"{label}: " + "; ".join(problems)] if problems else []


def _short(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={x}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "+".join(map(str, v))
    return str(v)


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Round as the papers print: metrics and Δm to 2 decimals (Δm signed), #TP to 2 decimals (3 below 1M).

    A row of several seeds shows ``mean ± std`` (sample standard deviation over its seeds), and ``≈`` after a cell
    within noise of its column's best row (:func:`noise_marks`, :data:`NOISE_NOTE`).
    """
    out = table.copy().astype(object)
    stds = table.attrs.get("std", {})
    marks = noise_marks(table)

    def cell(label, c, v, fmt):
        if pd.isna(v):
            return "—"
        text = format(v, fmt)
        sd = stds.get(label, {}).get(c, float("nan"))
        if not pd.isna(sd):
            text += f" ± {sd:.2f}"
        return text + (" ≈" if marks.get((label, c)) else "")

    for c in table.columns:
        if c == "Δm (%)":
            out[c] = [cell(label, c, v, "+.2f") for label, v in table[c].items()]
        elif c == "Δm reported (%)":
            out[c] = [("—" if pd.isna(v) else f"{v:+.2f}") for v in table[c]]
        elif c in ("#TP (M)", "#TP reported (M)"):
            out[c] = [("—" if pd.isna(v) else f"{v:.2f}" if v >= 1 else f"{v:.3f}") for v in table[c]]
        elif c == "reported in":
            continue
        elif c == "seeds":
            out[c] = [str(int(v)) for v in table[c]]
        else:
            out[c] = [cell(label, c, v, ".2f") for label, v in table[c].items()]
    return out


def write_table(table: pd.DataFrame, out_dir: str | Path, dataset: str, ref_source: str | None) -> list[Path]:
    """Write ``table_{dataset}.md`` and ``table_{dataset}.tex`` under ``out_dir``; returns the paths."""
    from mtbench.results import atomic_write_text

    out_dir = Path(out_dir)
    shown = format_table(table)
    note = (f"Δm against single-task references: {ref_source}." if ref_source else
            "Δm: no single-task references for this dataset yet.")
    if noise_marks(table):
        note += " " + NOISE_NOTE
    md = shown.to_markdown(disable_numparse=True, colalign=["left"] + ["right"] * len(shown.columns)) + "\n\n" \
        + note + "\n"
    tex = shown.to_latex(escape=True, column_format="l" + "r" * len(shown.columns))
    tex = tex.replace("↑", r"$\uparrow$").replace("↓", r"$\downarrow$").replace("Δm", r"$\Delta m$")
    paths = [out_dir / f"table_{dataset}.md", out_dir / f"table_{dataset}.tex"]
    atomic_write_text(paths[0], md)
    atomic_write_text(paths[1], f"% generated by `mtbench table --dataset {dataset}`; {note}\n" + tex)
    return paths


# ------------------------------------------------------------------------------------------ the papers' numbers
#: The numbers the papers print, one row per table row, with paper, table and row (``mtbench/assets``).
REPORTED_FILE = Path(__file__).parent / "assets" / "reported.csv"
#: Columns of :data:`REPORTED_FILE` that hold numbers (the rest name the source).
REPORTED_VALUES = ("semseg", "human_parts", "sal", "normals", "depth", "delta_m", "tp_m", "memory_gb",
                   "time_s_per_batch")


def load_reported(dataset: str | None = None) -> pd.DataFrame:
    """The papers' printed numbers (TADFormer Tables 1-2, TDSS Tables 1-3, MTLoRA Table 1 as cited), as typed in
    from ``shared/papers``: columns ``paper, table, row, dataset, method`` (the mtbench method the row corresponds
    to, empty when none), ``options`` (``k=v;...``), the value columns of :data:`REPORTED_VALUES` (NaN where the
    table has no such column) and ``note``. Optionally only one dataset's rows."""
    df = pd.read_csv(REPORTED_FILE, dtype=str, keep_default_na=False)
    for c in REPORTED_VALUES:
        df[c] = pd.to_numeric(df[c].replace("", float("nan")))
    if dataset is not None:
        df = df[df["dataset"] == dataset]
    return df.reset_index(drop=True)


def _reported_options(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split(";") if kv)


def reported_for(method: str, options: dict[str, str], dataset: str) -> pd.DataFrame:
    """Reported rows of ``dataset`` for an mtbench method whose configuration has every option the row states
    (``options`` as lower-case strings, e.g. ``{"r": "16", ...}``)."""
    df = load_reported(dataset)
    keep = [i for i, r in df.iterrows() if r["method"] == method
            and all(options.get(k) == v for k, v in _reported_options(r["options"]).items())]
    return df.loc[keep]


def add_reported_columns(table: pd.DataFrame, results_dir: str | Path, dataset: str) -> pd.DataFrame:
    """Beside the measured Δm and #TP, the values a paper prints for the same method, configuration and dataset:
    columns ``Δm reported (%)``, ``#TP reported (M)`` and ``reported in`` (paper and table; the first matching row
    of the first table). These are separate columns: a reported number never enters a computed one. Rows without a
    reported twin get NaN / empty; when no row has one, ``table`` is returned unchanged."""
    df = results_frame(results_dir, dataset)
    dm, tp, src = [], [], []
    for label in table.index:
        g = df[df["label"] == label]
        rep = reported_for(g["method"].iloc[0], dict(g["options"].iloc[0]), dataset) if len(g) else pd.DataFrame()
        rep = rep[rep["table"].str.startswith("Table 1")] if len(rep) else rep
        if len(rep):
            r = rep.iloc[0]
            dm.append(r["delta_m"])
            tp.append(r["tp_m"])
            src.append(f"{r['paper']} {r['table']}: {r['row']}")
        else:
            dm.append(float("nan"))
            tp.append(float("nan"))
            src.append("")
    if not any(src):
        return table
    out = table.copy()
    out["Δm reported (%)"] = dm
    out["#TP reported (M)"] = tp
    out["reported in"] = src
    return out


# ------------------------------------------------------------------------------------------ the cost table
def build_cost_table(results_dir: str | Path, dataset: str, device: str | None = None) -> pd.DataFrame:
    """TDSS Table 3's layout from result and profile files: Method | #TP (M) | train memory (MB) | time per batch
    (ms) | GFLOPs | latency (ms) | Δm (%), plus the profile's device and batch size.

    Each method's profile is the ``profile_{device}.json`` beside its first result file
    (:func:`mtbench.results.profile_for_result`; CUDA preferred when ``device`` is None); cost columns are NaN for
    a method without one. Memory is the training step's peak over the memory before it (RSS on CPU, allocated on
    CUDA), GFLOPs = 2 x fvcore GMACs of one image, latency the median of inference at batch 1. The ``profile`` column
    says "RSS incl. freed heap" for a CPU profile written before live-memory tracking
    (:func:`mtbench.measure.memory_method` ``cpu-heap``), whose peak reads high; ``attrs["warnings"]`` (as
    :func:`build_table`'s) holds the one-line warning when CPU peaks of both kinds are compared.

    Raises:
        MtbenchError: no result files; an invalid profile file.
    """
    from mtbench.measure import memory_method, mixed_memory_warning, train_peak_mb
    from mtbench.results import load_profile, profile_for_result

    table, _ = build_table(results_dir, dataset)
    df = results_frame(results_dir, dataset)
    rows, memory_methods = [], []
    for label in table.index:
        g = df[df["label"] == label]
        path = profile_for_result(g["path"].iloc[0], device)
        row = {"Method": label, "#TP (M)": table.loc[label, "#TP (M)"]}
        if path is not None:
            p = load_profile(path)
            row["train memory (MB)"] = train_peak_mb(p)
            row["time per batch (ms)"] = p["latency"]["train_step"]["median_ms"]
            row["GFLOPs"] = p["flops"]["inference"]["gflops"]
            row["latency (ms)"] = p["latency"]["inference_batch1"]["median_ms"]
            memory_methods.append(memory_method(p))
            heap = ", RSS incl. freed heap" if memory_methods[-1] == "cpu-heap" else ""
            row["profile"] = f"{p['env']['device']}, batch {p['batch_size']}{heap}"
        else:
            row.update({"train memory (MB)": float("nan"), "time per batch (ms)": float("nan"),
                        "GFLOPs": float("nan"), "latency (ms)": float("nan"), "profile": "none"})
        row["Δm (%)"] = table.loc[label, "Δm (%)"]
        rows.append(row)
    out = pd.DataFrame(rows).set_index("Method")[["#TP (M)", "train memory (MB)", "time per batch (ms)", "GFLOPs",
                                                   "latency (ms)", "Δm (%)", "profile"]]
    warning = mixed_memory_warning(memory_methods)
    out.attrs["warnings"] = [warning] if warning else []
    return out


def format_cost_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for printing: #TP as :func:`format_table`, memory and times to whole units, GFLOPs to 3 digits."""
    out = table.copy().astype(object)
    for c in table.columns:
        if c == "profile":
            continue
        if c == "Δm (%)":
            out[c] = [("—" if pd.isna(v) else f"{v:+.2f}") for v in table[c]]
        elif c == "#TP (M)":
            out[c] = [f"{v:.2f}" if v >= 1 else f"{v:.3f}" for v in table[c]]
        elif c == "GFLOPs":
            out[c] = [("—" if pd.isna(v) else f"{v:.3g}") for v in table[c]]
        else:
            out[c] = [("—" if pd.isna(v) else f"{v:.1f}") for v in table[c]]
    return out
