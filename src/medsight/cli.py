"""`medsight` command line. Entry points set up logging and progress; library code stays quiet.

Every user error (MedsightError) is printed as one line on stderr with exit code 2, without a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from medsight.errors import MedsightError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="medsight: train, evaluate, explain and serve medical image classifiers.")
console = Console(stderr=True)
out_console = Console()


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


class _Progress:
    """Rich progress bar fed by the trainer's callback events."""

    def __init__(self, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.enabled = enabled and _is_main_process()
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                                 disable=not self.enabled, transient=False)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *a):
        self.progress.__exit__(*a)

    def __call__(self, event: str, info: dict) -> None:
        if not self.enabled:
            return
        if event == "start":
            self.total = info["epochs"]
            self.task = self.progress.add_task("train", total=info["steps"], epoch=f"{info['start_epoch'] + 1}/{info['epochs']}", info="")
        elif event == "step" and self.task is not None:
            self.progress.update(self.task, completed=info["step"], total=info["steps"],
                                 epoch=f"{info['epoch'] + 1}/{self.total}", info=f"loss {info['loss']:.4f}")
        elif event == "epoch" and self.task is not None:
            auc = info.get("val_auc")
            line = (f"epoch {info['epoch']:>3}  train_loss {info['train_loss']:.4f}  val_loss {info['val_loss']:.4f}"
                    + (f"  val_auc {auc:.4f}" if auc is not None else "")
                    + (f"  val_acc {info['val_accuracy']:.4f}" if "val_accuracy" in info else "")
                    + ("  *" if info.get("improved") else ""))
            self.progress.console.print(line)
            self.progress.reset(self.task)
        elif event == "early_stop":
            self.progress.console.print(f"early stop at epoch {info['epoch']} (best epoch {info['best_epoch']})")
        elif event == "resumed":
            self.progress.console.print(f"resuming at epoch {info['epoch'] + 1}")


def metrics_table(metrics: dict, title: str = "metrics") -> Table:
    """Rows = metrics, columns = splits; values with their 95% CI when present."""
    splits = [s for s in metrics if isinstance(metrics[s], dict)]
    names: list[str] = []
    for s in splits:
        names += [k for k, v in metrics[s].items() if isinstance(v, dict) and isinstance(v.get("value"), (int, float)) and k not in names]
    table = Table(title=title)
    table.add_column("metric")
    for s in splits:
        table.add_column(s, justify="right")
    for n in names:
        cells = []
        for s in splits:
            v = metrics[s].get(n)
            if not isinstance(v, dict) or v.get("value") is None:
                cells.append("-")
                continue
            ci = v.get("ci")
            cells.append(f"{v['value']:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""))
        table.add_row(n, *cells)
    return table


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="MedMNIST name (breastmnist, ...), .npz, class-per-folder tree or CSV"),
    model: Optional[str] = typer.Option(None, help="registered model name (see `medsight models`)"),
    epochs: Optional[int] = typer.Option(None),
    out: Path = typer.Option(Path("runs/run"), help="bundle folder to write"),
    config: Optional[Path] = typer.Option(None, help="YAML config; flags override it"),
    recipe: Optional[str] = typer.Option(None, help="packaged recipe (breastmnist, breastmnist_64, pneumoniamnist, "
                                         "adrenalmnist3d) or a YAML path: defaults, then --config, then flags"),
    seed: Optional[int] = typer.Option(None),
    size: Optional[int] = typer.Option(None, help="input size (MedMNIST: 28, 64, 128, 224)"),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    task: Optional[str] = typer.Option(None, help="override the task type: binary, multiclass, multilabel, ordinal"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if available)"),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoints/last.pt"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="turn augmentation on or off"),
    set_: List[str] = typer.Option([], "--set", help="any config value, e.g. --set train.schedule=step"),
    progress: bool = typer.Option(True, help="show a progress bar"),
):
    """Train a model and write a bundle (weights, config, preprocessing, history, metrics)."""
    from medsight.config import load_config
    from medsight.pipeline import run_training

    overrides = {"data.name": data, "model.name": model, "train.epochs": epochs, "train.seed": seed,
                 "data.size": size, "train.batch_size": batch_size, "train.lr": lr, "data.task": task,
                 "train.device": device}
    if augment is not None:
        overrides["augment.enabled"] = augment
    for item in set_:
        if "=" not in item:
            raise MedsightError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        import yaml

        overrides[k.strip()] = yaml.safe_load(v)
    cfg = load_config(config, overrides, recipe=recipe)
    with _Progress(progress) as bar:
        out_path, result, metrics = run_training(cfg, out, resume=resume, callback=bar)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _is_main_process():
        out_console.print(metrics_table(metrics, title=f"{cfg.model.name} on {cfg.data.name} "
                                                       f"(best epoch {result.best_epoch}, {result.seconds:.1f}s)"))
        out_console.print(f"bundle written to {out_path}")


@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="bundle folder written by `medsight train`"),
    data: Optional[str] = typer.Option(None, help="dataset (default: the one the bundle was trained on)"),
    split: List[str] = typer.Option(["test"], help="split(s) to evaluate"),
    size: Optional[int] = typer.Option(None),
    n_boot: int = typer.Option(1000, help="bootstrap resamples for 95% CIs (0 = none)"),
    json_out: bool = typer.Option(False, "--json", help="print metrics as JSON"),
):
    """Evaluate a bundle on a split; prints a metrics table and writes metrics.json in the bundle."""
    from medsight.bundle import load_bundle
    from medsight.data.sources import load_dataset
    from medsight.pipeline import evaluate_and_store

    b = load_bundle(bundle)
    src = b.meta["preprocessing"].get("source", {})
    name = data or src.get("medmnist") or b.meta["data"]
    sz = size or src.get("size") or b.meta["input"]["size"][0]
    ds = load_dataset(name, size=sz)
    metrics = evaluate_and_store(b, ds, splits=tuple(split), n_boot=n_boot)
    shown = {s: metrics[s] for s in split}
    if json_out:
        from medsight.utils import json_safe

        out_console.print_json(json.dumps(json_safe(shown)))
    else:
        out_console.print(metrics_table(shown, title=f"{bundle} on {name}"))


@app.command()
def datasets(root: Optional[Path] = typer.Option(None, help="data folder (default $MEDSIGHT_DATA_DIR or ~/.medsight/data)")):
    """List the known MedMNIST datasets and whether each is present locally."""
    from medsight.data.sources import default_data_dir, local_status

    rows = local_status(root)
    table = Table(title=f"MedMNIST datasets in {root or default_data_dir()}")
    for col in ("name", "size", "task", "dims", "classes", "present"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["size"]), r["task"], f"{r['dims']}D", str(r["classes"]),
                      "[green]yes[/green]" if r["present"] else "no")
    out_console.print(table)


@app.command()
def models():
    """List the registered model architectures."""
    from medsight.models import list_models

    table = Table(title="models")
    table.add_column("name")
    table.add_column("description")
    for n, d in list_models().items():
        table.add_row(n, d)
    out_console.print(table)


bench_app = typer.Typer(no_args_is_help=True, help="benchmarks: accuracy per compute, throughput")
app.add_typer(bench_app, name="bench")


@bench_app.command("medmnist")
def bench_medmnist(
    datasets: List[str] = typer.Option(["breastmnist", "breastmnist_64", "pneumoniamnist", "adrenalmnist3d"],
                                       "--datasets", help="benchmark keys (repeat or comma-separate)"),
    seeds: str = typer.Option("0,1,2", help="comma-separated seeds"),
    quick: bool = typer.Option(False, help="tiny smoke run (1 epoch, 64 training images): numbers meaningless"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda (default: cuda if available)"),
    ref_epochs: int = typer.Option(2, help="epochs of the reference ResNet-18 recipe (x100/epochs = full cost)"),
    epochs_cap: Optional[int] = typer.Option(None, help="run recipes for at most this many epochs (cost estimate)"),
    amp: str = typer.Option("off", help="bf16 autocast: off, on, auto"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads"),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="where medmnist.md / medmnist.json go"),
    stem: str = typer.Option("medmnist", help="file name stem of the results"),
):
    """Train the recommended recipes for several seeds; table vs the MedMNIST v2 paper and the reference recipe."""
    from medsight.benchmark import run_benchmark, to_markdown, write_results

    keys = [k.strip() for d in datasets for k in d.split(",") if k.strip()]
    result = run_benchmark(keys, [int(s) for s in seeds.split(",")], device=device, quick=quick,
                           ref_epochs=ref_epochs, epochs_cap=epochs_cap, amp=amp, threads=threads,
                           log=lambda m: console.print(m, highlight=False))
    md, js = write_results(result, out_dir, stem)
    out_console.print(to_markdown(result), highlight=False, soft_wrap=True)
    console.print(f"written {md} and {js}")


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except MedsightError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.Exit):
            return e.exit_code
        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
