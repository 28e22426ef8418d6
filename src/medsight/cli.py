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

        self.enabled = _is_main_process()  # epoch lines are printed either way; the bar only when asked
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                                 disable=not (enabled and self.enabled), transient=False)
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
        elif event == "epoch":
            auc = info.get("val_auc")
            line = (f"epoch {info['epoch']:>3}  train_loss {info['train_loss']:.4f}  val_loss {info['val_loss']:.4f}"
                    + (f"  val_auc {auc:.4f}" if auc is not None else "")
                    + (f"  val_acc {info['val_accuracy']:.4f}" if "val_accuracy" in info else "")
                    + ("  *" if info.get("improved") else ""))
            self.progress.console.print(line)
            if self.task is not None:
                self.progress.reset(self.task)
        elif event == "early_stop":
            self.progress.console.print(f"early stop at epoch {info['epoch']} (best epoch {info['best_epoch']})")
        elif event == "resumed":
            self.progress.console.print(f"resuming at epoch {info['epoch'] + 1}")


def b_thr(path) -> str:
    import json as _json

    meta = _json.loads((Path(path) / "bundle.json").read_text())
    t = meta.get("threshold")
    return "argmax" if t is None else f"{t} by {meta.get('threshold_rule')} on val, T={meta.get('temperature', 1.0):.2f}"


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
    operating_point: Optional[str] = typer.Option(None, help="threshold rule on val: youden, f1, sens=0.95, spec=0.9, or a number"),
    set_: List[str] = typer.Option([], "--set", help="any config value, e.g. --set train.schedule=step"),
    progress: bool = typer.Option(True, help="show a progress bar"),
):
    """Train a model and write a bundle (weights, config, preprocessing, history, metrics)."""
    from medsight.config import load_config
    from medsight.pipeline import run_training

    overrides = {"data.name": data, "model.name": model, "train.epochs": epochs, "train.seed": seed,
                 "data.size": size, "train.batch_size": batch_size, "train.lr": lr, "data.task": task,
                 "train.device": device, "train.operating_point": operating_point}
    if augment is not None:
        overrides["augment.enabled"] = augment
    for item in set_:
        if "=" not in item:
            raise MedsightError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        import yaml

        overrides[k.strip()] = yaml.safe_load(v)
    if resume and config is None and recipe is None and (out / "config.yaml").is_file():
        config = out / "config.yaml"  # continue the same run: its resolved config, then any flags given now
    cfg = load_config(config, overrides, recipe=recipe)
    with _Progress(progress) as bar:
        out_path, result, metrics = run_training(cfg, out, resume=resume, callback=bar)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if _is_main_process():
        out_console.print(metrics_table(metrics, title=f"{cfg.model.name} on {cfg.data.name} "
                                                       f"(best epoch {result.best_epoch}, {result.seconds:.1f}s)"))
        out_console.print(f"bundle written to {out_path} (threshold {b_thr(out_path)})")


@app.command()
def evaluate(
    bundle: Path = typer.Argument(..., help="bundle folder written by `medsight train`"),
    data: Optional[str] = typer.Option(None, help="dataset (default: the one the bundle was trained on)"),
    split: List[str] = typer.Option(["test"], help="split(s) to evaluate"),
    size: Optional[int] = typer.Option(None),
    operating_point: Optional[str] = typer.Option(
        None, help="re-choose the threshold on the val split: youden, f1, sens=0.95, spec=0.9, or a number"),
    n_boot: int = typer.Option(1000, help="bootstrap resamples for 95% CIs (0 = none)"),
    report: bool = typer.Option(True, help="write report.html into the bundle"),
    shift: bool = typer.Option(False, help="also run the seeded corruption battery (robustness to distribution shift)"),
    shift_severities: str = typer.Option("1,3,5", help="severities 1..5, comma separated"),
    shift_corruptions: Optional[str] = typer.Option(None, help="comma-separated corruption names (default: all)"),
    tta: bool = typer.Option(False, help="flip test-time augmentation in the shift battery"),
    json_out: bool = typer.Option(False, "--json", help="print metrics as JSON"),
):
    """Evaluate a bundle: metrics with 95% CIs per split into metrics.json, and a self-contained report.html."""
    from medsight.bundle import load_bundle
    from medsight.evaluate import calibrate_bundle, write_bundle_report
    from medsight.metrics import parse_operating_point
    from medsight.pipeline import evaluate_and_store, load_data_for_bundle

    b = load_bundle(bundle)
    ds = load_data_for_bundle(b, data, size)
    if operating_point is not None:
        parse_operating_point(operating_point)
        calibrate_bundle(b, ds, operating_point=operating_point,
                         calibrate=(b.meta.get("calibration") or {}).get("temperature", 1.0) != 1.0)
    splits = tuple(dict.fromkeys(["val", *split]))
    metrics = evaluate_and_store(b, ds, splits=splits, n_boot=n_boot)
    shown = {s: metrics[s] for s in split}
    if json_out:
        from medsight.utils import json_safe

        out_console.print_json(json.dumps(json_safe(shown)))
    else:
        thr = b.threshold
        out_console.print(metrics_table(shown, title=f"{bundle} on {ds.name} (threshold {thr if thr is not None else 'argmax'}"
                                                     f"{', ' + b.meta['threshold_rule'] if b.meta.get('threshold_rule') else ''};"
                                                     f" T={b.temperature:.2f})"))
    extra = []
    if shift:
        extra.append(_run_shift(b, ds, split[-1], shift_severities, shift_corruptions, tta))
    if report:
        path = write_bundle_report(b, ds, metrics, splits=splits, extra_sections=extra)
        out_console.print(f"report written to {path}")


def _run_shift(b, ds, split_name: str, severities: str, corruptions: Optional[str], tta: bool) -> tuple[str, str]:
    """The shift battery on one split: shift_<split>.json/.png in the bundle, a table, and a report section."""
    import base64

    from medsight.shift import CORRUPTIONS, evaluate_shift, plot_shift, shift_table_html
    from medsight.utils import atomic_write_bytes, write_json

    try:
        sev = tuple(int(v) for v in severities.split(","))
    except ValueError:
        raise MedsightError(f"--shift-severities {severities!r}: expected integers 1..5 like 1,3,5") from None
    names = [c.strip() for c in corruptions.split(",")] if corruptions else None
    for n in names or []:
        if n not in CORRUPTIONS:
            from medsight.errors import choices_message

            raise MedsightError(choices_message("corruption", n, CORRUPTIONS))
    s = ds.split(split_name)
    flips = [(), (-1,)] if tta else None
    res = evaluate_shift(b.model, b.task, s.images, s.labels, corruptions=names, severities=sev, seed=0,
                         temperature=b.temperature, threshold=b.threshold, tta_flips=flips)
    write_json(b.path / f"shift_{split_name}.json", res)
    png = plot_shift(res)
    atomic_write_bytes(b.path / f"shift_{split_name}.png", png)
    key = res["primary"]
    table = Table(title=f"{key} under corruption ({split_name}; clean {res['clean'][key]:.3f})")
    table.add_column("corruption")
    for v in sev:
        table.add_column(f"severity {v}", justify="right")
    for name, rows in res["corruptions"].items():
        table.add_row(name, *[f"{r['metrics'][key]:.3f} ({-r['drop'][key]:+.3f})" for r in rows])
    out_console.print(table)
    img = base64.b64encode(png).decode()
    return ("Robustness to distribution shift",
            f'<img src="data:image/png;base64,{img}" alt="shift">' + shift_table_html(res))


@app.command()
def explain(
    bundle: Path = typer.Argument(..., help="bundle folder"),
    files: List[Path] = typer.Argument(..., help="images, DICOM files or series folders, NIfTI volumes"),
    out: Path = typer.Option(Path("explanations"), help="folder for <name>_heatmap.npy and <name>_overlay.png"),
    method: str = typer.Option("gradcam", help="gradcam or occlusion"),
    class_idx: Optional[int] = typer.Option(None, help="class to explain (default: the predicted one)"),
):
    """Heatmaps (Grad-CAM or occlusion) over each input, as arrays and PNG overlays (3D: three orthogonal slices)."""
    import numpy as np
    import torch

    from medsight.bundle import load_bundle
    from medsight.evaluate import explain_images, overlay
    from medsight.preprocess import load_one
    from medsight.utils import atomic_write_bytes

    b = load_bundle(bundle)
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for f in files:
        try:
            x, _ = load_one(f, b.recipe)
        except MedsightError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False)
            failures += 1
            continue
        xt = torch.from_numpy(x)[None]
        heat = explain_images(b, xt, class_idx=class_idx, method=method)[0]
        probs = b.task.probabilities(b.model(xt).detach(), b.temperature).numpy()[0]
        name = Path(f).name.split(".")[0] or "input"
        np.save(out / f"{name}_heatmap.npy", heat.astype(np.float32))
        atomic_write_bytes(out / f"{name}_overlay.png", overlay(x, heat))
        p = float(probs) if np.ndim(probs) == 0 else float(np.max(probs))
        out_console.print(f"{f}: p={p:.3f} -> {out / (name + '_overlay.png')}")
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


@app.command()
def qc(
    data: str = typer.Argument(..., help="class-per-folder tree, CSV manifest, .npz, or a MedMNIST name"),
    near_dup: int = typer.Option(4, help="max perceptual-hash Hamming distance for near duplicates"),
    size: int = typer.Option(28, help="MedMNIST size when DATA is a name"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON"),
):
    """Data quality report: unreadable files, duplicates within/across splits, balance, outliers, missing labels."""
    from medsight.data.medmnist import INFO
    from medsight.data.quality import render_qc, run_qc
    from medsight.data.sources import medmnist_path
    from medsight.utils import write_json

    source = str(medmnist_path(data, size)) if data.lower() in INFO else data
    report = run_qc(source, near_dup_threshold=near_dup)
    out_console.print(render_qc(report))
    if json_path:
        write_json(json_path, report)
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
):
    """De-identify DICOM files by allow-list (PS3.15 Basic Profile or stricter), then verify no original value survived."""
    import os

    from medsight.data.deid import deidentify

    secret = None
    if secret_env:
        secret = os.environ.get(secret_env)
        if secret is None:
            raise MedsightError(f"--secret-env {secret_env}: that environment variable is not set")
    summary = deidentify(in_dir, out_dir, mapping_csv=mapping, secret=secret, keep_private=keep_private,
                         allow_burned_in=allow_burned_in)
    errors = summary.get("errors") or []
    burned = summary.get("burned_in") or []
    held = 0 if summary.get("burned_in_written") else len(burned)
    out_console.print(f"de-identified {summary.get('written', 0)} files into {out_dir}; verified: no original identifying "
                      f"value outside the pixel data ({len(summary.get('skipped') or [])} skipped, {held} held back, {len(errors)} errors)")
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
    out: Optional[Path] = typer.Option(None, help="write results to .csv or .json (default: print a table)"),
    heatmaps: Optional[Path] = typer.Option(None, help="write a Grad-CAM overlay PNG per file into this folder"),
    backend: str = typer.Option("torch", help="torch or onnx (ONNX Runtime; exports model.onnx when missing)"),
    batch_size: int = typer.Option(64, help="files per batch"),
    clinical_csv: Optional[Path] = typer.Option(None, help="image + clinical models: CSV with a 'path' column "
                                                            "(file path or name) and the model's clinical columns"),
):
    """Predict files with a bundle: probabilities, the decision at the bundle's threshold, and an OOD flag."""
    from medsight.predict import Predictor, default_threads
    from medsight.bundle import load_bundle

    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise MedsightError(f"--out must end in .csv or .json, got {out.name!r}")
    b = load_bundle(bundle)
    predictor = Predictor(b, backend=backend, threads=default_threads(b))
    clinical = None
    if clinical_csv is not None:
        import csv

        if not clinical_csv.is_file():
            raise MedsightError(f"--clinical-csv {clinical_csv}: file not found")
        with open(clinical_csv, newline="", encoding="utf-8-sig") as fh:
            rows_in = list(csv.DictReader(fh))
        if not rows_in or "path" not in rows_in[0]:
            raise MedsightError(f"--clinical-csv {clinical_csv}: needs a header with a 'path' column")
        clinical = {r["path"]: {k: v for k, v in r.items() if k != "path"} for r in rows_in}
    results = predictor.predict_paths(inputs, batch_size=batch_size, heatmaps_dir=heatmaps, clinical=clinical)
    if not results:
        raise MedsightError(f"no image files found in {', '.join(map(str, inputs))}")
    rows = [r.to_dict() for r in results]
    classes = predictor.classes
    n_err = sum(r["error"] is not None for r in rows)
    if out is not None:
        from medsight.utils import atomic_write_text

        if out.suffix.lower() == ".json":
            atomic_write_text(out, json.dumps(rows, indent=2))
        else:
            import csv
            import io

            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["file", *[f"p_{c}" for c in classes], "predicted", "decision", "threshold", "calibrated",
                        "model_version", "ood_score", "ood_flag", "error"])
            for r in rows:
                probs = [f"{r['probabilities'][c]:.6f}" if r["error"] is None else "" for c in classes]
                pred = ";".join(r["predicted"]) if isinstance(r["predicted"], list) else (r["predicted"] or "")
                dec = json.dumps(r["decision"]) if isinstance(r["decision"], list) else ("" if r["decision"] is None else r["decision"])
                thr = json.dumps(r["threshold"]) if isinstance(r["threshold"], list) else ("" if r["threshold"] is None else r["threshold"])
                ood = "" if r["ood_score"] is None else f"{r['ood_score']:.3f}"
                w.writerow([r["file"], *probs, pred, dec, thr, r["calibrated"], r["model_version"], ood,
                            "" if r["ood_flag"] is None else r["ood_flag"], r["error"] or ""])
            atomic_write_text(out, buf.getvalue())
        out_console.print(f"{len(rows)} predictions ({n_err} errors) written to {out}")
    else:
        table = Table(title=f"{bundle} ({results[0].model_version}, threshold {results[0].threshold})")
        table.add_column("file")
        for c in classes:
            table.add_column(f"p({c})", justify="right")
        table.add_column("predicted")
        table.add_column("OOD")
        table.add_column("error")
        for r in rows:
            probs = [f"{r['probabilities'][c]:.4f}" if r["error"] is None else "-" for c in classes]
            pred = ", ".join(r["predicted"]) if isinstance(r["predicted"], list) else (r["predicted"] or "-")
            ood = "-" if r["ood_flag"] is None else ("[yellow]flagged[/yellow]" if r["ood_flag"] else "ok")
            table.add_row(r["file"], *probs, pred, ood, r["error"] or "")
        out_console.print(table)
    if heatmaps is not None:
        out_console.print(f"heatmaps written to {heatmaps}")


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
    out_console.print(f"ONNX model written to {path} (parity with PyTorch checked)")


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="bundle folder written by `medsight train`"),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, envvar="MEDSIGHT_API_KEY",
                                          help="require this key (X-API-Key or Authorization: Bearer); env MEDSIGHT_API_KEY"),
    max_upload_mb: float = typer.Option(50, help="largest accepted upload"),
    backend: str = typer.Option("onnx", help="onnx (ONNX Runtime) or torch"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads per inference (default: by model size)"),
):
    """Serve a bundle: REST API (/v1/predict, /v1/model, /healthz, /docs) and a web page at /."""
    import logging

    import uvicorn

    from medsight.serve.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    application = create_app(bundle, api_key=api_key or None, max_upload_mb=max_upload_mb, backend=backend,
                             threads=threads)
    console.print(f"serving {bundle} on http://{host}:{port}" + (" (API key required)" if api_key else ""), soft_wrap=True)
    uvicorn.run(application, host=host, port=port, access_log=False, log_level="warning")


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
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int):
            return rc
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
