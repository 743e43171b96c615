"""The ``mtbench`` command line (Typer).

Commands: ``list``, ``run``, ``table``, ``params``, ``references``, ``pretrain``, ``attention``. Every user error
(:class:`mtbench.errors.MtbenchError`) prints one line ``error: ...`` on stderr and exits with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mtbench.errors import MtbenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark multi-task parameter-efficient fine-tuning methods for dense vision.")
console = Console(width=None if sys.stdout.isatty() else 200)  # no wrapping when piped


@app.command("list")
def list_cmd() -> None:
    """Show every registered method with its paper, variants and options."""
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
            console.print("  variants: " + "; ".join(f"{v} = {info.name}:" + ",".join(f"{k}={'+'.join(map(str, x)) if isinstance(x, (tuple, list)) else x}" for k, x in p.items())
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
        task_id = self.progress.add_task(label, total=None, loss=float("nan"), ips=0.0, val="")

        def on_step(step, total, loss, ips):
            self.progress.update(task_id, completed=step, total=total, loss=loss, ips=ips)

        def on_epoch(row):
            self.progress.update(task_id, val=f"ep {row['epoch']} val {row['val_score']:+.2f}")

        return on_step, on_epoch


@app.command()
def run(
    methods: str = typer.Option(..., "--methods", "-m", help="methods and options, e.g. 'mtlora:r=32,lora:r=8'; "
                                "a comma item with '=' and no ':' continues the previous method's options"),
    dataset: str = typer.Option("synthetic", help="synthetic | pascal_context | nyud"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks (default: the dataset's default set)"),
    epochs: Optional[int] = typer.Option(None, help="override the dataset recipe's epochs"),
    batch_size: Optional[int] = typer.Option(None, help="override the recipe's batch size"),
    lr: Optional[float] = typer.Option(None, help="override the recipe's peak learning rate"),
    seed: int = typer.Option(0, help="seed of initialisation and data order"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (AMP is used only on CUDA)"),
    data_root: Optional[str] = typer.Option(None, help="dataset root (PASCAL_MT/ or NYUD_MT/ directory)"),
    weights: Optional[str] = typer.Option(None, help="local backbone checkpoint (timm or original Swin format)"),
    init: str = typer.Option("pretrained", help="pretrained | random backbone initialisation"),
    results_dir: str = typer.Option("results", help="where result files are written"),
    existing: str = typer.Option("skip", help="if the result file exists: skip | error | overwrite"),
    max_train_batches: int = typer.Option(0, help="cap batches per epoch (0 = all; smoke tests)"),
    train_size: Optional[int] = typer.Option(None, help="use only the first N training images (synthetic)"),
    decoder: Optional[str] = typer.Option(None, help="decoder (mtbench.decoders): mtlora_hrnet | hrnet_270 | "
                                          "polyhistor_hrnet; default per backbone (Swin-T: mtlora_hrnet, embedded: hrnet_270)"),
) -> None:
    """Train, select on validation, evaluate on test, and write one result file per method."""
    from mtbench.runner import RunRequest, build_datasets, default_command, plan, resolve_device, run_one, set_threads

    req = RunRequest(methods=methods, dataset=dataset, tasks=[t.strip() for t in tasks.split(",")] if tasks else None,
                     seed=seed, device=device, epochs=epochs, batch_size=batch_size, lr=lr,
                     max_train_batches=max_train_batches, data_root=data_root, weights=weights, init=init,
                     results_dir=results_dir, existing=existing, train_size=train_size, command=default_command(),
                     decoder=decoder)
    task_specs, runs, recipe = plan(req)
    dev = resolve_device(device)
    set_threads()
    todo = []
    for r in runs:
        if r.path.exists() and existing == "skip":
            console.print(f"[yellow]skip[/yellow] {r.method.label}: result exists at {r.path} "
                          "(use --existing overwrite to replace it)")
        else:
            todo.append(r)
    if not todo:
        return
    with console.status("preparing data"):
        datasets = build_datasets(req, task_specs)
    console.print(f"dataset [bold]{dataset}[/bold] ({len(datasets[0])}/{len(datasets[1])}/{len(datasets[2])} "
                  f"train/val/test), tasks {', '.join(t.name for t in task_specs)}, device {dev}, "
                  f"{recipe.epochs} epochs x batch {recipe.batch_size}")
    with _RichProgress() as progress:
        for r in todo:
            result = run_one(req, task_specs, r, recipe, datasets, dev, progress)
            dm = result.delta_m.value
            progress.progress.console.print(
                f"[green]done[/green] {r.method.label}: " + ", ".join(f"{t} {v:.2f}" for t, v in result.primary.items())
                + (f", Δm {dm:+.2f}%" if dm is not None else "") + f", #TP {result.params['trainable']:,} -> {r.path}")


@app.command()
def table(
    dataset: str = typer.Option("synthetic", help="dataset whose results to tabulate"),
    results_dir: str = typer.Option("results", help="where result files are"),
    out_dir: str = typer.Option("reports", help="where the Markdown and LaTeX tables are written"),
) -> None:
    """Print the paper-style table (Table 1 layout) from result files and write it under reports/."""
    from mtbench.report import build_table, format_table, write_table

    tab, ref_source = build_table(results_dir, dataset)
    shown = format_table(tab)
    t = Table(title=f"{dataset}: test split", title_justify="left")
    t.add_column("Method")
    for c in shown.columns:
        t.add_column(c, justify="right")
    for label, row in shown.iterrows():
        t.add_row(escape(str(label)), *[str(v) for v in row])
    console.print(t)
    console.print(f"Δm references: {ref_source}" if ref_source else
                  "Δm: no single-task references yet (mtbench run --methods single_task; mtbench references)")
    for p in write_table(tab, out_dir, dataset, ref_source):
        console.print(f"wrote {p}")


@app.command()
def params(
    dataset: str = typer.Option("pascal_context", help="task set of this dataset's setting"),
    methods: Optional[str] = typer.Option(None, "--methods", "-m", help="only these methods (comma-separated)"),
    decoder: Optional[str] = typer.Option(None, help="decoder (default: the backbone's)"),
) -> None:
    """Build every method in the papers' setting (no data, no weights) and print #TP next to the papers'."""
    from mtbench.config import MethodSpec
    from mtbench.measure import COUNTING_RULE, count_params
    from mtbench.registry import build_model, list_methods, resolve, resolve_spec
    from mtbench.runner import DATASET_BACKBONE
    from mtbench.swin import create_backbone
    from mtbench.tasks import resolve_tasks

    from mtbench.decoders import resolve_decoder

    task_specs = resolve_tasks(dataset)
    decoder = resolve_decoder(decoder, DATASET_BACKBONE[dataset]).name
    wanted = None if methods is None else {resolve(m.strip())[0].name for m in methods.split(",") if m.strip()}
    t = Table(title=f"#TP, {DATASET_BACKBONE[dataset]} setting, decoder {decoder}, tasks: "
                    f"{', '.join(x.name for x in task_specs)}",
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
            opts = {} if pc is None else {k: str(v).lower() if isinstance(v, bool) else
                                          "+".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
                                          for k, v in pc.options.items()}
            rm = resolve_spec(MethodSpec(info.name, opts))
            model = build_model(rm, create_backbone(DATASET_BACKBONE[dataset]), task_specs, decoder=decoder)
            pb = count_params(model)
            unfrozen = ", ".join(f"{k} {v:,}" for k, v in pb.backbone_unfrozen.items()) or "-"
            paper = "-" if pc is None or pc.millions is None else f"{pc.millions:.2f}"
            note = "" if pc is None else (pc.source + (f"; {pc.note}" if pc.note else ""))
            same_decoder = pc is not None and pc.decoder == decoder
            if pc is not None and pc.exact is not None and same_decoder:
                note = ("✔ " if pb.trainable == pc.exact else f"✘ expected {pc.exact:,}; ") + note
            elif pc is not None and not same_decoder:
                note = f"(paper on decoder {pc.decoder}) " + note
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
    """Write the single-task references used for Δm from this dataset's ``single_task`` results (mean over seeds)."""
    from mtbench.references import write_references

    path, entry = write_references(results_dir, dataset)
    console.print(f"wrote {path}: " + ", ".join(f"{k} {v:.2f}" for k, v in entry["primary"].items()))


@app.command()
def pretrain(
    epochs: int = typer.Option(30, help="passes over the upstream split"),
    out: str = typer.Option("", help="output .safetensors (default: the packaged embedded weights)"),
    seed: int = typer.Option(0, help="seed"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Pretrain the embedded small Swin on the synthetic *upstream* split (never on train/val/test images)."""
    from mtbench.pretrain import pretrain_embedded
    from mtbench.runner import resolve_device, set_threads

    set_threads()
    path, summary = pretrain_embedded(epochs=epochs, out=out or None, seed=seed, device=resolve_device(device),
                                      log=console.print)
    console.print(f"wrote {path}: {summary}")


@app.command()
def attention(
    result: str = typer.Option("results/synthetic/tadformer/default/seed0.json",
                               help="result file of a trained method with task prompts"),
    n: int = typer.Option(4, help="number of test images"),
    stage: int = typer.Option(0, help="backbone stage whose last block's maps are drawn (0 = finest)"),
    out: str = typer.Option("", help="output PNG (default reports/attention_{method}_{variant}_stage{S}.png)"),
) -> None:
    """Draw the task attention maps of a trained model (TADFormer Fig. 7) for a few test images."""
    import torch

    from mtbench.data import build_dataset
    from mtbench.figures import attention_figure
    from mtbench.runner import load_trained

    model, res = load_trained(result)
    if n < 1:
        raise MtbenchError(f"--n must be >= 1, got {n}")
    test = build_dataset(res.run.dataset, "test", tasks=res.run.tasks)
    images = torch.stack([test[i]["image"] for i in range(min(n, len(test)))])
    path = out or f"reports/attention_{res.run.method}_{res.run.variant}_stage{stage}.png"
    attention_figure(model, images, path, stage=stage, title=f"{res.run.label}: task attention maps, stage {stage}")
    console.print(f"wrote {path}")


def main() -> None:
    """Console entry point: run the Typer app, turning :class:`MtbenchError` into one line and exit code 2."""
    try:
        app(standalone_mode=False)
    except MtbenchError as e:
        print(f"error: {e}", file=sys.stderr)  # plain print: one line, never wrapped
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors and the like
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
