"""`medsight` command line: parses arguments, calls the library, prints. What it prints is rendered by
:mod:`medsight.console` (tables, progress bars, the one logging set-up); library code stays quiet.

Every user error (MedsightError) is printed as one line on stderr with exit code 2, without a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from medsight.console import Opts as _Opts
from medsight.console import RichSink as _RichSink
from medsight.console import TrainingProgress as _Progress
from medsight.console import console, current_sink, metrics_table, out_console, shift_table
from medsight.console import info as _info
from medsight.console import is_main_process as _is_main_process
from medsight.console import show_tracking_warnings as _show_tracking_warnings
from medsight.errors import MedsightError

def _plain_help_markers() -> None:
    """Help without typer's type markers: no ``<bool>`` beside a flag, ``PATH`` / ``INTEGER`` / ``TEXT`` instead of
    ``<path>`` / ``<int>`` / ``<str>``, ``FILES...`` instead of ``<list[Path]>``, and ``BUNDLE`` (not ``{bundle}``)
    in usage lines. Only the help text changes; parsing is typer's own. Older typer versions without these hooks
    are left as they are."""
    try:
        from typer import core as tc
    except ImportError:  # pragma: no cover
        return
    base = getattr(tc, "_TyperParameter", None)
    if base is None or getattr(base, "_medsight_plain", False) or not hasattr(base, "display_type"):
        return
    words = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "path": "PATH", "Path": "PATH", "file": "FILE",
             "directory": "FOLDER", "int range": "INTEGER", "float range": "NUMBER"}
    original = base.display_type

    def display_type(self, ctx):
        if getattr(self, "is_flag", False):
            return None
        label = str(original(self, ctx)).strip("<>")
        if label.startswith("list[") and label.endswith("]"):
            label = label[5:-1]
        return words.get(label, label if "|" in label else label.upper())

    base.display_type = display_type
    opt = getattr(tc, "TyperOption", None)
    if opt is not None and hasattr(opt, "display_type_rich"):
        rich_original = opt.display_type_rich

        def display_type_rich(self, ctx):
            if getattr(self, "is_flag", False):
                return None
            return rich_original(self, ctx)

        opt.display_type_rich = display_type_rich
    arg = getattr(tc, "TyperArgument", None)
    if arg is not None and hasattr(arg, "_usage_display_name"):
        def _usage_display_name(self):
            name = str(getattr(self, "display_name_raw", None) or self.name).upper()
            name = name if self.required else f"[{name}]"
            return name + ("..." if self.nargs != 1 else "")

        arg._usage_display_name = _usage_display_name
    base._medsight_plain = True


_plain_help_markers()

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="medsight: train, evaluate, explain and serve medical image classifiers.")


def _version(value: bool) -> None:
    if value:
        from medsight import __version__

        out_console.print(f"medsight {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _global_options(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="only results and errors: no progress bars, "
                                                             "no info lines, library warnings off"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging; tracebacks for unexpected errors"),
):
    """medsight: train, evaluate, explain and serve medical image classifiers."""
    from medsight.console import setup_logging

    if quiet and verbose:
        raise MedsightError("--quiet and --verbose exclude each other")
    _Opts.quiet, _Opts.verbose = quiet, verbose
    setup_logging(quiet=quiet, verbose=verbose, server=ctx.invoked_subcommand == "serve")


def _plural(n: int, word: str, many: str | None = None) -> str:
    """``1 prediction``, ``2 predictions``, ``1 entry``, ``0 entries``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _check_inputs(paths) -> None:
    """Inputs named on the command line must exist: a missing one is bad input (exit 2, one line), before any work.
    Files that exist but cannot be read are per-file refusals later (exit 1)."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        more = f" (and {_plural(len(missing) - 1, 'other')})" if len(missing) > 1 else ""
        raise MedsightError(f"input not found: {missing[0]}{more}")


def result_meta(path) -> dict:
    return json.loads((Path(path) / "bundle.json").read_text())


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="what to train on (required unless --config, --recipe or --resume "
                                       "names it): a MedMNIST name (breastmnist, ...), an .npz, a class-per-folder "
                                       "tree or a CSV manifest"),
    model: Optional[str] = typer.Option(None, help="registered model name (see `medsight models`)"),
    epochs: Optional[int] = typer.Option(None, help="most epochs to train; early stopping on validation may end "
                                         "sooner (default: from the automatic recipe, else 30)"),
    out: Path = typer.Option(Path("runs/run"), help="bundle folder to write"),
    config: Optional[Path] = typer.Option(None, help="YAML config; flags override it"),
    recipe: Optional[str] = typer.Option(None, help="packaged recipe (breastmnist, breastmnist_64, pneumoniamnist, "
                                         "adrenalmnist3d) or a YAML path: defaults, then --config, then flags"),
    seed: Optional[int] = typer.Option(None, help="random seed of weights, batch order, augmentation and "
                                       "dropout (default: 0)"),
    size: Optional[int] = typer.Option(None, help="input side in pixels (MedMNIST: 28, 64, 128, 224; default: the "
                                       "data's own size, or the automatic recipe's for files)"),
    batch_size: Optional[int] = typer.Option(None, help="training images per optimiser step (default: from the "
                                             "automatic recipe, else 32)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default: 0.001)"),
    task: Optional[str] = typer.Option(None, help="override the task type: binary, multiclass, multilabel, ordinal"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 (default: cuda if available)"),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoints/last.pt"),
    overwrite: bool = typer.Option(False, help="replace the bundle in OUT (only once the new run has finished)"),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="turn augmentation on or off"),
    operating_point: Optional[str] = typer.Option(None, help="threshold rule on val: youden, f1, sens=0.95, spec=0.9, or a number"),
    set_: List[str] = typer.Option([], "--set", help="any config value, e.g. --set train.schedule=step"),
    progress: bool = typer.Option(True, help="show a progress bar (on a terminal)"),
    auto: Optional[bool] = typer.Option(None, "--auto/--no-auto", help="choose every setting not given from the "
                                        "data (model, epochs, augmentation, input size for files); default: on "
                                        "unless --recipe, --config or --resume is given"),
    ensemble: Optional[int] = typer.Option(None, help="train N seed-ensemble members into one bundle (mean of "
                                           "their logits; spread reported)"),
    track: Optional[bool] = typer.Option(None, "--track/--no-track", help="log the run to MLflow at "
                                         "$MLFLOW_TRACKING_URI (default: ./mlflow.db); config track.enabled"),
    track_required: bool = typer.Option(False, help="with --track: an unreachable tracking server is an error "
                                        "(exit 2) instead of a warning; config track.required"),
):
    """Train a model and write a bundle (weights, config, preprocessing, history, metrics)."""
    from medsight.config import load_config
    from medsight.pipeline import end_distributed, resume_config, run_training

    overrides = {"data.name": data, "model.name": model, "train.epochs": epochs, "train.seed": seed,
                 "data.size": size, "train.batch_size": batch_size, "train.lr": lr, "data.task": task,
                 "train.device": device, "train.operating_point": operating_point}
    if augment is not None:
        overrides["augment.enabled"] = augment
    if ensemble is not None:
        overrides["train.ensemble"] = ensemble
    overrides["auto"] = auto if auto is not None else (recipe is None and config is None and not resume)
    if track is not None or track_required:
        overrides["track.enabled"] = bool(track or track_required)
    if track_required:
        overrides["track.required"] = True
    for item in set_:
        if "=" not in item:
            raise MedsightError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        import yaml

        overrides[k.strip()] = yaml.safe_load(v)
    if resume and config is None and recipe is None:
        config = resume_config(out)  # continue the same run: its resolved config, then any flags given now
    labels = {"data.name": "--data", "model.name": "--model", "train.epochs": "--epochs", "train.seed": "--seed",
              "data.size": "--size", "train.batch_size": "--batch-size", "train.lr": "--lr", "data.task": "--task",
              "train.device": "--device", "train.operating_point": "--operating-point",
              "augment.enabled": "--augment" if augment else "--no-augment", "train.ensemble": "--ensemble",
              "track.enabled": "--track", "track.required": "--track-required", "auto": "--auto"}
    for item in set_:
        labels[item.split("=", 1)[0].strip()] = f"--set {item.strip()}"
    cfg = load_config(config, overrides, recipe=recipe, labels=labels)
    if "name" not in cfg.data.model_fields_set:  # no silent default dataset
        raise _click_exceptions("UsageError")[0](
            "Missing option '--data': what to train on (a MedMNIST name such as breastmnist, an .npz, a folder or a "
            "CSV manifest), or a --config / --recipe that names it")
    if cfg.track.enabled:
        _show_tracking_warnings()
    try:
        with _Progress(progress) as bar:
            out_path, result, metrics = run_training(cfg, out, resume=resume, overwrite=overwrite, callback=bar)
    except KeyboardInterrupt as e:
        _interrupted_training(out)
        e.medsight_reported = True  # type: ignore[attr-defined]
        raise
    end_distributed()
    if _is_main_process():
        ran = len(result.history)
        stop = (f", stopped early at epoch {ran} of {cfg.train.epochs} (patience {cfg.train.patience})"
                if result.stopped_early else "")
        out_console.print(metrics_table(metrics, title=f"{cfg.model.name} on {cfg.data.name} "
                                                       f"(best epoch {result.best_epoch}{stop}, {result.seconds:.1f}s)"))
        from medsight.bundle import decision_text

        _info(f"bundle written to {out_path} ({decision_text(result_meta(out_path))})")
        if cfg.track.enabled:
            from medsight.tracking import read_side_file

            side = read_side_file(out_path)
            if side is not None:
                _info(f"tracked as MLflow run {side['run_id']} on {side['tracking_uri']}")


def _interrupted_training(out: Path) -> None:
    """Ctrl-C during `train`: where the unfinished run is and how to go on (the bundle in OUT, if any, is intact)."""
    from medsight.bundle import staging_dir

    sink = current_sink()
    if sink is not None:
        sink.close()
    stage = staging_dir(out)
    ck = stage / "checkpoints" / "last.pt"
    if ck.is_file():
        console.print(f"interrupted: the unfinished run is in {stage} (checkpoint after the last finished epoch: {ck}); "
                      f"continue it with: medsight train --out {out} --resume", highlight=False, markup=False,
                      soft_wrap=True)
    else:
        console.print(f"interrupted before the first epoch finished: nothing to resume in {stage}; "
                      + (f"{out} is unchanged" if out.exists() else f"nothing was written to {out}"),
                      highlight=False, markup=False, soft_wrap=True)


@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="bundle folder written by `medsight train`"),
    data: Optional[str] = typer.Option(None, help="dataset (default: the one the bundle was trained on)"),
    split: List[str] = typer.Option(["test"], help="split(s) to evaluate"),
    size: Optional[int] = typer.Option(None, help="input side in pixels (default: the bundle's own)"),
    operating_point: Optional[str] = typer.Option(
        None, help="re-choose the threshold on the val split: youden, f1, sens=0.95, spec=0.9, or a number"),
    n_boot: int = typer.Option(1000, help="bootstrap resamples for 95% CIs (0 = none)"),
    report: bool = typer.Option(True, help="write report.html into the bundle"),
    shift: bool = typer.Option(False, help="also run the seeded corruption battery (robustness to distribution shift)"),
    shift_severities: str = typer.Option("1,3,5", help="severities 1..5, comma separated"),
    shift_corruptions: Optional[str] = typer.Option(None, help="comma-separated corruption names (default: all)"),
    json_out: bool = typer.Option(False, "--json", help="print metrics as JSON"),
    track: bool = typer.Option(False, help="log the metrics and report to MLflow: a child run of the bundle's "
                               "training run (its tracking.json), else a new run"),
):
    """Evaluate a bundle: metrics with 95% CIs per split into metrics.json, and a self-contained report.html."""
    from medsight.bundle import load_bundle
    from medsight.evaluate import evaluate_bundle
    from medsight.pipeline import load_data_for_bundle

    b = load_bundle(bundle)
    ds = load_data_for_bundle(b, data, size)
    r = evaluate_bundle(b, ds, tuple(split), n_boot=n_boot, operating_point=operating_point, report=report,
                        shift=shift, shift_severities=shift_severities, shift_corruptions=shift_corruptions)
    shown = {s: r["metrics"][s] for s in split}
    if json_out:
        from medsight.utils import json_safe

        out_console.print_json(json.dumps(json_safe(shown)))
    else:
        from medsight.bundle import decision_text

        decided = decision_text(b.meta.model_copy(update={"threshold": r["threshold"], "threshold_rule": r["rule"]}))
        out_console.print(metrics_table(shown, title=f"{bundle} on {ds.name}: {decided}"))
    if r["shift"] is not None:
        out_console.print(shift_table(r["shift"], split[-1]))
    _info(f"metrics written to {r['metrics_path']}")
    if r["report_path"] is not None:
        _info(f"report written to {r['report_path']}")
    if track:
        from medsight.tracking import track_evaluation

        _show_tracking_warnings()
        t = track_evaluation(bundle, r["metrics"], splits=split, data_name=ds.name, report=r["report_path"],
                             params={"data": ds.name, "splits": ",".join(split), "n_boot": n_boot,
                                     "operating_point": operating_point or b.meta.threshold_rule})
        if t is not None and not t.failed:
            _info(f"tracked as MLflow run {t.run_id}")


@app.command()
def explain(
    bundle: Path = typer.Argument(..., help="bundle folder"),
    files: List[Path] = typer.Argument(..., help="images, DICOM files or series folders, NIfTI volumes"),
    out: Path = typer.Option(Path("explanations"), help="folder for <name>_heatmap.npy and <name>_overlay.png"),
    method: str = typer.Option("gradcam", help="gradcam or occlusion"),
    class_idx: Optional[int] = typer.Option(None, help="class to explain (default: the predicted one)"),
    clinical_csv: Optional[Path] = typer.Option(None, help="image + clinical models: CSV with a 'path' column "
                                                            "(file path or name) and the model's clinical columns"),
):
    """Heatmaps (Grad-CAM or occlusion) over each input, as arrays and PNG overlays (3D: three orthogonal slices)."""
    from rich.markup import escape

    from medsight.fusion import read_clinical_csv
    from medsight.predict import Predictor

    _check_inputs(files)
    predictor = Predictor(bundle)
    clinical = read_clinical_csv(clinical_csv) if clinical_csv is not None else None
    failures = 0
    for r in predictor.explain_paths(files, out, method=method, class_idx=class_idx, clinical=clinical):
        if r["error"]:
            console.print(f"[red]error:[/red] {escape(r['error'])}", highlight=False)
            failures += 1
        else:
            out_console.print(f"{escape(r['file'])}: {escape(r['summary'])} -> {escape(str(r['overlay']))}",
                              highlight=False)
    if failures:
        raise typer.Exit(1)


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


_CLUSTER_HELP = "run on a Dask cluster: tcp://HOST:8786 (a running `dask scheduler`) or local:N (N worker processes here)"


def _executor(cluster: Optional[str]):
    """--cluster SPEC -> a Dask executor (its dashboard link shown when one runs); None -> this process."""
    import logging

    from medsight.executor import make_executor

    if cluster is not None and not _Opts.verbose:  # Dask logs tracebacks of lost connections; the CLI says one line
        try:
            import distributed  # noqa: F401 - its logging set-up first, then quieted
        except ImportError:
            pass  # make_executor names the extra to install
        for name in ["distributed", *[n for n in logging.root.manager.loggerDict if n.startswith("distributed.")]]:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    ex = make_executor(cluster)
    if ex.dashboard_link:
        _info(f"Dask dashboard: {ex.dashboard_link}")
    return ex


def _rate_line(st: dict) -> str:
    return (f"{st['done_now']} files in {st['seconds']:.1f}s ({st['rate']:.1f} files/s) on {st['workers']} "
            f"worker(s) of {st['executor']}" + (f"; {st['done_before']} done by an earlier run" if st["done_before"] else ""))


def _predict_on_cluster(bundle, inputs, out, cluster, backend, batch_size, heatmaps, clinical_csv) -> None:
    from medsight.cluster import predict_files
    from medsight.predict import expand_inputs

    if out is None or heatmaps is not None or clinical_csv is not None:
        raise MedsightError("--cluster needs --out (rows and their manifest go there) and does not take --heatmaps "
                            "or --clinical-csv")
    files = expand_inputs(inputs)
    if not files:
        raise MedsightError(f"no image files found in {', '.join(map(str, inputs))}")
    with _executor(cluster) as ex:
        st = predict_files(bundle, files, out, executor=ex, backend=backend, batch_size=batch_size)
    _info(_rate_line(st))
    if st["errors"]:
        out_console.print(f"{_plural(st['files'], 'prediction')} written to {escape(str(out))}; {st['errors']} of {st['files']} "
                          "files could not be used (see the error column)", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out_console.print(f"{_plural(st['files'], 'prediction')} written to {escape(str(out))}, no errors", highlight=False,
                      soft_wrap=True)


@app.command()
def qc(
    data: str = typer.Argument(..., help="class-per-folder tree, CSV manifest, .npz, or a MedMNIST name"),
    near_dup: int = typer.Option(4, help="max perceptual-hash Hamming distance for near duplicates"),
    size: int = typer.Option(28, help="MedMNIST size when DATA is a name"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON, every finding "
                                             "listed"),
    layout: str = typer.Option("auto", help="folders: auto, classes (class-per-folder tree) or raw (any unlabelled "
                               "flat or nested dump)"),
    allow_leakage: bool = typer.Option(False, "--allow-leakage", help="accept duplicates across splits: record "
                                       "them (counts) and exit 0"),
    out: Optional[Path] = typer.Option(None, help="also write one row per file to this CSV, resumably (a manifest "
                                       "beside it records finished files: re-run the same command after a crash)"),
    cluster: Optional[str] = typer.Option(None, help=_CLUSTER_HELP + " (needs --out)"),
):
    """Data quality report: unreadable files, duplicates within/across splits, balance, outliers, missing labels;
    for raw DICOM dumps also series counts and how many files carry identifying headers (counts only)."""
    from medsight.data.medmnist import INFO
    from medsight.data.quality import render_qc, run_qc
    from medsight.data.sources import medmnist_path
    from medsight.utils import write_json

    source = str(medmnist_path(data, size)) if data.lower() in INFO else data
    if cluster is not None and out is None:
        raise MedsightError("qc --cluster needs --out ROWS.csv: one row per file, and the manifest that makes the "
                            "run resumable beside it")
    with _executor(cluster) as ex:
        status: dict = {}
        facts = None
        if out is not None:
            from medsight.cluster import qc_facts

            facts = qc_facts(out, executor=ex, status=status)
        report = run_qc(source, near_dup_threshold=near_dup, layout=layout, allow_leakage=allow_leakage, facts=facts,
                        max_examples=None if json_path else 20)  # the JSON file lists every finding
    out_console.print(render_qc(report))
    if status.get("out"):
        _info(f"{status['files']} file rows written to {escape(status['out'])} ({_rate_line(status)})")
    elif out is not None:
        _info(f"{escape(data)} holds arrays, not files: checked in this process, no file rows written to {escape(str(out))}")
    if json_path:
        write_json(json_path, report, private=True)  # file paths and errors of patient files: 0600
    if not report.get("ok", True):
        raise typer.Exit(1)


@app.command()
def deid(
    in_dir: Path = typer.Argument(..., help="folder of DICOM files (never modified)"),
    out_dir: Path = typer.Argument(..., help="new or empty folder for the de-identified copies"),
    mapping: Optional[Path] = typer.Option(None, help="write an old->new identifier and file-name mapping CSV here (identifying: keep it safe)"),
    secret_env: Optional[str] = typer.Option(None, help="environment variable holding the secret for reproducible pseudonyms"),
    keep_private: bool = typer.Option(False, help="keep private tags (removed by default)"),
    allow_burned_in: bool = typer.Option(False, help="also write images that may carry burned-in text (US/SC/XC/OT/ES, "
                                                     "Secondary Capture, BurnedInAnnotation YES); they are listed either way"),
    cluster: Optional[str] = typer.Option(None, help=_CLUSTER_HELP + "; needs --secret-env; published batch by "
                                          "batch, each verified first, resumable"),
):
    """De-identify DICOM files by allow-list (PS3.15 Basic Profile or stricter), then verify no original value survived."""
    import os

    from medsight.data.deid import deidentify

    secret = None
    if secret_env:
        secret = os.environ.get(secret_env)
        if secret is None:
            raise MedsightError(f"--secret-env {secret_env}: that environment variable is not set")
    if cluster is not None:
        from medsight.cluster import deid_files

        with _executor(cluster) as ex:
            summary = deid_files(in_dir, out_dir, secret=secret or b"", executor=ex, mapping_csv=mapping,
                                 keep_private=keep_private, allow_burned_in=allow_burned_in)
        _info(_rate_line(summary))
    else:
        summary = deidentify(in_dir, out_dir, mapping_csv=mapping, secret=secret, keep_private=keep_private,
                             allow_burned_in=allow_burned_in)
    errors = summary.get("errors") or []
    burned = summary.get("burned_in") or []
    held = 0 if summary.get("burned_in_written") else len(burned)
    lenient = summary.get("warnings") or 0
    out_console.print(f"de-identified {_plural(summary.get('written', 0), 'file')} into {out_dir}; verified: no "
                      f"original identifying value in headers, preamble or codestream segments ({len(summary.get('skipped') or [])} "
                      f"skipped, {held} held back for burned-in text, {_plural(len(errors), 'error')})"
                      + ("" if _Opts.quiet or not lenient else
                         f"; {_plural(lenient, 'non-standard value')} read leniently (not shown: they may identify)"),
                      highlight=False, soft_wrap=True)
    for e in errors:
        out_console.print(f"  error: {e['path']}: {e['error']}")
    for p in burned:
        if summary.get("burned_in_written"):
            out_console.print(f"  written, may carry burned-in text (pixels not cleaned): {p}")
        else:
            out_console.print(f"  held back, may carry burned-in text (--allow-burned-in to write it): {p}")
    if errors:
        raise typer.Exit(1)


@app.command()
def predict(
    bundle: Path = typer.Argument(..., help="bundle folder written by `medsight train`"),
    inputs: List[Path] = typer.Argument(..., help="PNG/JPEG/TIFF, DICOM or NIfTI files, or folders (walked recursively)"),
    out: Optional[Path] = typer.Option(None, help="stream results to .csv, .jsonl or .json (default: print a table)"),
    heatmaps: Optional[Path] = typer.Option(None, help="write a Grad-CAM overlay PNG per file into this folder"),
    backend: str = typer.Option("torch", help="torch or onnx (ONNX Runtime; exports model.onnx when missing)"),
    batch_size: int = typer.Option(64, help="files per batch"),
    workers: Optional[int] = typer.Option(None, min=0, help="processes decoding files, a batch ahead (default: "
                                          "none for one batch, else up to 4); memory stays bounded by two batches"),
    clinical_csv: Optional[Path] = typer.Option(None, help="image + clinical models: CSV with a 'path' column "
                                                            "(file path or name) and the model's clinical columns"),
    cluster: Optional[str] = typer.Option(None, help=_CLUSTER_HELP + "; needs --out (.csv, .json, .jsonl or "
                                          ".parquet), resumable: re-run the same command after a crash"),
):
    """Predict files with a bundle: probabilities, the decision at the bundle's threshold, and an OOD flag.

    Rows are written as each batch finishes (a crash keeps the rows before it); exit status 1 when any file
    could not be used."""
    from rich.markup import escape

    from medsight.bundle import load_bundle
    from medsight.predict import (OUTPUT_SUFFIXES, Predictor, default_threads, default_workers, expand_inputs,
                                  write_predictions)

    if cluster is not None:
        return _predict_on_cluster(bundle, inputs, out, cluster, backend, batch_size, heatmaps, clinical_csv)
    if out is not None and out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise MedsightError(f"--out must end in .csv or .json (or .jsonl for JSON lines), got {out.name!r}")
    _check_inputs(inputs)
    b = load_bundle(bundle)
    predictor = Predictor(b, backend=backend, threads=default_threads(b))
    from medsight.fusion import read_clinical_csv

    clinical = read_clinical_csv(clinical_csv) if clinical_csv is not None else None
    files = expand_inputs(inputs)
    if not files:
        raise MedsightError(f"no image files found in {', '.join(map(str, inputs))}")
    results = predictor.iter_predictions(files, batch_size=batch_size, heatmaps_dir=heatmaps, clinical=clinical,
                                         workers=default_workers(len(files), batch_size) if workers is None else workers)
    classes = predictor.classes

    def report_error(p) -> None:  # one line per unusable file, the reader's message (never a traceback)
        if p.error is not None:
            console.print(f"[red]error:[/red] {escape(p.error)}", highlight=False, soft_wrap=True)

    if out is not None:
        n, n_err = write_predictions(results, out, classes, on_row=report_error)
        summary = f"{_plural(n, 'prediction')} written to {escape(str(out))}"
    else:
        rows = []
        for p in results:
            report_error(p)
            rows.append(p)
        n, n_err = len(rows), sum(not p.ok for p in rows)
        from medsight.review import NO_VERDICT
        from medsight.summary import threshold_rule_sentence

        decided = (threshold_rule_sentence(b.meta.threshold_rule, predictor.threshold)
                   if predictor.threshold is not None else "decision by argmax")
        table = Table(title=escape(f"{bundle} ({predictor.version}, {decided})"))
        table.add_column("file")
        for c in classes:
            table.add_column(escape(f"p({c})"), justify="right")
        table.add_column("predicted")
        table.add_column("OOD")
        table.add_column("review")
        table.add_column("error")
        for p in rows:
            r = p.to_dict()
            probs = [f"{r['probabilities'][c]:.4f}" if r["error"] is None else "-" for c in classes]
            pred = ", ".join(r["predicted"]) if isinstance(r["predicted"], list) else (
                r["predicted"] or (NO_VERDICT if r["ood_flag"] else "-"))
            ood = "-" if r["ood_flag"] is None else ("[yellow]flagged[/yellow]" if r["ood_flag"] else "ok")
            review = "-" if r["error"] else ("[yellow]yes[/yellow]" if r["review"] else "no")
            table.add_row(escape(r["file"]), *probs, escape(pred), ood, review, escape(r["error"] or ""))
        out_console.print(table)
        for p in rows:  # why each flagged result needs review, in the words the service and the page use
            if p.ok and p.review:
                out_console.print(escape(f"needs review: {p.file}: " + "; ".join(p.review_reasons)),
                                  highlight=False, soft_wrap=True)
        summary = _plural(n, "prediction")
    if heatmaps is not None:
        out_console.print(f"heatmaps written to {escape(str(heatmaps))}", highlight=False, soft_wrap=True)
    if n_err:
        out_console.print(f"{summary}; {n_err} of {_plural(n, 'file')} could not be used (see the error column)",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out_console.print(f"{summary}, no errors", highlight=False, soft_wrap=True)


@app.command()
def export(
    bundle: Path = typer.Argument(..., help="bundle folder written by `medsight train`"),
    format: str = typer.Option("onnx", "--format", help="export format (onnx)"),
    out: Optional[Path] = typer.Option(None, help="output file (default: BUNDLE/model.onnx)"),
    opset: int = typer.Option(17, help="ONNX opset"),
):
    """Export a bundle's model (ONNX, dynamic batch axis), checked against PyTorch (max abs diff <= 1e-4)."""
    from medsight.errors import choices_message

    if format != "onnx":
        raise MedsightError(choices_message("export format", format, ["onnx"]))
    from medsight.export import export_onnx

    path = export_onnx(bundle, out=out, opset=opset)
    _info(f"ONNX model written to {path} (parity with PyTorch checked)")


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="bundle folder written by `medsight train`"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface; then set an API "
                             "key)"),
    port: int = typer.Option(8000, help="TCP port to listen on"),
    api_key: Optional[str] = typer.Option(None, envvar="MEDSIGHT_API_KEY",
                                          help="require this key (X-API-Key or Authorization: Bearer); env MEDSIGHT_API_KEY"),
    api_key_file: Optional[Path] = typer.Option(None, help="read the API key from this file (first line)"),
    allowed_hosts: Optional[str] = typer.Option(None, help="comma-separated Host names to accept ('*' any; "
                                                "default: localhost,127.0.0.1,[::1] for a loopback --host, any otherwise)"),
    max_upload_mb: float = typer.Option(50, help="largest accepted upload"),
    backend: str = typer.Option("onnx", help="onnx (ONNX Runtime) or torch"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads per inference (default: by model size)"),
    workers: Optional[int] = typer.Option(None, min=1, help="predictions run at once (default: the core count)"),
    queue: Optional[int] = typer.Option(None, min=0, help="predictions waiting beyond --workers (default: 64); 503 only when full or the wait would pass --deadline"),
    deadline: float = typer.Option(30.0, min=0.1, help="seconds a prediction may take, queue wait included (503/504 after)"),
    body_timeout: float = typer.Option(60.0, min=0.1, help="seconds to receive an upload (408 after)"),
):
    """Serve a bundle: REST API (/v1/predict, /v1/model, /healthz, /docs) and a web page at /."""
    from medsight.serve.app import bind_warning, create_app, default_allowed_hosts, resolve_api_key

    key = resolve_api_key(api_key, api_key_file)
    hosts = default_allowed_hosts(host) if allowed_hosts is None else [h for h in allowed_hosts.split(",") if h.strip()]
    sys.setswitchinterval(0.001)  # hand the GIL to the event loop (/healthz, uploads) more often than every 5 ms
    application = create_app(bundle, api_key=key, max_upload_mb=max_upload_mb, backend=backend, threads=threads,
                             workers=workers, queue=queue, deadline_s=deadline, body_timeout_s=body_timeout,
                             allowed_hosts=hosts)
    warning = bind_warning(host, key)
    if warning:
        console.print(f"[yellow]{warning}[/yellow]", highlight=False, soft_wrap=True)
    gate = application.state.admission
    console.print(f"serving {bundle} on http://{host}:{port}" + (" (API key required)" if key else "")
                  + f"; {gate.workers} workers, queue {gate.queue}", soft_wrap=True, highlight=False)
    from medsight.serve.server import run_server

    run_server(application, host, port)  # header/keep-alive timeouts, connection limit, quiet EMFILE


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
    track: bool = typer.Option(False, help="log to MLflow: a parent run, with a child run per training run"),
):
    """Train the recommended recipes for several seeds; table vs the MedMNIST v2 paper and the reference recipe."""
    from medsight.bench import run_benchmark, to_markdown, write_results

    import contextlib

    keys = [k.strip() for d in datasets for k in d.split(",") if k.strip()]
    tracked: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if track:
        from medsight.tracking import parent_run

        _show_tracking_warnings()
        tracked = parent_run(f"bench {stem}", params={"datasets": ",".join(keys), "seeds": seeds, "quick": quick,
                                                      "epochs_cap": epochs_cap, "ref_epochs": ref_epochs})
    with tracked:
        result = run_benchmark(keys, [int(s) for s in seeds.split(",")], device=device, quick=quick,
                               ref_epochs=ref_epochs, epochs_cap=epochs_cap, amp=amp, threads=threads,
                               log=lambda m: None if _Opts.quiet else console.print(m, highlight=False))
    md, js = write_results(result, out_dir, stem)
    out_console.print(to_markdown(result), highlight=False, soft_wrap=True)
    console.print(f"written {md} and {js}")


cache_app = typer.Typer(no_args_is_help=True, help="the dataset cache: files decoded once, read back by every run")
app.add_typer(cache_app, name="cache")
_CACHE_DIR_HELP = "cache folder (default: $MEDSIGHT_CACHE_DIR or ~/.cache/medsight, as data.cache_dir)"


@cache_app.command("ls")
def cache_ls(cache_dir: Optional[Path] = typer.Option(None, "--dir", help=_CACHE_DIR_HELP)):
    """List the cache entries: what they were decoded from, size, date, and whether each is intact."""
    from rich.markup import escape

    from medsight.data.cache import list_entries, resolve_dir

    d = resolve_dir(cache_dir)
    rows = list_entries(d)
    table = Table(title=escape(f"dataset cache in {d}"))
    for col in ("key", "kind", "source", "images", "MB", "created", "state"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key"][:12], r["kind"] or "-", escape(str(r["source"] or "-")), str(r["n"] or "-"),
                      f"{r['bytes'] / 1e6:.1f}", r["created"] or "-",
                      "ok" if r["ok"] else escape(f"corrupt: {r['problem']} (rebuilt on next use)"))
    out_console.print(table)
    out_console.print(f"{_plural(len(rows), 'entry', 'entries')}, {sum(r['bytes'] for r in rows) / 1e6:.1f} MB",
                      highlight=False)


@cache_app.command("clear")
def cache_clear(cache_dir: Optional[Path] = typer.Option(None, "--dir", help=_CACHE_DIR_HELP),
                key: Optional[str] = typer.Option(None, help="only entries whose key starts with this")):
    """Remove cache entries (all, or those matching --key); the next run decodes its files again."""
    from medsight.data.cache import clear, resolve_dir

    n, freed = clear(cache_dir, key)
    out_console.print(f"removed {_plural(n, 'entry', 'entries')} ({freed / 1e6:.1f} MB) from {resolve_dir(cache_dir)}",
                      highlight=False,
                      soft_wrap=True)


from medsight.node.cli import node_app  # noqa: E402 - the DICOM node's command group (imports stay light)

app.add_typer(node_app, name="node")


def _click_exceptions(*names: str) -> tuple:
    """The named exception classes from every click flavour present: typer >= 0.16 vendors click as
    ``typer._click``; older typer raises ``click``'s own. Both are caught, whichever is installed."""
    import importlib

    found: list = []
    for mod in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        for n in names:
            c = getattr(m, n, None)
            if isinstance(c, type) and c not in found:
                found.append(c)
    return tuple(found)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _command_path(args: list[str] | None) -> str:
    """'medsight train' / 'medsight bench medmnist' from the arguments, for errors raised without a context."""

    words = ["medsight"]
    try:
        cmd = typer.main.get_command(app)
        for tok in (sys.argv[1:] if args is None else args):
            sub = getattr(cmd, "commands", {}).get(tok) if not tok.startswith("-") else None
            if sub is None:
                if tok.startswith("-"):
                    continue
                break
            words.append(tok)
            cmd = sub
    except Exception:  # noqa: BLE001 - only a hint
        pass
    return " ".join(words)


def _usage_error(e: Exception, args: list[str] | None = None) -> int:
    """A click/typer usage error as one line on stderr: the message and where to find help."""
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
        # the exception's constructor asked for the help: typer's rich help printed itself then (the message is
        # empty); plain click returned it as the message. Printed once either way.
        text = str(getattr(e, "message", "") or "")
        if text.strip():
            out_console.print(text, highlight=False, markup=False)
        return 2  # as click >= 8.2 does: a group without its command is a usage error, with the help as message
    try:
        msg = e.format_message()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any message beats a traceback
        msg = str(e)
    where = getattr(ctx, "command_path", None) or _command_path(args)
    console.print(f"error: {_one_line(msg)} (see '{where} --help')", highlight=False, markup=False, soft_wrap=True)
    code = getattr(e, "exit_code", 2)
    return code if isinstance(code, int) and code != 1 else 2


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Usage errors and MedsightError: one line on stderr, exit 2;
    an unexpected exception: one line, exit 1 (its traceback only with --verbose)."""
    from medsight import progress
    from medsight.console import restore_logging, save_logging

    saved = save_logging()
    _Opts.quiet = _Opts.verbose = False
    sink = _RichSink()
    previous = progress.set_sink(sink)
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="medsight")
        return rc if isinstance(rc, int) else 0
    except MedsightError as e:
        sink.close()
        from rich.markup import escape

        console.print("[red]error:[/red] " + escape(str(e).replace("\n", " ")), highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt as e:
        sink.close()
        if not getattr(e, "medsight_reported", False):
            console.print("interrupted")
        return 130
    except _click_exceptions("Exit") as e:
        code = getattr(e, "exit_code", 0)
        return code if isinstance(code, int) else 0
    except _click_exceptions("Abort"):
        sink.close()
        console.print("aborted")
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI never ends in a traceback
        sink.close()
        if isinstance(e, _click_exceptions("UsageError")) or (
                isinstance(getattr(e, "exit_code", None), int) and callable(getattr(e, "format_message", None))):
            if isinstance(e, _click_exceptions("UsageError")) or getattr(e, "exit_code", 1) == 2:
                return _usage_error(e, argv)
            # other click errors (e.g. FileError): their own message and exit code
            console.print(f"error: {_one_line(e.format_message())}", highlight=False, markup=False,  # type: ignore[attr-defined]
                          soft_wrap=True)
            return e.exit_code  # type: ignore[attr-defined]
        if isinstance(e, OSError):  # a path the user gave that is missing or not writable: bad input; else 1
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            console.print(f"error: {_one_line(e.strerror or e)}{where}", highlight=False, markup=False, soft_wrap=True)
            return 2 if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) else 1
        if _Opts.verbose:
            console.print_exception()
        console.print(f"error: unexpected {type(e).__name__}: {_one_line(e)} (rerun with --verbose for the traceback)",
                      highlight=False, markup=False, soft_wrap=True)
        return 1
    finally:
        sink.close()
        progress.set_sink(previous)
        restore_logging(saved)


if __name__ == "__main__":
    sys.exit(main())
