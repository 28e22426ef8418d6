"""The main job as a library call: data -> fit -> bundle -> metrics. The CLI, tests and benchmarks share it."""

from __future__ import annotations

from pathlib import Path

from medsight.bundle import Bundle, load_bundle, make_meta, save_bundle
from medsight.config import RunConfig, dump_config
from medsight.data.sources import Dataset, load_dataset
from medsight.evaluate import evaluate_split
from medsight.train import Callback, FitResult, fit, write_history
from medsight.utils import atomic_write_text, write_json


def load_data_for(cfg: RunConfig) -> Dataset:
    d = cfg.data
    data = load_dataset(d.name, size=d.size, root=d.root, download_missing=d.download, task=d.task, window=d.window)
    if d.task is not None and d.task != data.task:
        data.task = d.task
    return data


def evaluate_and_store(bundle: Bundle, data: Dataset, splits=("val", "test"), *, n_boot: int = 0) -> dict:
    """Metrics per split into ``metrics.json`` (merged with what is there, so other splits are kept)."""
    import json

    path = bundle.path / "metrics.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    for s in splits:
        if s in data.splits:
            existing[s] = evaluate_split(bundle, data, s, n_boot=n_boot)
    write_json(path, existing)
    return existing


def _youden(y, p) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    i = int((tpr - fpr).argmax())
    return float(min(1.0, thr[i]))


def choose_val_threshold(cfg: RunConfig, result: FitResult, data: Dataset) -> float | None:
    """``train.threshold='youden'``: the operating point maximising sens + spec - 1 on the validation split (never
    on test), stored in the bundle; None keeps 0.5."""
    if cfg.train.threshold == "0.5" or data.task != "binary":
        return None
    import torch

    from medsight import metrics as M
    from medsight.tasks import Task
    from medsight.train import evaluate_logits

    val = data.split("val")
    logits = evaluate_logits(result.model, val.images, device=torch.device("cpu"), tta_flip=cfg.train.tta_flip)
    p = Task(data.task, len(data.classes)).probabilities(logits).numpy()
    y = val.labels.reshape(-1)
    if hasattr(M, "choose_threshold"):
        return float(M.choose_threshold(y, p, "youden"))
    return _youden(y, p)


def run_training(cfg: RunConfig, out_dir: str | Path, *, data: Dataset | None = None, resume: bool = False,
                 callback: Callback | None = None, evaluate: bool = True) -> tuple[Path, FitResult, dict]:
    out = Path(out_dir)
    data = data or load_data_for(cfg)
    import os

    is_main = int(os.environ.get("RANK", "0")) == 0  # fit() sets up the process group with the right backend
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    result = fit(cfg, data, out, resume=resume, callback=callback)
    metrics: dict = {}
    if is_main:
        threshold = choose_val_threshold(cfg, result, data)
        extra = {"train_seconds": round(result.seconds, 2)}
        if cfg.train.tta_flip:
            extra["tta_flip"] = list(cfg.train.tta_flip)
        meta = make_meta(model_spec=result.model_spec, task=data.task, classes=data.classes, recipe=data.recipe,
                         data_name=data.name, best_epoch=result.best_epoch, monitor=cfg.train.monitor,
                         threshold=threshold, extra=extra)
        if threshold is not None:
            meta["threshold_rule"] = f"{cfg.train.threshold} on val"
        save_bundle(out, result.model, meta)
        write_history(out / "history.csv", result.history)
        if evaluate:
            metrics = evaluate_and_store(load_bundle(out), data)
    return out, result, metrics
