"""The ``mtbench`` command line (Typer).

Commands: ``list``, ``run``, ``eval``, ``status``, ``table``, ``params``, ``references``, ``pretrain``,
``attention``, ``data check``, ``profile``, ``plot``. Every user error
(:class:`mtbench.errors.MtbenchError`) prints one line ``error: ...`` on stderr and exits with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mtbench.errors import MtbenchError, out_of_memory

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark multi-task parameter-efficient fine-tuning methods for dense vision.")
console = Console(width=None if sys.stdout.isatty() else 200)  # no wrapping when piped


_ACTIVATION_HELP = ("activation checkpointing in training: none | lora_inputs (LoRA layers recompute their "
                    "LayerNorm/GELU input in backward) | task (that, and recompute the blocks that run several "
                    "streams, e.g. MTLoRA's and TADFormer's last block per stage) | all (that, for every block); less "
                    "memory, more time, the same outputs and gradients")


@app.command("list")
def list_cmd() -> None:
    """Show every registered method with its paper, variants and options."""
    from mtbench.config import option_text
    from mtbench.registry import list_methods

    for info in list_methods():
        console.print(f"[bold]{info.name}[/bold] — {escape(info.summary)}")
        console.print(f"  paper: {escape(info.paper)}\n  code:  {escape(info.code)}")
        options = info.config_cls.describe_options()
        if options:
            t = Table(show_header=True, expand=False, box=None, padding=(0, 2))
            t.add_column("  option")
            t.add_column("default")
            t.add_column("meaning")
            for name, default, help_ in options:
                t.add_row(f"  {name}", escape(default), escape(help_))
            console.print(t)
        else:
            console.print("  options: none")
        if info.variants:
            console.print("  variants: " + "; ".join(
                f"{v} = {info.name}:" + ",".join(f"{k}={option_text(x)}" for k, x in p.items())
                for v, p in info.variants.items()))
        console.print()


class _RichProgress:
    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[ips]:.0f} img/s"),
                                 TextColumn("{task.fields[val]}"), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def callbacks(self, label: str, recipe):
        task_id = self.progress.add_task(escape(label), total=None, loss=float("nan"), ips=0.0, val="")

        def on_step(step, total, loss, ips):
            self.progress.update(task_id, completed=step, total=total, loss=loss, ips=ips)

        def on_epoch(row):
            self.progress.update(task_id, val=f"ep {row['epoch']} val {row['val_score']:+.2f}")

        return on_step, on_epoch


def _refuse_given(options: dict[str, object], verbs: tuple[str, str], rest: str) -> None:
    """Refuse the options of ``{flag: value}`` that were given (value not None) where they do not apply: ``--a, --b
    VERBS[0] REST`` (``--a VERBS[1] REST`` for one), e.g. ``("only apply", "only applies")``.

    Raises:
        MtbenchError: naming every given one.
    """
    if given := [flag for flag, value in options.items() if value is not None]:
        raise MtbenchError(f"{', '.join(given)} {verbs[len(given) == 1]} {rest}")


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:  # int() takes surrounding spaces and refuses an empty item ("0,,1", "0,")
        values = [int(x) for x in text.split(",")] if text.strip() else []
    except ValueError:
        raise MtbenchError(f"{flag} {text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not values:
        raise MtbenchError(f"{flag} is empty; give e.g. 0,1,2")
    return values


@app.command()
def run(
    methods: Annotated[str, typer.Option("--methods", "-m", help="methods and options, e.g. 'mtlora:r=32,lora:r=8'; "
                                         "a comma item with '=' and no ':' continues the previous method's options")],
    dataset: str = typer.Option("synthetic", help="synthetic | pascal_context | nyud (any registered dataset)"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks (default: the dataset's default set)"),
    epochs: Optional[int] = typer.Option(None, help="override the dataset recipe's epochs"),
    batch_size: Optional[int] = typer.Option(None, help="override the recipe's batch size"),
    lr: Optional[float] = typer.Option(None, help="override the recipe's peak learning rate"),
    seed: int = typer.Option(0, help="seed of initialisation and data order"),
    seeds: Optional[str] = typer.Option(None, help="run every method once per seed, e.g. 0,1,2 (overrides --seed)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (AMP is used only on CUDA)"),
    data_root: Optional[str] = typer.Option(None, help="dataset root (PASCAL_MT/ or NYUD_MT/ directory)"),
    weights: Optional[str] = typer.Option(None, help="local backbone checkpoint (timm or original Swin format)"),
    init: str = typer.Option("pretrained", help="pretrained | random backbone initialisation"),
    results_dir: str = typer.Option("results", help="where result files are written"),
    existing: str = typer.Option("skip", help="if the result file exists: skip | error | overwrite"),
    max_train_batches: int = typer.Option(0, help="cap batches per epoch (0 = all; smoke tests)"),
    train_size: Optional[int] = typer.Option(None, help="use only the first N training images (synthetic)"),
    preset: Optional[str] = typer.Option(None, help="recipe preset: embedded (default) | paper (the papers' recipe "
                                         "and training transforms; real datasets)"),
    eval_resolution: str = typer.Option("resized", help="test labels: resized (MTLoRA, 448x448) | original "
                                        "(stored resolution, the older literature's protocol)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run's checkpoint (the default when one "
                                "exists)"),
    restart: bool = typer.Option(False, "--restart", help="discard an existing checkpoint and start from scratch"),
    checkpoint_minutes: float = typer.Option(10.0, help="also checkpoint every N minutes of training (0 = only "
                                             "after evaluations)"),
    jobs: int = typer.Option(1, help="run up to N (method, seed) runs at once, each in its own process"),
    launcher: Optional[str] = typer.Option(None, help="submit one job per (method, seed) through submitit: slurm | "
                                           "local"),
    partition: Optional[str] = typer.Option(None, help="SLURM partition (--launcher slurm)"),
    gpus_per_job: Optional[int] = typer.Option(None, help="GPUs per job (--launcher; default 1); 0 = a CPU job"),
    time: Optional[str] = typer.Option(None, "--time", help="wall-clock limit per job, HH:MM (--launcher; default "
                                       "24:00)"),
    wait: bool = typer.Option(False, "--wait", help="wait for submitted jobs to end (always with --launcher local)"),
    no_record: bool = typer.Option(False, "--no-record", hidden=True, help="do not record a sweep (child runs)"),
    decoder: Optional[str] = typer.Option(None, help="decoder (mtbench.decoders): mtlora_hrnet | hrnet_270 | polyhistor_hrnet | tsai, "
                                          "or an "
                                          "interaction on the default decoder (inter_task_mha | inter_task_deformable) "
                                          "or DECODER+INTERACTION; default "
                                          "per backbone (Swin-T: mtlora_hrnet, embedded: hrnet_270)"),
    activation_checkpoint: str = typer.Option("none", help=_ACTIVATION_HELP),
) -> None:
    """Train, select on validation, evaluate on test, and write one result file per method and seed."""
    from mtbench import distributed
    from mtbench.launch import record_sweep, run_jobs, submit
    from mtbench.runner import RunRequest, default_command, execute, plan

    if resume and restart:
        raise MtbenchError("--resume and --restart exclude each other")
    if jobs < 1:
        raise MtbenchError(f"--jobs must be >= 1, got {jobs}")
    if launcher is None:
        _refuse_given({"--partition": partition, "--gpus-per-job": gpus_per_job, "--time": time,
                       "--wait": wait or None}, ("only apply", "only applies"), "with --launcher (slurm | local)")
    task_list = None if tasks is None else [t.strip() for t in tasks.split(",")]  # "" is a task name, not "default"
    req = RunRequest(methods=methods, dataset=dataset, tasks=task_list,
                     seed=seed, device=device, epochs=epochs, batch_size=batch_size, lr=lr,
                     max_train_batches=max_train_batches, data_root=data_root, weights=weights, init=init,
                     results_dir=results_dir, existing=existing, train_size=train_size, command=default_command(),
                     preset=preset, eval_resolution=eval_resolution, decoder=decoder,
                     seeds=_int_list(seeds, "--seeds"), restart=restart, checkpoint_minutes=checkpoint_minutes,
                     activation_checkpoint=activation_checkpoint)
    _, runs, _ = plan(req)
    todo = [r for r in runs if not (r.path.exists() and existing == "skip")]
    if launcher is not None:
        jobs_ = submit(req, todo, launcher, partition, 1 if gpus_per_job is None else gpus_per_job,
                       "24:00" if time is None else time,
                       log=lambda m: console.print(m, markup=False, highlight=False))
        record_sweep(results_dir, [{"label": r.label, "seed": r.seed, "path": str(r.path), "job_id": j.job_id}
                                   for r, j in zip(todo, jobs_)], req.command, launcher)
        if launcher == "local" or wait:
            failed = 0
            for r, j in zip(todo, jobs_):
                try:
                    j.result()
                    console.print(f"[green]done[/green] {escape(r.label)} -> {r.path}")
                except Exception as e:
                    failed += 1
                    console.print(f"[red]failed[/red] {escape(r.label)}: {escape(str(e).strip().splitlines()[-1])}")
            if failed:
                raise MtbenchError(f"{failed} of {len(todo)} jobs failed; `mtbench status --results-dir "
                                   f"{results_dir}` lists them")
        return
    if not no_record and distributed.env_world_size() <= 1 and todo:
        record_sweep(results_dir, [{"label": r.label, "seed": r.seed, "path": str(r.path), "job_id": None}
                                   for r in todo], req.command, f"jobs={jobs}" if jobs > 1 else "process")
    if jobs > 1 and len(todo) > 1:
        for r in runs:
            if r not in todo:
                console.print(f"[yellow]skip[/yellow] {escape(r.label)}: result exists at {r.path}")
        failed = run_jobs(req, todo, jobs, log=lambda m: console.print(m, markup=False, highlight=False))
        if failed:
            raise MtbenchError(f"{failed} of {len(todo)} runs failed; their logs are beside their result paths")
        return
    main = distributed.env_world_size() <= 1 or int(__import__("os").environ.get("RANK", "0")) == 0

    def plain(printer):  # labels hold brackets ("[random init]"): never read them as rich markup
        return lambda msg: printer(msg, markup=False, highlight=False)

    if main and console.is_terminal:
        with _RichProgress() as progress:
            execute(req, log=plain(progress.progress.console.print), progress=progress)
    else:
        execute(req, log=plain(console.print) if main else (lambda msg: None))
    distributed.shutdown()


@app.command("eval")
def eval_cmd(
    result: str = typer.Option(..., "--result", help="result file written by `mtbench run`"),
    split: str = typer.Option("test", help="test | val"),
    data_root: Optional[str] = typer.Option(None, help="dataset root (PASCAL_MT/ or NYUD_MT/ directory)"),
    state: Optional[str] = typer.Option(None, help="trained state (.safetensors) to evaluate instead of the one "
                                        "beside the result, e.g. a model trained elsewhere"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(32, help="evaluation batch size"),
) -> None:
    """Rebuild a result's method from its recorded config, load the saved state and recompute the metrics."""
    from mtbench.data import check_data_root
    from mtbench.evaluation import evaluate_result

    if split not in ("test", "val"):
        raise MtbenchError(f"unknown --split {split!r}; valid: test, val")
    if batch_size < 1:
        raise MtbenchError(f"--batch-size must be >= 1, got {batch_size}")
    check_data_root(data_root)
    report = evaluate_result(result, split=split, data_root=data_root, state=state, device=device,
                             batch_size=batch_size)
    t = Table(title=escape(f"{report.label}, {split} split ({report.n_images} images)"), title_justify="left")
    for c in ("task", "metric", "recomputed", "stored", "difference"):
        t.add_column(c, justify="left" if c in ("task", "metric") else "right")
    for row in report.rows:
        t.add_row(row["task"], row["metric"], f"{row['recomputed']:.4f}",
                  "—" if row["stored"] is None else f"{row['stored']:.4f}",
                  "—" if row["diff"] is None else f"{row['diff']:+.4f}")
    console.print(t)
    console.print(report.summary)
    from mtbench.evaluation import TOLERANCE

    if report.max_abs_diff > TOLERANCE:
        raise typer.Exit(1)


@app.command()
def status(
    results_dir: str = typer.Option("results", help="where result files are"),
    sweep: Optional[str] = typer.Option(None, help="sweep file (default: the newest under RESULTS_DIR/sweeps)"),
) -> None:
    """List what is done, running, interrupted, failed or missing in a sweep (one `mtbench run`)."""
    from collections import Counter

    from mtbench.launch import sweep_status

    path, rows = sweep_status(results_dir, sweep)
    t = Table(title=f"sweep {path}", title_justify="left")
    for c in ("run", "seed", "state", "job", "detail"):
        t.add_column(c)
    colour = {"done": "green", "running": "cyan", "interrupted": "yellow", "failed": "red", "missing": "magenta"}
    for r in rows:
        t.add_row(escape(r["label"]), str(r["seed"]), f"[{colour[r['state']]}]{r['state']}[/]",
                  str(r.get("job_id") or "-"), escape(r["detail"]))
    console.print(t)
    counts = Counter(r["state"] for r in rows)
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()))


def _print_frame(title: str, shown, index_name: str = "Method") -> None:
    t = Table(title=title, title_justify="left")
    t.add_column(index_name)
    for c in shown.columns:
        t.add_column(str(c), justify="left" if c in ("reported in", "profile", "source", "note") else "right")
    for label, row in shown.iterrows():
        t.add_row(escape(str(label)), *[escape(str(v)) for v in row])
    console.print(t)


def _print_reported(kind: str) -> None:
    """The shipped papers' numbers, one rich table per paper table, every row marked as reported."""
    import pandas as pd

    from mtbench.report import REPORTED_FILE, load_reported

    df = load_reported()
    if kind == "cost":
        df = df[df["memory_gb"].notna() | df["time_s_per_batch"].notna()]
    for (paper, tab, ds), g in df.groupby(["paper", "table", "dataset"], sort=False):
        cols = [c for c in ("semseg", "human_parts", "sal", "normals", "depth", "delta_m", "tp_m", "memory_gb",
                            "time_s_per_batch") if g[c].notna().any()]
        titles = {"semseg": "SemSeg (mIoU ↑)", "human_parts": "Parts (mIoU ↑)", "sal": "Sal (mIoU ↑)",
                  "normals": "Normals (mErr ↓)", "depth": "Depth (rmse ↓)", "delta_m": "Δm (%)", "tp_m": "#TP (M)",
                  "memory_gb": "Memory (GB)", "time_s_per_batch": "Time (s/batch)"}
        digits = {"depth": 3, "time_s_per_batch": 3}
        shown = pd.DataFrame({titles[c]: [("—" if pd.isna(v) else (f"{v:+.2f}" if c == "delta_m" and v else
                                                                   f"{v:.{digits.get(c, 2)}f}"))
                                          for v in g[c]] for c in cols}, index=list(g["row"]))
        shown["mtbench method"] = [m + (f" ({o.replace(';', ', ')})" if o else "") if m else "—"
                                   for m, o in zip(g["method"], g["options"])]
        shown["note"] = list(g["note"])
        _print_frame(f"REPORTED: {paper} {tab}, {ds} ({len(g)} rows, as printed; source {REPORTED_FILE.name})",
                     shown, "Method (reported)")


def _print_warnings(warnings) -> None:
    """Print each one-line warning (None entries skipped) as the table and plot commands do."""
    for w in warnings:
        if w:
            console.print(f"[yellow]warning[/yellow] {escape(w)}")


@app.command()
def table(
    dataset: str = typer.Option("synthetic", help="dataset whose results to tabulate"),
    results_dir: str = typer.Option("results", help="where result files are"),
    out_dir: str = typer.Option("reports", help="where the Markdown and LaTeX tables are written"),
    kind: str = typer.Option("paper", help="paper: Table 1 layout (metrics, Δm, #TP) | cost: TDSS Table 3 layout "
                             "(#TP, train memory, time per batch, GFLOPs, latency, Δm) from result and profile files"),
    reported: bool = typer.Option(False, "--reported", help="also print the numbers the papers report (TADFormer "
                                  "Tables 1-2, TDSS Tables 1-3, MTLoRA Table 1), marked as reported, with sources"),
) -> None:
    """Print the paper-style table from result files and write it under reports/ (`--kind cost`: the cost table)."""
    from mtbench.report import (
        add_reported_columns, build_cost_table, build_table, format_cost_table, format_table, write_table,
    )

    from mtbench.datasets import get_dataset
    from mtbench.results import check_output_dir

    if kind not in ("paper", "cost"):
        raise MtbenchError(f"unknown --kind {kind!r}; valid: paper, cost")
    get_dataset(dataset)  # an unknown dataset: the registered ones, not "no result files"
    check_output_dir(out_dir, "--out-dir")
    try:
        if kind == "cost":
            tab = build_cost_table(results_dir, dataset)
            _print_frame(f"{dataset}: cost (measured; memory = training step's peak over the memory before it, "
                         "GFLOPs = 2 x fvcore GMACs of one image, latency = median inference at batch 1)",
                         format_cost_table(tab))
            from mtbench.results import atomic_write_text

            _print_warnings(tab.attrs.get("warnings", []))
            md = format_cost_table(tab).to_markdown(disable_numparse=True)
            path = Path(out_dir) / f"cost_{dataset}.md"
            atomic_write_text(path, md + "\n")
            console.print(f"wrote {path}")
        else:
            tab, ref_source = build_table(results_dir, dataset)
            shown = format_table(add_reported_columns(tab, results_dir, dataset))
            for c in ("Δm reported (%)", "#TP reported (M)"):
                if c in shown.columns:
                    shown[c] = ["—" if v in ("nan", "—") else v for v in shown[c]]
            _print_frame(f"{dataset}: test split", shown)
            console.print(f"Δm references: {ref_source}" if ref_source else
                          "Δm: no single-task references yet (mtbench run --methods single_task; mtbench references)")
            from mtbench.report import NOISE_NOTE, noise_marks

            if noise_marks(tab):
                console.print(NOISE_NOTE)
            _print_warnings(tab.attrs.get("warnings", []))
            for p in write_table(tab, out_dir, dataset, ref_source):
                console.print(f"wrote {p}")
    except MtbenchError as e:
        if not reported or not str(e).startswith("no result files"):
            raise
        console.print(f"[yellow]no measured rows:[/yellow] {escape(str(e))}")
    if reported:
        _print_reported(kind)


@app.command()
def params(
    dataset: str = typer.Option("pascal_context", help="task set of this dataset's setting"),
    methods: Optional[str] = typer.Option(None, "--methods", "-m", help="only these methods (comma-separated)"),
    decoder: Optional[str] = typer.Option(None, help="decoder (default: the backbone's)"),
) -> None:
    """Build every method in the papers' setting (no data, no weights) and print #TP next to the papers'."""
    from mtbench.config import MethodSpec, option_text
    from mtbench.measure import COUNTING_RULE, count_params
    from mtbench.datasets import get_dataset
    from mtbench.registry import build_model, list_methods, resolve, resolve_spec
    from mtbench.swin import create_backbone
    from mtbench.tasks import resolve_tasks

    from mtbench.decoders import resolve_decoder

    backbone = get_dataset(dataset).backbone
    task_specs = resolve_tasks(dataset)
    chosen = decoder  # None: each method's own default (the backbone's, or e.g. tdss's tsai)
    decoder = resolve_decoder(decoder, backbone).name
    names = None if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    if names is not None and (not names or any(":" in m for m in names)):
        raise MtbenchError(f"--methods {methods!r}: params takes method names (e.g. mtlora,tadformer) and prints "
                           "each method's paper configurations; options (name:key=value) are for run and profile")
    wanted = None if names is None else {resolve(m)[0].name for m in names}
    t = Table(title=f"#TP, {backbone} setting, decoder {decoder}, tasks: {', '.join(x.name for x in task_specs)}",
              title_justify="left")
    for c in ("method", "options", "#TP", "backbone unfrozen", "method modules", "decoders", "paper (M)", "vs paper",
              "source / note"):
        t.add_column(c, justify="right" if c in ("#TP", "method modules", "decoders", "paper (M)", "vs paper")
                     else "left")
    for info in list_methods():
        if wanted is not None and info.name not in wanted:
            continue
        rows = list(info.paper_counts) if dataset == "pascal_context" else []
        defaults = info.config_cls().to_dict()
        if not any(all(defaults.get(k) == v for k, v in pc.options.items()) for pc in rows):
            rows.insert(0, None)  # the default configuration, when no paper row is it
        for pc in rows:
            opts = {} if pc is None else {k: option_text(v) for k, v in pc.options.items()}
            rm = resolve_spec(MethodSpec(info.name, opts))
            model = build_model(rm, create_backbone(backbone), task_specs, decoder=chosen)
            pb = count_params(model)
            unfrozen = ", ".join(f"{k} {v:,}" for k, v in pb.backbone_unfrozen.items()) or "-"
            paper = "-" if pc is None or pc.millions is None else f"{pc.millions:.2f}"
            note = "" if pc is None else (pc.source + (f"; {pc.note}" if pc.note else ""))
            actual = model.decoder_name  # a method may bring its own decoder (tdss: tsai)
            same_decoder = pc is not None and pc.decoder == actual
            if pc is not None and pc.exact is not None and same_decoder:
                note = ("✔ " if pb.trainable == pc.exact else f"✘ expected {pc.exact:,}; ") + note
            elif pc is not None and not same_decoder:
                note = f"(paper on decoder {pc.decoder}) " + note
            if actual != decoder:
                note = f"decoder {actual}; " + note
            vs = "-"
            if pc is not None and pc.millions is not None:
                vs = f"{100 * (pb.trainable / 1e6 - pc.millions) / pc.millions:+.1f}%"
            t.add_row(info.name, ",".join(f"{k}={v}" for k, v in opts.items()) or "default", f"{pb.trainable:,}",
                      unfrozen, f"{pb.method:,}", f"{pb.decoders:,}", paper, vs, note)
            del model
    console.print(t)
    console.print(f"[dim]{COUNTING_RULE}[/dim]")


@app.command()
def references(
    dataset: str = typer.Option("synthetic", help="dataset whose single_task results become the references"),
    results_dir: str = typer.Option("results", help="where result files are"),
) -> None:
    """Write the single-task references used for Δm from this dataset's single_task results (mean over seeds)."""
    from mtbench.datasets import get_dataset
    from mtbench.references import write_references

    get_dataset(dataset)
    path, entry = write_references(results_dir, dataset)
    console.print(f"wrote {path}: " + ", ".join(f"{k} {v:.2f}" for k, v in entry["primary"].items()))


@app.command()
def pretrain(
    epochs: int = typer.Option(30, help="passes over the upstream split"),
    out: Optional[str] = typer.Option(None, help="output .safetensors (default: the packaged embedded weights)"),
    seed: int = typer.Option(0, help="seed"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Pretrain the embedded small Swin on the synthetic *upstream* split (never on train/val/test images)."""
    from mtbench.pretrain import pretrain_embedded
    from mtbench.results import check_output_file
    from mtbench.runner import check_seeds, resolve_device
    from mtbench.cpu import configure_cpu

    if epochs < 1:
        raise MtbenchError(f"--epochs must be >= 1, got {epochs}")
    check_seeds([seed])
    if out is not None:  # an empty --out is refused, never read as the packaged weights
        check_output_file(out, "--out")
    configure_cpu()
    path, summary = pretrain_embedded(epochs=epochs, out=out, seed=seed, device=resolve_device(device),
                                      log=console.print)
    console.print(f"wrote {path}: {summary}")


@app.command()
def attention(
    result: str = typer.Option("results/synthetic/tadformer/default/seed0.json",
                               help="result file of a trained method with task prompts"),
    n: int = typer.Option(4, help="number of test images"),
    stage: int = typer.Option(0, help="backbone stage whose last block's maps are drawn (0 = finest)"),
    out: Optional[str] = typer.Option(None, help="output PNG (default reports/attention_{method}_{key}_stage{S}.png)"),
    data_root: Optional[str] = typer.Option(None, help="the dataset's directory, as for `run` (default: the "
                                            "synthetic cache, or $MTBENCH_DATA/<dir> for the real datasets)"),
    state: Optional[str] = typer.Option(None, help="trained state (.safetensors) to draw instead of the one beside "
                                        "the result, as for `eval`"),
) -> None:
    """Draw the task attention maps of a trained model (TADFormer Fig. 7) for a few test images."""
    import torch

    from mtbench.data import build_dataset, check_data_root
    from mtbench.figures import attention_figure
    from mtbench.results import check_output_file
    from mtbench.runner import load_trained

    if n < 1:
        raise MtbenchError(f"--n must be >= 1, got {n}")
    check_data_root(data_root)
    if out is not None:
        if Path(out).suffix.lower() != ".png":
            raise MtbenchError(f"--out {out!r}: the figure is a PNG; give a path ending in .png")
        check_output_file(out, "--out")
    model, res = load_trained(result, state)
    test = build_dataset(res.run.dataset, "test", root=data_root, tasks=res.run.tasks)
    if n > len(test):
        raise MtbenchError(f"--n {n}: the {res.run.dataset} test split has {len(test)} images")
    images = torch.stack([test[i]["image"] for i in range(n)])
    path = out or f"reports/attention_{res.run.method}_{res.run.key}_stage{stage}.png"
    attention_figure(model, images, path, stage=stage, title=f"{res.run.label}: task attention maps, stage {stage}")
    console.print(f"wrote {path}")


data_app = typer.Typer(no_args_is_help=True, help="Check downloaded datasets.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    dataset: str = typer.Option(..., help="pascal_context | nyud"),
    data_root: Optional[str] = typer.Option(None, help="the downloaded directory (PASCAL_MT/ or NYUD_MT/); default "
                                            "$MTBENCH_DATA/<dir>"),
    workers: int = typer.Option(0, help="worker processes (0: one per CPU core, at most 16)"),
) -> None:
    """Read every sample of every task of every split; print counts, name every missing or malformed file, exit 2
    when anything is wrong."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mtbench.data.check import check_dataset

    if workers < 0:
        raise MtbenchError(f"--workers must be >= 0 (0: one per CPU core), got {workers}")
    with Progress(TextColumn("[bold]checking {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as progress:
        bar = progress.add_task(dataset, total=None)

        def on_progress(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        report = check_dataset(dataset, data_root, workers=workers or None, on_progress=on_progress)
    t = Table(title=f"{dataset}: {report.root}", title_justify="left")
    t.add_column("split")
    t.add_column("ids", justify="right")
    t.add_column("full download", justify="right")
    for c in report.columns:
        t.add_column(c, justify="right")
    for split, row in report.counts.items():
        t.add_row(split, f"{report.ids[split]:,}", f"{report.expected.get(split, 0):,}",
                  *[f"{row.get(c, 0):,}" for c in report.columns])
    console.print(t)
    for line in report.problems:
        print(f"error: {line}", file=sys.stderr)
    if report.problems:
        print(f"error: {len(report.problems)} problem(s) in {report.root}", file=sys.stderr)
        raise typer.Exit(2)
    done = f"every file of {sum(report.ids.values()):,} samples is present and readable"
    if report.short:
        console.print(f"[yellow]ok, partial[/yellow]: {done}, but "
                      + ", ".join(f"{s} lists {have:,} of the full download's {n:,} ids"
                                  for s, (have, n) in report.short.items())
                      + "; results on it are not comparable with the papers'")
    else:
        console.print(f"[green]ok[/green]: {done}")


@app.command()
def plot(
    dataset: str = typer.Option("synthetic", help="dataset whose results and profiles to draw"),
    results_dir: str = typer.Option("results", help="where result and profile files are"),
    x: Optional[str] = typer.Option(None, help="tp | gflops | memory | latency (default: all four)"),
    reported: bool = typer.Option(False, "--reported", help="add the papers' reported points (hollow, labelled)"),
    out_dir: str = typer.Option("reports", help="where pareto_{dataset}_{x}.png and .pdf are written"),
) -> None:
    """Draw Δm against #TP, GFLOPs, training memory and latency with the Pareto front (PNG and PDF)."""
    from mtbench.datasets import get_dataset
    from mtbench.measure import mixed_memory_warning
    from mtbench.pareto import AXES, cost_points, plot_cost
    from mtbench.results import check_output_dir

    axes = list(AXES) if x is None else [x]
    for a in axes:
        if a not in AXES:
            raise MtbenchError(f"unknown --x {a!r}; valid: {', '.join(AXES)}")
    get_dataset(dataset)
    check_output_dir(out_dir, "--out-dir")
    points, device = cost_points(results_dir, dataset, reported=reported)
    if "memory" in axes:
        _print_warnings([mixed_memory_warning(points["memory_method"])])
    for a in axes:
        try:
            paths = plot_cost(points, a, dataset, device, out_dir)
        except MtbenchError as e:
            if x is not None:
                raise
            console.print(f"[yellow]skip {a}:[/yellow] {escape(str(e))}")
            continue
        console.print("wrote " + ", ".join(str(p) for p in paths))


def _fmt_ratio(r: Optional[dict]) -> str:
    return "-" if not r else f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"


@app.command()
def profile(
    methods: Annotated[str, typer.Option("--methods", "-m", help="methods and options, as for run")],
    dataset: str = typer.Option("pascal_context", help="setting whose backbone, input size and tasks are built: "
                                "synthetic | pascal_context | nyud"),
    batch_size: int = typer.Option(2, help="images per training step (latency and memory of a step)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    rounds: int = typer.Option(3, help="timed round-robin rounds (each times every method once)"),
    warmup: int = typer.Option(2, help="untimed round-robin warm-up rounds (each runs every method once) before "
                                       "the timed rounds"),
    compare_to: Optional[str] = typer.Option(None, help="give time, FLOPs and memory as ratios to this "
                                             "method, e.g. mtl_full (it must be among --methods)"),
    scaling: Optional[str] = typer.Option(None, help="'tasks': repeat the measurement with T = 1..--max-tasks "
                                          "tasks, write a CSV and a plot"),
    max_tasks: Optional[int] = typer.Option(None, help="largest T of --scaling tasks (default 8)"),
    results_dir: Optional[str] = typer.Option(None, help="profiles go beside the results: "
                                              "{results_dir}/{dataset}/{method}/{key}/profile_{device}.json "
                                              "(default results)"),
    out_dir: Optional[str] = typer.Option(None, help="where --scaling writes its CSV and figure (default reports)"),
    memory: bool = typer.Option(True, help="measure peak memory (one fresh process per method and mode)"),
    activation_checkpoint: str = typer.Option("none", help=_ACTIVATION_HELP + "; profiles are written as "
                                              "profile_{device}_ckpt-{mode}.json beside the default ones"),
) -> None:
    """Measure FLOPs (fvcore, cross-checked by torch), peak memory and latency of methods in a dataset's setting."""
    from mtbench.config import parse_method_specs
    from mtbench.measure import profile_methods, write_profile
    from mtbench.registry import resolve_spec
    from mtbench.results import check_output_dir, profile_path
    from mtbench.datasets import get_dataset
    from mtbench.runner import resolve_device
    from mtbench.cpu import configure_cpu

    get_dataset(dataset)  # an unknown dataset: MtbenchError naming the registered ones
    if scaling is None:
        _refuse_given({"--max-tasks": max_tasks, "--out-dir": out_dir}, ("only apply", "only applies"),
                      "with --scaling tasks")
    else:
        _refuse_given({"--compare-to": compare_to, "--results-dir": results_dir,
                       "--activation-checkpoint": None if activation_checkpoint == "none" else activation_checkpoint},
                      ("do not apply", "does not apply"),
                      "with --scaling tasks (it writes a CSV and a figure under --out-dir, no profiles)")
    results_dir, out_dir = results_dir or "results", out_dir or "reports"
    check_output_dir(results_dir, "--results-dir")
    if rounds < 1:
        raise MtbenchError(f"--rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise MtbenchError(f"--warmup must be >= 0, got {warmup}")
    if batch_size < 1:
        raise MtbenchError(f"--batch-size must be >= 1, got {batch_size}")
    if scaling not in (None, "tasks"):
        raise MtbenchError(f"unknown --scaling {scaling!r}; valid: tasks")
    max_tasks = 8 if max_tasks is None else max_tasks
    if max_tasks < 1:
        raise MtbenchError(f"--max-tasks must be >= 1, got {max_tasks}")
    from mtbench.encoder import check_activation_checkpoint

    check_activation_checkpoint(activation_checkpoint)
    parsed = parse_method_specs(methods)
    specs = [s.label() for s in parsed]
    labels = [resolve_spec(s).label for s in parsed]  # validates every name and option before anything is built
    if compare_to is not None:
        if not compare_to.strip(",").strip():
            raise MtbenchError(f"--compare-to {compare_to!r} names no method; give one of: {', '.join(labels)}")
        ref = parse_method_specs(compare_to)
        if len(ref) != 1 or resolve_spec(ref[0]).label not in labels:
            raise MtbenchError(f"--compare-to {compare_to!r} is not among the profiled methods; valid: "
                               + ", ".join(labels))
    dev = resolve_device(device)
    configure_cpu()
    if scaling == "tasks":
        from mtbench.measure import scaling_tasks

        csv, fig = scaling_tasks(specs, dataset, batch_size=batch_size, device=dev, rounds=rounds, warmup=warmup,
                                 max_tasks=max_tasks, out_dir=out_dir, memory=memory, log=console.print)
        console.print(f"wrote {csv}\nwrote {fig}")
        return
    import time

    t0 = time.perf_counter()
    profiles = profile_methods(specs, dataset, batch_size=batch_size, device=dev, rounds=rounds, warmup=warmup,
                               compare_to=compare_to, memory=memory, activation_checkpoint=activation_checkpoint,
                               log=lambda m: console.print(f"[dim]{time.perf_counter() - t0:6.0f} s  {m}[/dim]"))
    env = profiles[0]["env"]
    mem_key = "allocated_step_mb" if dev.type == "cuda" else "rss_step_mb"
    t = Table(title=f"cost, {dataset} setting ({'x'.join(map(str, profiles[0]['input_size']))}), "
                    f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, float32; "
                    f"train step at batch {batch_size}", title_justify="left")
    cols = ["Method", "#TP (M)", "GMACs (fvcore MACs)", "GFLOPs (2xGMACs)", "GFLOPs (torch)",
            "train GFLOPs (torch fwd+bwd)", "train mem MB", "infer mem MB", "infer ms b=1 med [p10-p90]",
            "infer img/s", f"train ms/step b={batch_size}", "train img/s"]
    if compare_to:
        cols += ["infer time ratio", "infer FLOP ratio", "train time ratio", "train FLOP ratio", "train mem ratio"]
    for c in cols:
        t.add_column(c, justify="left" if c == "Method" else "right")
    for p in profiles:
        fi, ts = p["flops"]["inference"], p["flops"]["train_step"]
        li, lt = p["latency"]["inference_batch1"], p["latency"]["train_step"]
        mem = p.get("memory", {})
        row = [escape(p["label"]), f"{p['params']['trainable'] / 1e6:.2f}", f"{fi['gmacs']:.3f}", f"{fi['gflops']:.3f}",
               f"{fi['torch_gflops']:.3f}", f"{ts['torch_gflops']:.3f}",
               f"{mem['train'][mem_key]:.0f}" if mem else "-", f"{mem['inference'][mem_key]:.0f}" if mem else "-",
               f"{li['median_ms']:.1f} [{li['p10_ms']:.1f}-{li['p90_ms']:.1f}]", f"{li['items_per_s']:.2f}",
               f"{lt['median_ms']:.0f} [{lt['p10_ms']:.0f}-{lt['p90_ms']:.0f}]", f"{lt['items_per_s']:.2f}"]
        if compare_to:
            r = p["ratios"]
            row += [_fmt_ratio(r["inference_time"]), f"{r['inference_flops']:.3f}", _fmt_ratio(r["train_time"]),
                    f"{r['train_flops']:.3f}", f"{r['train_memory']:.2f}" if "train_memory" in r else "-"]
        t.add_row(*row)
    console.print(t)
    if profiles[0].get("memory"):
        console.print(f"[dim]memory: {escape(profiles[0]['memory']['train']['what'])}[/dim]")
    if compare_to:
        console.print(f"[dim]ratios to {escape(compare_to)}: time median \\[min-max] over {rounds} interleaved "
                      "rounds (round-robin over methods in one process); FLOPs: torch's counts per image (a time "
                      "ratio below the FLOP ratio needs more FLOP/s than the reference gets); memory: ratio of the "
                      "fresh-process step peaks[/dim]")
    for p in profiles:
        fi = p["flops"]["inference"]
        skipped = ", ".join(f"{k.replace('aten::', '')} x{v}" for k, v in fi["skipped"].items()) or "none"
        console.print(f"{escape(p['label'])}: fvcore skipped (not counted): {escape(skipped)}")
        if fi["mismatch"]:
            diff = "; ".join(f"{m['operator']} fvcore {m['fvcore_gflops']:.4f} vs torch {m['torch_gflops']:.4f} GFLOPs"
                             for m in fi["mismatch"])
            console.print(f"  fvcore vs torch differ by {100 * fi['rel_diff']:+.2f}% (> 2%): {escape(diff)}")
        else:
            console.print(f"  fvcore and torch agree within 2% ({100 * fi['rel_diff']:+.2f}%)")
        path = profile_path(results_dir, dataset, p["method"], p["key"], dev.type,
                            activation_checkpoint=activation_checkpoint)
        write_profile(p, path)
        console.print(f"  wrote {path}")


@app.command("interaction-cost")
def interaction_cost_cmd(
    decoder: str = typer.Option("inter_task_mha,inter_task_deformable", help="interaction decoders to compare"),
    tasks: str = typer.Option("2..8", help="numbers of tasks: A..B or a comma list"),
    sizes: str = typer.Option("448x448,448x576", help="input sizes HxW (PASCAL-Context 448x448, NYUD 448x576)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    repeats: int = typer.Option(5, help="timed forward calls per point (median), after one warm-up"),
    out: str = typer.Option("reports/figures/inter_task_cost", help="output stem: writes STEM.json and STEM.png"),
) -> None:
    """FLOPs (fvcore GMACs and GFLOPs = 2 x GMACs) and latency of inter-task interaction stages versus the number of
    tasks (Bohn et al. 2025's claim)."""
    import json
    from pathlib import Path

    from mtbench.decoders import DECODERS, INTERACTIONS, IdentityInteraction, resolve_decoder
    from mtbench.figures import cost_scaling_figure
    from mtbench.measure import interaction_cost
    from mtbench.results import atomic_write_text, check_output_file
    from mtbench.runner import resolve_device
    from mtbench.cpu import configure_cpu

    try:
        if ".." in tasks:
            a, b = tasks.split("..")
            counts = list(range(int(a), int(b) + 1))
        else:
            counts = [int(x) for x in tasks.split(",")]
        dims = [tuple(int(v) for v in s.lower().split("x")) for s in sizes.split(",")]
    except ValueError:
        raise MtbenchError(f"--tasks {tasks!r} / --sizes {sizes!r}: expected e.g. 2..8 or 2,4 and 448x448,448x576")
    if not counts or min(counts) < 1 or any(len(d) != 2 or min(d) < 32 for d in dims):
        raise MtbenchError(f"--tasks {tasks!r} / --sizes {sizes!r}: need task counts >= 1 and sizes HxW >= 32")
    if repeats < 1:
        raise MtbenchError(f"--repeats must be >= 1, got {repeats}")
    if len(set(counts)) != len(counts) or len(set(dims)) != len(dims):
        raise MtbenchError(f"--tasks {tasks!r} / --sizes {sizes!r}: a value is given twice")
    if not out.strip() or out.endswith(("/", ".")):
        raise MtbenchError(f"--out {out!r} is not an output stem (e.g. reports/figures/inter_task_cost)")
    check_output_file(out + ".json", "--out")
    specs = [resolve_decoder(d.strip(), "swin_tiny_patch4_window7_224") for d in decoder.split(",")]

    def identity(s) -> bool:
        return isinstance(s.make_interaction(["t"], s.neck_channels), IdentityInteraction)

    if flat := [s.name for s in specs if identity(s)]:
        with_stage = [n for n, s in DECODERS.items() if not identity(s)] + [*INTERACTIONS, "DECODER+INTERACTION"]
        raise MtbenchError(f"--decoder {', '.join(flat)}: no interaction stage to measure (identity); decoders with "
                           f"one: {', '.join(with_stage)}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise MtbenchError(f"--decoder {decoder!r} names one decoder twice ({', '.join(names)})")
    dev = resolve_device(device)
    configure_cpu()
    rows = []
    t = Table(title=f"interaction stages alone, Swin-T neck widths, batch 1, device {dev}", title_justify="left")
    for c in ("decoder", "size", "T", "GMACs", "GFLOPs", "latency (ms)"):
        t.add_column(c, justify="left" if c in ("decoder", "size") else "right")
    for h, w in dims:
        for n in counts:
            for name in names:
                r = interaction_cost(name, n, (h, w), device=str(dev), repeats=repeats)
                rows.append(r)
                t.add_row(name, f"{h}x{w}", str(n), f"{r['macs'] / 1e9:.3f}", f"{r['gflops']:.3f}",
                          f"{r['latency_ms']:.1f}")
                console.print(f"{name} {h}x{w} T={n}: {r['macs'] / 1e9:.3f} GMACs ({r['gflops']:.3f} GFLOPs), "
                              f"{r['latency_ms']:.1f} ms")
    console.print(t)
    if len(names) == 2:
        for h, w in dims:
            for n in counts:
                a, b = (next(r for r in rows if (r["decoder"], r["tasks"], r["height"]) == (nm, n, h)
                             and r["width"] == w) for nm in names)
                console.print(f"{h}x{w} T={n}: {names[0]} / {names[1]} = {a['macs'] / b['macs']:.1f}x FLOPs, "
                              f"{a['latency_ms'] / b['latency_ms']:.1f}x latency")
    atomic_write_text(Path(out + ".json"), json.dumps(rows, indent=1) + "\n")
    cost_scaling_figure(rows, out + ".png", title=f"inter-task interaction stages, Swin-T neck, device {dev}")
    console.print(f"wrote {out}.json and {out}.png")


@app.command("train-memory")
def train_memory_cmd(
    methods: str = typer.Option("tdss,mtlora,tadformer", "--methods", "-m", help="methods (with options)"),
    dataset: str = typer.Option("pascal_context", help="setting: pascal_context / nyud (Swin-T 448) or synthetic"),
    batch_size: int = typer.Option(1, help="images per step"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Training-step memory (bytes saved for backward; CUDA peak on CUDA) and step time, beside TDSS Table 3."""
    import torch

    from mtbench.config import parse_method_specs
    from mtbench.measure import count_params, train_step_memory
    from mtbench.registry import build_model, resolve_spec
    from mtbench.datasets import get_dataset
    from mtbench.runner import resolve_device
    from mtbench.cpu import configure_cpu
    from mtbench.swin import create_backbone
    from mtbench.tasks import resolve_tasks

    backbone_name = get_dataset(dataset).backbone  # MtbenchError naming the registered datasets
    if batch_size < 1:
        raise MtbenchError(f"--batch-size must be >= 1, got {batch_size}")
    specs = [resolve_spec(s) for s in parse_method_specs(methods)]
    if len({(s.name, s.method_key) for s in specs}) != len(specs):
        raise MtbenchError(f"a method is listed twice in {methods!r}")
    dev = resolve_device(device)
    configure_cpu()
    task_specs = resolve_tasks(dataset)
    t = Table(title=f"one training step, {backbone_name}, batch {batch_size}, device {dev}",
              title_justify="left")
    for c in ("method", "#TP", "saved for backward (MB)", "CUDA peak (MB)", "s/step"):
        t.add_column(c, justify="left" if c == "method" else "right")
    for rm in specs:
        bb = create_backbone(backbone_name)
        model = build_model(rm, bb, task_specs).to(dev)
        images = torch.randn(batch_size, 3, *bb.img_size, device=dev)
        r = train_step_memory(model, images)
        t.add_row(rm.spec.name + "".join(f",{k}={v}" for k, v in rm.spec.options.items()), f"{count_params(model).trainable:,}", f"{r['saved_mb']:.1f}",
                  "-" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.0f}", f"{r['step_seconds']:.2f}")
        del model
    console.print(t)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: run the Typer app, turning :class:`MtbenchError` into one line and exit code 2, and an
    interrupted run (Ctrl-C, checkpoint written) into one line and exit code 130, and an allocation failure
    (:func:`mtbench.errors.out_of_memory`) into one line and exit code 2.

    Usage errors (unknown command or option, a value of the wrong type, a missing option) are left to click's
    standalone mode, which prints the short usage message and exits with code 2; bare ``mtbench`` shows the help.
    Standalone mode is used rather than catching click's exceptions here because typer >= 0.26 ships its own copy of
    click (``typer._click``) whose exceptions do not derive from the separate ``click`` package's, so an
    ``isinstance`` check against either one breaks on the other (tested bounds: see ``typer`` in pyproject.toml).

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Raises:
        SystemExit: always; code 0 on success, 2 on a user error or usage error, 130 on abort.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # bare `mtbench`: the help, exit 2 with every click version (older ones exit 0 here)
        try:
            app(args=["--help"], prog_name="mtbench", standalone_mode=True)
        except SystemExit:
            pass
        sys.exit(2)
    from mtbench.checkpoint import Interrupted

    try:
        app(args=args, prog_name="mtbench", standalone_mode=True)
    except MtbenchError as e:
        print(f"error: {e}", file=sys.stderr)  # plain print: one line, never wrapped
        sys.exit(2)
    except Interrupted as e:  # Ctrl-C / SIGTERM during a run: the checkpoint is written
        print(f"interrupted: {e}; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except (RuntimeError, MemoryError) as e:  # sizes too large for the machine, where no run or model names them
        if (what := out_of_memory(e)) is None:
            raise
        print(f"error: out of memory ({what}); lower --batch-size or the sizes in --methods", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
