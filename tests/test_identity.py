"""A run's identity: every field changes the result path, the seed does not; the table has one row per identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_entry import mtbench

from mtbench.identity import identity_of, make_identity
from mtbench.results import RunResult, load_results

REPO = Path(__file__).resolve().parent.parent


def base(**kw):
    args = dict(method="mtlora", variant="default", options={"r": 16}, dataset="synthetic",
                tasks=["semseg", "human_parts", "sal", "normals"], recipe={"epochs": 6, "batch_size": 32, "lr": 1e-3,
                                                                           "max_train_batches": 0},
                preset_recipe={"epochs": 6, "batch_size": 32, "lr": 1e-3, "max_train_batches": 0})
    for k, v in kw.items():
        if k in ("epochs", "batch_size", "lr", "max_train_batches"):
            args["recipe"] = {**args["recipe"], k: v}
        else:
            args[k] = v
    return make_identity(**args)


def test_every_identity_field_changes_the_path(tmp_path):
    w1, w2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    w1.write_bytes(b"weights one")
    w2.write_bytes(b"weights two")
    ref = base()
    assert ref.path_key() == "default" and ref.label() == "mtlora"
    cases = {
        "method": base(method="lora", options={"r": 4}),
        "options": base(options={"r": 32}),
        "variant": base(variant="mtlora_plus", options={"r": 16, "plus": True}),
        "dataset": base(dataset="pascal_context"),
        "tasks": base(tasks=["semseg", "normals"]),
        "backbone": base(backbone="swin_tiny_patch4_window7_224"),
        "weights random": base(init="random"),
        "weights file 1": base(weights=str(w1)),
        "weights file 2": base(weights=str(w2)),
        "decoder": base(decoder="hrnet"),
        "preset": base(preset="paper"),
        "epochs": base(epochs=1),
        "batch_size": base(batch_size=8),
        "lr": base(lr=5e-4),
        "train_size": base(train_size=256),
        "max_train_batches": base(max_train_batches=2),
        "eval_protocol": base(eval_protocol="original"),
    }
    paths = {name: ident.result_path(tmp_path, 0) for name, ident in cases.items()}
    assert ref.result_path(tmp_path, 0) not in paths.values()
    assert len(set(paths.values())) == len(paths), paths  # pairwise distinct
    assert len({i.key() for i in cases.values()} | {ref.key()}) == len(cases) + 1
    assert cases["epochs"].path_key() == "default_epochs=1"
    assert base(epochs=1, train_size=256).path_key() == "default_epochs=1_train-size=256"
    assert base(epochs=1, train_size=256).label() == "mtlora [smoke: epochs=1, train-size=256]"
    assert cases["weights random"].path_key() == "default_init=random"
    assert cases["options"].path_key() == "r=32" and cases["options"].label() == "mtlora (r=32)"
    assert not cases["epochs"].is_smoke() and cases["max_train_batches"].is_smoke()
    # an override equal to the preset is no departure; the seed only changes the file name
    assert base(epochs=6).key() == ref.key()
    assert ref.result_path(tmp_path, 1).parent == ref.result_path(tmp_path, 0).parent
    # a very long identity keeps a bounded, still unique key
    long1 = base(tasks=["semseg"] * 40, epochs=3)
    long2 = base(tasks=["semseg"] * 40, epochs=4)
    assert len(long1.path_key()) <= 120 and long1.path_key() != long2.path_key()


def test_reference_results_keep_working_with_reconstructed_identity():
    """Every reference result records its identity; the same file with the identity removed (a result written
    before identities existed) reconstructs one with the same directory key and label."""
    loaded = load_results(REPO / "results" / "reference", "synthetic")
    assert loaded
    for path, result in loaded:
        assert result.identity is not None and result.identity.path_key() == path.parent.name, path
        assert result.run.key == path.parent.name, path  # stored as "variant" by files older than the naming pass
        legacy = json.loads(path.read_text())
        legacy.pop("identity")
        ident = identity_of(RunResult.model_validate(legacy))
        assert ident.reconstructed and ident.path_key() == path.parent.name, path
        assert ident.label() == result.identity.label(), path
    random = [identity_of(r) for p, r in loaded if p.parent.name == "default_init=random"]
    assert random and random[0].label() == "decoder_only [random init]" and random[0].weights == "random"


def test_result_files_store_the_directory_name_as_key():
    data = json.loads((REPO / "results/reference/synthetic/lora/default/seed0.json").read_text())
    data["run"]["key"] = data["run"].pop("variant", "default")
    result = RunResult.model_validate(data)
    assert result.run.key == "default" and "variant" not in json.loads(result.model_dump_json())["run"]


def test_one_decoder_has_one_identity_whatever_its_spelling(tmp_path):
    """``--decoder inter_task_mha`` on the embedded setting is ``hrnet_270+inter_task_mha``: one identity, one result
    path, the one the resolved name (recorded in the result file) gives; the default decoder named explicitly is no
    departure."""
    from mtbench.runner import RunRequest, plan

    def key(decoder, dataset="synthetic"):
        req = RunRequest(methods="lora", dataset=dataset, decoder=decoder, results_dir=str(tmp_path),
                         data_root=str(tmp_path))
        return plan(req)[1][0].path.parent.name

    assert key("inter_task_mha") == key("hrnet_270+inter_task_mha") == "default_decoder=hrnet-270+inter-task-mha"
    assert key("inter_task_mha", "pascal_context") == "default_decoder=mtlora-hrnet+inter-task-mha"
    assert key("hrnet_270") == key(None) == "default"
    assert key("mtlora_hrnet", "pascal_context") == "default"


def test_a_variants_preset_given_as_options_is_that_variant(tmp_path):
    """``mtlora:plus=true`` is ``mtlora_plus`` (one path, one label); a method whose configuration is the preset of a
    variant that is the method's default (``vpt``, ``vpt_shallow``) is that variant, and a partial preset stays the
    plain method."""
    from mtbench.runner import RunRequest, plan

    def run(methods):
        (r,) = plan(RunRequest(methods=methods, results_dir=str(tmp_path)))[1]
        return r.path.parent.name, r.method.label

    assert run("mtlora:plus=true") == run("mtlora_plus") == ("mtlora_plus", "mtlora_plus")
    assert run("mtlora:plus=true,r=32") == run("mtlora_plus:r=32") == ("mtlora_plus_r=32", "mtlora_plus (r=32)")
    assert run("adapter:share=shared") == run("vl_adapter") == ("vl_adapter", "vl_adapter")
    assert run("vpt:deep=true") == run("vpt_deep")
    assert run("vpt") == run("vpt_shallow") == run("vpt:deep=false") == ("vpt_shallow", "vpt_shallow")
    assert run("vpt:share=shared") == run("vpt_shallow:share=shared") == (
        "vpt_shallow_share=shared", "vpt_shallow (share=shared)")
    assert run("tadformer:filter=static") == ("filter=static", "tadformer (filter=static)")
    # an option without effect is accepted at its preset's value (no second key), and a variant's inert presets stand
    assert run("tadformer:prompts=false,skip=gated")[0] == run("tadformer:prompts=false")[0] == "prompts=false"
    assert run("tadformer_official:prompts=false")[0] == "tadformer_official_prompts=false"


def test_reconstruction_reads_train_size_from_the_recorded_command():
    path = REPO / "results/reference/synthetic/lora/default/seed0.json"
    data = json.loads(path.read_text())
    data.pop("identity")  # a result written before identities existed
    data["run"]["command"] = "mtbench run --methods lora --epochs 1 --train-size 256"
    data["train"]["recipe"]["epochs"] = 1
    ident = identity_of(RunResult.model_validate(data))
    assert ident.overrides == {"epochs": 1, "train_size": 256}
    assert ident.path_key() == "default_epochs=1_train-size=256"


def test_full_and_smoke_runs_of_one_method_get_two_rows(tmp_path):
    """Issue 13's sequence on tiny settings: two seeds of a longer recipe, two seeds of a 1-epoch, smaller-data
    run of the same method; distinct paths, two rows with their own seed counts and labels."""
    import torch

    from mtbench.runner import RunRequest, build_datasets, plan, run_one

    results = tmp_path / "results"
    common = dict(methods="decoder_only", batch_size=8, max_train_batches=2, results_dir=str(results))
    written = []
    for epochs, train_size in ((2, 32), (1, 16)):
        for seed in (5, 6):
            req = RunRequest(epochs=epochs, train_size=train_size, seed=seed, **common)
            tasks, runs, recipe = plan(req)
            data = build_datasets(req, tasks)
            run_one(req, tasks, runs[0], recipe, data, torch.device("cpu"))
            written.append(runs[0].path)
    assert len(set(written)) == 4
    keys = sorted({p.parent.name for p in written})
    assert keys == ["default_epochs=1_batch-size=8_train-size=16_max-train-batches=2",
                    "default_epochs=2_batch-size=8_train-size=32_max-train-batches=2"]
    stored = json.loads(written[-1].read_text())
    assert stored["identity"]["overrides"] == {"epochs": 1, "batch_size": 8, "train_size": 16,
                                               "max_train_batches": 2}
    res = mtbench("table", "--results-dir", str(results), "--out-dir", str(tmp_path / "reports"), timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if "decoder_only" in ln and "│" in ln]
    assert len(rows) == 2, res.stdout
    short = "decoder_only [smoke: epochs=1, batch-size=8, train-size=16, max-train-batches=2]"
    long = "decoder_only [smoke: epochs=2, batch-size=8, train-size=32, max-train-batches=2]"
    for label in (short, long):
        row = next(r for r in rows if label in r)
        assert row.rstrip(" │").split("│")[-1].strip() == "2"  # seeds column: only this identity's runs
    # a smoke row is compared with references of another recipe: one warning line says so
    assert any(ln.startswith("warning") and "setting differs from the Δm references'" in ln and short in ln
               for ln in res.stdout.splitlines())


@pytest.mark.parametrize("bad", ["0", "-3"])
def test_bad_train_size_is_one_line_error(tmp_path, bad):
    res = mtbench("run", "--methods", "lora", "--train-size", bad, "--results-dir", str(tmp_path), timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: --train-size must be >= 1") and \
        len(res.stderr.strip().splitlines()) == 1


def test_table_shows_mean_std_over_seeds_and_marks_differences_within_noise(tmp_path):
    """Three seeds each of two methods (result files written by hand from a reference file): mean ± sample std per
    cell, the seed count, and ≈ exactly where the intervals overlap the column's best row."""
    import statistics

    from mtbench.report import build_table, format_table, within_noise

    src = json.loads((REPO / "results/reference/synthetic/mtlora/default/seed0.json").read_text())
    src.pop("identity")  # reconstructed from the edited run info below
    values = {"mtlora": {"semseg": [40.0, 41.0, 42.0], "normals": [15.0, 15.2, 15.4]},
              "lora": {"semseg": [30.0, 30.5, 31.0], "normals": [15.1, 15.3, 15.5]}}
    for method, per_task in values.items():
        for seed in range(3):
            data = json.loads(json.dumps(src))
            data["run"].update(method=method, seed=seed, label=method, options={"r": 4} if method == "lora" else
                               data["run"]["options"])
            for task in data["primary"]:
                data["primary"][task] = per_task.get(task, [50.0, 50.0, 50.0])[seed]
            path = tmp_path / "synthetic" / method / "default" / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
    table, _ = build_table(tmp_path, "synthetic")
    shown = format_table(table)
    assert list(table["seeds"]) == [3, 3]
    semseg, normals = "SemSeg (mIoU ↑)", "Normals (mErr ↓)"
    assert shown.loc["mtlora", semseg] == f"41.00 ± {statistics.stdev([40.0, 41.0, 42.0]):.2f}"
    assert shown.loc["lora", semseg] == "30.50 ± 0.50"  # 10 points apart: a real difference, no mark
    assert shown.loc["lora", normals].endswith(" ≈") and not shown.loc["mtlora", normals].endswith("≈")
    assert within_noise(15.2, 0.2, 15.3, 0.2) and not within_noise(41.0, 1.0, 30.5, 0.5)
    assert not within_noise(15.2, float("nan"), 15.2, 0.1)  # one seed: no interval, no claim
