"""Pareto front, cost figures, the cost table and the papers' reported numbers, from result and profile files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from cli_entry import mtbench, mtbench_many

from mtbench.pareto import pareto_front

REFERENCE = Path(__file__).parents[1] / "results" / "reference"


def test_pareto_front_known_points():
    pts = [(1, 0), (2, 1), (2, 0.5), (3, 1), (0.5, -5), (4, 3), (math.nan, 10), (5, 2)]
    # (2,0.5) and (3,1) are dominated by (2,1); (5,2) by (4,3); the NaN point is never on the front
    assert pareto_front(pts) == [4, 0, 1, 5]


def test_pareto_front_keeps_equal_points_and_handles_one_point():
    assert pareto_front([(1, 1), (1, 1), (2, 0)]) == [0, 1]
    assert pareto_front([(3, -2)]) == [0]
    assert pareto_front([]) == []


def test_each_plotted_method_gets_its_own_colour_and_marker():
    """The reference results plot 20 methods: with one 10-step cycle of colours and markers, tadformer was drawn as
    compacter and single_task as ditask. Every registered name, and every method of the reference plot, now gets a
    (colour, marker) pair of its own; methods ten places apart share a colour, not a marker."""
    from mtbench.errors import MtbenchError
    from mtbench.pareto import cost_points, method_styles
    from mtbench.registry import valid_names

    for methods in (valid_names(), list(dict.fromkeys(cost_points(REFERENCE, "synthetic")[0]["method"]))):
        assert len(methods) > 10
        styles = method_styles(methods)
        assert len(set(styles.values())) == len(methods), styles
        assert styles[methods[0]][0] == styles[methods[10]][0] and styles[methods[0]][1] != styles[methods[10]][1]
    assert len(set(method_styles([f"m{i}" for i in range(70)]).values())) == 70
    with pytest.raises(MtbenchError, match="cannot give 71 methods distinct plot styles; at most 70"):
        method_styles([f"m{i}" for i in range(71)])


def _legend_styles(fig) -> dict[str, tuple]:
    """{legend label: (face colour RGBA, marker outline vertices)} of a cost figure's scatters."""
    return {c.get_label(): (tuple(c.get_facecolor()[0]), c.get_paths()[0].vertices.round(6).tobytes())
            for c in fig.axes[0].collections if not c.get_label().startswith("_")}


def test_a_method_keeps_its_style_in_all_four_figures_and_front_labels_stay_apart():
    """Styles were chosen among the methods with a cost on each axis, so a method changed colour and marker between
    figures (lora: purple triangle by #TP, red diamond by latency, since three methods have no profile). The front
    labels were offset by a fixed amount, so "lora (share=dedicated)" ran over "ditask". Now every method keeps one
    style, and adjustText moves the labels off each other and off every marker, the same way on every run."""
    import itertools

    import matplotlib.pyplot as plt
    import numpy as np

    from mtbench.pareto import cost_figure, cost_points

    points, device = cost_points(REFERENCE, "synthetic")
    styles, texts = {}, {}
    for x in ("tp", "gflops", "memory", "latency"):
        fig = cost_figure(points, x, "synthetic", device)
        styles[x] = _legend_styles(fig)
        ax = fig.axes[0]
        fig.canvas.draw()
        boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in ax.texts]
        assert len(boxes) >= 3, x  # the front's members are labelled
        for (a, ba), (b, bb) in itertools.combinations(zip(ax.texts, boxes), 2):
            assert not ba.overlaps(bb), (x, a.get_text(), b.get_text())
        markers = ax.transData.transform(np.concatenate([c.get_offsets() for c in ax.collections]))
        for t, box in zip(ax.texts, boxes):
            assert not any(box.contains(*m) for m in markers), (x, t.get_text())
        texts[x] = [(t.get_text(), t.get_position()) for t in ax.texts]
        plt.close(fig)
    assert "lora" in styles["latency"] and len(styles["latency"]) < len(styles["tp"])  # fewer methods by latency
    for x in ("gflops", "memory", "latency"):
        for label, style in styles[x].items():
            assert style == styles["tp"][label], (x, label)
    fig = cost_figure(points, "tp", "synthetic", device)  # the label placement does not depend on time
    assert [(t.get_text(), t.get_position()) for t in fig.axes[0].texts] == texts["tp"]
    plt.close(fig)


@pytest.fixture(scope="module")
def results_with_profile(tmp_path_factory):
    """The reference results plus a real profile of lora on the embedded setting (memory filled by hand, since the
    plot is under test here, not the measurement)."""
    from mtbench.measure import profile_methods, write_profile
    from mtbench.results import profile_path

    root = tmp_path_factory.mktemp("res")
    shutil.copytree(REFERENCE / "synthetic", root / "synthetic")
    for f in (root / "synthetic").rglob("profile_*.json"):  # only the profile made here: a method without one
        f.unlink()                                            # must get no cost (test_cost_points_join...)
    (prof,) = profile_methods(["lora"], "synthetic", batch_size=2, rounds=1, warmup=0, memory=False)
    prof["memory"] = {"train": {"rss_step_mb": 50.0}, "inference": {"rss_step_mb": 10.0}}
    write_profile(prof, profile_path(root, "synthetic", "lora", "default", "cpu"))
    return root


def test_plot_writes_the_four_figures(results_with_profile, tmp_path):
    res = mtbench("plot", "--results-dir", str(results_with_profile), "--out-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    for x in ("tp", "gflops", "memory", "latency"):
        for ext in ("png", "pdf"):
            f = tmp_path / f"pareto_synthetic_{x}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f


def test_cost_points_join_results_and_profiles(results_with_profile):
    from mtbench.pareto import cost_points

    pts, device = cost_points(results_with_profile, "synthetic")
    lora = pts[pts["label"] == "lora"].iloc[0]
    prof = json.loads((results_with_profile / "synthetic/lora/default/profile_cpu.json").read_text())
    assert lora["gflops"] == prof["flops"]["inference"]["gflops"] > 0
    assert lora["memory_mb"] == 50.0 and lora["tp_m"] == pytest.approx(0.559, abs=1e-3)
    assert math.isnan(pts[pts["label"] == "mtlora"].iloc[0]["gflops"])  # no profile: no cost, never invented
    assert "cpu" in device


def test_cost_table_layout(results_with_profile, tmp_path):
    res = mtbench("table", "--kind", "cost", "--results-dir", str(results_with_profile), "--out-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "cost_synthetic.md").read_text()
    for col in ("#TP (M)", "train memory (MB)", "time per batch (ms)", "GFLOPs", "latency (ms)", "Δm (%)"):
        assert col in md
    lora_line = next(line for line in md.splitlines() if line.startswith("| lora "))
    runs = sorted((results_with_profile / "synthetic" / "lora" / "default").glob("seed*.json"))
    mean_dm = sum(json.loads(p.read_text())["delta_m"]["value"] for p in runs) / len(runs)
    assert "50.0" in lora_line and f"{mean_dm:+.2f}" in lora_line, lora_line


def test_reported_tables_ship_with_sources():
    from mtbench.report import load_reported

    df = load_reported()
    tdss1 = df[(df["paper"] == "TDSS AAAI'26") & (df["table"] == "Table 1")]
    assert len(tdss1) == 19
    assert {"Adapter(sha.)", "Adapter(ded.)", "LoRA(sha.)", "LoRA(ded.)", "BitFit(sha.)", "BitFit(ded.)"} <= set(
        tdss1["row"])
    t1 = df[(df["paper"] == "TADFormer CVPR'25") & (df["table"] == "Table 1")]
    assert len(t1) == 19
    row = t1[t1["row"] == "TADFormer (r = 64)"].iloc[0]
    assert (row["delta_m"], row["tp_m"], row["normals"]) == (4.24, 7.38, 16.48)
    t3 = df[(df["paper"] == "TDSS AAAI'26") & (df["table"] == "Table 3")]
    assert t3.set_index("row").loc["MTLoRA", "memory_gb"] == 18.22


def test_table_reported_prints_tdss_and_tadformer_tables(tmp_path):
    res = mtbench("table", "--reported", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "REPORTED: TDSS AAAI'26 Table 1" in out and "REPORTED: TADFormer CVPR'25 Table 1" in out
    assert "19 rows" in out and "VMT-Adapter" in out and "LoRA(ded.)" in out and "Compactor++" in out
    assert "no measured rows" in out


def test_measured_row_shows_reported_twin_in_its_own_columns(tmp_path):
    """A PASCAL-Context result of mtlora (r=16) gets MTLoRA Table 1's Δm and #TP beside its own, never in them."""
    from mtbench.report import add_reported_columns, build_table

    src = json.loads((REFERENCE / "synthetic/mtlora/default/seed0.json").read_text())
    src["run"]["dataset"] = "pascal_context"
    dst = tmp_path / "pascal_context/mtlora/default/seed0.json"
    dst.parent.mkdir(parents=True)
    dst.write_text(json.dumps(src))
    tab, _ = build_table(tmp_path, "pascal_context")
    out = add_reported_columns(tab, tmp_path, "pascal_context")
    assert out.index[0].startswith("mtlora")  # the label may name what differs from the dataset's defaults
    row = out.iloc[0]
    assert row["Δm reported (%)"] == 1.35 and row["#TP reported (M)"] == 4.95
    assert row["#TP (M)"] == pytest.approx(src["params"]["trainable"] / 1e6)  # measured column untouched
    assert "TADFormer CVPR'25 Table 1" in row["reported in"]


NEW_COMMANDS_BAD_INPUT = [
    (["profile", "--methods", "nosuch"], "unknown method 'nosuch'"),
    (["profile", "--methods", "lora", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["train-memory", "--methods", "lora", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["profile", "--methods", "lora", "--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["profile", "--methods", "lora", "--device", "tpu"], "unknown device 'tpu'"),
    (["profile", "--methods", "lora", "--scaling", "width"], "unknown --scaling 'width'"),
    (["profile", "--methods", "lora:r=0"], "lora: r must be > 0, got 0"),
    (["profile", "--methods", "lora", "--compare-to", "mtl_full"], "--compare-to 'mtl_full' is not among"),
    (["plot", "--x", "flops"], "unknown --x 'flops'"),
    (["params", "--methods", "lora:r=8"], "--methods 'lora:r=8': params takes method names"),
    (["params", "--methods", ",,"], "--methods ',,': params takes method names"),
    (["table", "--kind", "speed"], "unknown --kind 'speed'"),
    (["profile", "--methods", "lora", "--max-tasks", "3"], "--max-tasks only applies with --scaling tasks"),
    (["profile", "--methods", "lora", "--out-dir", "x"], "--out-dir only applies with --scaling tasks"),
    (["profile", "--methods", "lora", "--scaling", "tasks", "--compare-to", "lora", "--activation-checkpoint",
      "all"], "--compare-to, --activation-checkpoint do not apply with --scaling tasks"),
    (["profile", "--methods", "lora", "--compare-to", ""], "--compare-to '' names no method; give one of: lora"),
    (["table", "--dataset", "bogus"], "unknown dataset 'bogus'"),
    (["table", "--dataset", "bogus", "--reported"], "unknown dataset 'bogus'"),
    (["plot", "--dataset", "bogus"], "unknown dataset 'bogus'"),
    (["references", "--dataset", "bogus"], "unknown dataset 'bogus'"),
    (["train-memory", "--methods", "mtlora:plus=true,mtlora_plus", "--dataset", "synthetic"],
     "a method is listed twice in 'mtlora:plus=true,mtlora_plus'"),
    (["data", "check", "--dataset", "pascal_context", "--workers", "-1"], "--workers must be >= 0"),
    (["data", "check", "--dataset", ""], "unknown dataset ''; valid: pascal_context, nyud"),
    (["data", "check", "--dataset", "synthetic"], "dataset 'synthetic' is generated, there are no files to check"),
]


def test_new_commands_bad_input_is_one_line_exit_2():
    """Each case through the installed entry point (one process for the batch: :func:`cli_entry.mtbench_many`)."""
    for (args, needle), res in zip(NEW_COMMANDS_BAD_INPUT, mtbench_many(*(a for a, _ in NEW_COMMANDS_BAD_INPUT)),
                                   strict=True):
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.startswith("error: ") and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            (args, res.stderr)


def test_plot_without_results_is_one_line_error(tmp_path):
    res = mtbench("plot", "--results-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.startswith("error: no result files")
    assert not (tmp_path / "o").exists()


def test_memory_method_reads_how_a_peak_was_measured():
    from mtbench.measure import LIVE_MEMORY_MARK, memory_method, mixed_memory_warning

    assert memory_method({"memory": {"train": {"allocated_step_mb": 3.0}}}) == "cuda"
    assert memory_method({}) == memory_method({"memory": {}}) == "none"
    assert memory_method({"memory": {"train": {"rss_step_mb": 3.0, "what": "Linux VmHWM ..."}}}) == "cpu-heap"
    assert memory_method({"memory": {"train": {"rss_step_mb": 3.0, "what": f"... ({LIVE_MEMORY_MARK})"}}}) == "cpu-live"
    assert mixed_memory_warning(["cpu-live", "cpu-live", "none", "reported"]) is None
    assert mixed_memory_warning(["cpu-heap", "cuda"]) is None
    assert "predate mtbench.cpu.track_live_memory" in mixed_memory_warning(["cpu-live", "none", "cpu-heap"])


def test_cost_table_and_plot_warn_when_cpu_peaks_of_both_kinds_are_compared(results_with_profile, tmp_path):
    """The fixture's lora profile has no live-memory mark (an old CPU peak); a second profile with the mark makes the
    comparison mixed: `table --kind cost` marks the old row and both commands warn. With one kind, no warning."""
    from mtbench.measure import LIVE_MEMORY_MARK

    res = mtbench("table", "--kind", "cost", "--results-dir", str(results_with_profile),
                  "--out-dir", str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr
    plain = " ".join(res.stdout.split())
    assert "lora" in plain and "predate" not in plain

    root = tmp_path / "res"
    shutil.copytree(results_with_profile, root)
    prof = json.loads((root / "synthetic/lora/default/profile_cpu.json").read_text())
    prof["method"], prof["key"] = "mtlora", "default"
    prof["memory"] = {"train": {"rss_step_mb": 40.0, "what": f"VmHWM (glibc threshold fixed, {LIVE_MEMORY_MARK})"},
                      "inference": {"rss_step_mb": 9.0}}
    (root / "synthetic/mtlora/default/profile_cpu.json").write_text(json.dumps(prof))

    res = mtbench("table", "--kind", "cost", "--results-dir", str(root), "--out-dir", str(tmp_path / "b"))
    assert res.returncode == 0, res.stderr
    assert "predate mtbench.cpu.track_live_memory" in " ".join(res.stdout.split())
    md = (tmp_path / "b" / "cost_synthetic.md").read_text()
    lora = next(line for line in md.splitlines() if line.startswith("| lora "))
    mtlora = next(line for line in md.splitlines() if line.startswith("| mtlora "))
    assert "RSS incl. freed heap" in lora and "50.0" in lora
    assert "RSS incl. freed heap" not in mtlora and "40.0" in mtlora

    res = mtbench("plot", "--x", "memory", "--results-dir", str(root), "--out-dir", str(tmp_path / "c"))
    assert res.returncode == 0, res.stderr
    assert "predate mtbench.cpu.track_live_memory" in " ".join(res.stdout.split())
    assert (tmp_path / "c" / "pareto_synthetic_memory.png").is_file()


def test_a_result_or_profile_the_reports_cannot_read_is_one_line_error(results_with_profile, tmp_path):
    """A profile whose fields the reports read are missing or of the wrong type (hand-edited), and a result from a
    newer schema, fail ``table`` and ``plot`` with one line naming the file and the field."""
    root = tmp_path / "res"
    shutil.copytree(results_with_profile, root)
    prof_file = root / "synthetic/lora/default/profile_cpu.json"
    prof = json.loads(prof_file.read_text())
    for edit, message in [(("latency", "train_step", "median_ms"), "latency.train_step.median_ms: Input should be a "
                                                                    "valid number"),
                          (("flops", "inference", "gflops"), "flops.inference.gflops: Input should be a valid "
                                                             "number")]:
        bad = json.loads(json.dumps(prof))
        bad[edit[0]][edit[1]][edit[2]] = "fast"
        prof_file.write_text(json.dumps(bad))
        for args in (["table", "--kind", "cost"], ["plot"]):
            res = mtbench(*args, "--results-dir", str(root), "--out-dir", str(tmp_path / "o"))
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 2 and len(lines) == 1, (args, res.stderr)
            assert lines[0] == f"error: invalid profile file {prof_file}: {message}", lines[0]
    prof_file.write_text(json.dumps({**prof, "schema": "mtbench.profile/9"}))
    res = mtbench("table", "--kind", "cost", "--results-dir", str(root), "--out-dir", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr == (f"error: invalid profile file {prof_file}: schema "
                                                  "'mtbench.profile/9' is not one this mtbench reads "
                                                  "('mtbench.profile/1'; a newer mtbench wrote it?)\n"), res.stderr
    prof_file.write_text(json.dumps(prof))
    assert mtbench("table", "--kind", "cost", "--results-dir", str(root), "--out-dir", str(tmp_path / "o")
                   ).returncode == 0

    result_file = root / "synthetic/lora/default/seed0.json"
    res_json = json.loads(result_file.read_text())
    res_json["schema_version"] = 999
    result_file.write_text(json.dumps(res_json))
    res = mtbench("table", "--results-dir", str(root), "--out-dir", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: invalid result file {str(result_file)!r}: schema_version: schema_version 999 is not "
        "one this mtbench reads (1..2; a newer mtbench wrote it?)"), res.stderr


def test_results_lacking_what_reports_read_are_one_line_errors(tmp_path):
    """A result file of valid JSON whose primary metrics, metrics or #TP do not cover its run's tasks is refused with
    one line naming the file, not a pandas KeyError from inside ``table``."""
    src = REFERENCE / "synthetic/lora/default/seed0.json"
    edits = {
        "primary": (lambda d: d.update(primary={}), "no primary metric or metrics for task 'semseg' of run.tasks"),
        "task": (lambda d: d["run"].update(tasks=["foo"]), "no primary metric or metrics for task 'foo' of run.tasks"),
        "notasks": (lambda d: d["run"].update(tasks=[]), "run.tasks is empty"),
        "params": (lambda d: d.update(params={}), "params.trainable must be a count >= 0, got None"),
        "tp": (lambda d: d["params"].update(trainable="x"), "params.trainable must be a count >= 0, got 'x'"),
    }
    cases = []
    for name, (edit, _) in edits.items():
        path = tmp_path / name / "synthetic/lora/default/seed0.json"
        path.parent.mkdir(parents=True)
        data = json.loads(src.read_text())
        edit(data)
        path.write_text(json.dumps(data))
        cases.append(["table", "--results-dir", str(tmp_path / name), "--out-dir", str(tmp_path / "o")])
    for (name, (_, message)), res in zip(edits.items(), mtbench_many(*cases), strict=True):
        path = tmp_path / name / "synthetic/lora/default/seed0.json"
        assert res.returncode == 2 and res.stderr == f"error: invalid result file {str(path)!r}: {message}\n", (
            name, res.stderr)


def test_results_of_another_dataset_or_split_are_not_reported_under_this_one(tmp_path):
    cases = {"dataset": (("run", "dataset"), "nyud", "is of dataset 'nyud' but lies under"),
             "split": ((None, "split"), "val", "holds 'val' metrics; the reports compare the test split")}
    for name, ((outer, key), value, message) in cases.items():
        path = tmp_path / name / "synthetic/lora/default/seed0.json"
        path.parent.mkdir(parents=True)
        data = json.loads((REFERENCE / "synthetic/lora/default/seed0.json").read_text())
        (data[outer] if outer else data)[key] = value
        path.write_text(json.dumps(data))
    runs = mtbench_many(*(["table", "--results-dir", str(tmp_path / n), "--out-dir", str(tmp_path / "o")]
                          for n in cases))
    for (name, (_, _, message)), res in zip(cases.items(), runs, strict=True):
        path = tmp_path / name / "synthetic/lora/default/seed0.json"
        assert res.returncode == 2 and res.stderr.startswith(f"error: result file {str(path)!r} ") and \
            message in res.stderr and len(res.stderr.splitlines()) == 1, (name, res.stderr)
