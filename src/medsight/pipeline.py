"""The main job as a library call: data -> fit -> bundle -> metrics. The CLI, tests and benchmarks share it."""

from __future__ import annotations

from pathlib import Path

from medsight.bundle import Bundle, load_bundle, make_meta, save_bundle
from medsight.config import RunConfig, dump_config
from medsight.data.sources import Dataset, load_dataset
from medsight.evaluate import calibrate_bundle, evaluate_split
from medsight.train import Callback, FitResult, fit, write_history
from medsight.utils import atomic_write_text, write_json


def load_data_for(cfg: RunConfig) -> Dataset:
    d = cfg.data
    data = load_dataset(d.name, size=d.size, root=d.root, download_missing=d.download, task=d.task, window=d.window,
                        label_columns=d.label_columns, clinical_columns=d.clinical_columns, intensity=d.intensity,
                        seed=cfg.train.seed)
    if d.task is not None and d.task != data.task:
        data.task = d.task
    return data


def evaluate_and_store(bundle: Bundle, data: Dataset, splits=("val", "test"), *, n_boot: int = 1000) -> dict:
    """Metrics per split into ``metrics.json`` (merged with what is there, so other splits are kept)."""
    import json

    path = bundle.path / "metrics.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    for s in splits:
        if s in data.splits:
            existing[s] = evaluate_split(bundle, data, s, n_boot=n_boot)
    write_json(path, existing)
    return existing


def run_training(cfg: RunConfig, out_dir: str | Path, *, data: Dataset | None = None, resume: bool = False,
                 callback: Callback | None = None, evaluate: bool = True) -> tuple[Path, FitResult, dict]:
    out = Path(out_dir)
    data = data or load_data_for(cfg)
    import os

    is_main = int(os.environ.get("RANK", "0")) == 0  # fit() sets up the process group with the right backend
    tracker = None
    if is_main:
        from medsight import tracking

        tracker = tracking.start_training(cfg, data, out)  # None when off; before any file is written or trained
        callback = tracker.epoch_callback(callback) if tracker is not None else callback
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    fusion = None
    if cfg.data.clinical_columns:
        result, fusion = _fit_fusion(cfg, data, callback)
    else:
        result = fit(cfg, data, out, resume=resume, callback=callback)
    metrics: dict = {}
    if is_main:
        extra = {"train_seconds": round(result.seconds, 2)}
        if cfg.train.tta_flip:
            extra["tta_flip"] = list(cfg.train.tta_flip)
        meta = make_meta(model_spec=result.model_spec, task=data.task, classes=data.classes, recipe=data.recipe,
                         data_name=data.name, best_epoch=result.best_epoch, monitor=cfg.train.monitor,
                         extra=extra)
        if fusion is not None:
            meta["fusion"] = fusion
        if cfg.train.ood and fusion is None:
            from medsight.ood import fit_ood_detector, save_ood

            tr, va = data.splits["train"], data.splits["val"]
            det = fit_ood_detector(result.model, tr.images, tr.labels if data.task != "multilabel" else None,
                                   va.images)
            save_ood(out / "ood.npz", det)
            meta["ood"] = {"file": "ood.npz", "score": det["score"], "quantile": det["quantile"],
                           "threshold": float(det["threshold"])}
        save_bundle(out, result.model, meta)
        write_history(out / "history.csv", result.history)
        bundle = load_bundle(out)
        calibrate_bundle(bundle, data, operating_point=cfg.train.operating_point, calibrate=cfg.train.calibrate)
        if evaluate:
            metrics = evaluate_and_store(bundle, data, n_boot=cfg.train.n_boot)
        tracking.finish_training(tracker, out, metrics, log_model=cfg.track.log_model)  # after the bundle is whole
    return out, result, metrics


def load_data_for_bundle(bundle: Bundle, data: str | None = None, size: int | None = None) -> Dataset:
    """The dataset a bundle was trained on (or ``data``), with the bundle's own settings."""
    import yaml

    from medsight.config import RunConfig

    cfg_path = bundle.path / "config.yaml"
    cfg = RunConfig.model_validate(yaml.safe_load(cfg_path.read_text())) if cfg_path.is_file() else RunConfig()
    if data is not None:
        cfg.data.name = data
    if size is not None:
        cfg.data.size = size
    return load_data_for(cfg)


def infer_categorical(rows: list[dict], columns: list[str]) -> list[str]:
    """Columns whose non-missing values are not all numbers are categorical."""
    from medsight.fusion import _is_missing

    cats = []
    for c in columns:
        for r in rows:
            v = r.get(c)
            if _is_missing(v):
                continue
            try:
                float(v)
            except (TypeError, ValueError):
                cats.append(c)
                break
    return cats


def _fit_fusion(cfg: RunConfig, data: Dataset, callback=None):
    """Image + clinical columns: a FusionClassifier over the registered image model, trained by train.fit."""
    from medsight.errors import ConfigError
    from medsight.fusion import FusionClassifier, TabularEncoder, encode_tabular, fusion_meta
    from medsight.tasks import Task
    from medsight.train import build_model

    train = data.splits["train"]
    if train.clinical is None:
        raise ConfigError(f"data.clinical_columns is set but {data.name} carries no clinical values "
                          "(use a CSV manifest with those columns)")
    cols = list(cfg.data.clinical_columns)
    cats = cfg.data.categorical_columns or infer_categorical(train.clinical, cols)
    unknown = sorted(set(cats) - set(cols))
    if unknown:
        raise ConfigError(f"data.categorical_columns {unknown} are not among data.clinical_columns {cols}")
    enc = TabularEncoder.fit(train.clinical, numeric=[c for c in cols if c not in cats], categorical=cats)
    task = Task(data.task, len(data.classes))
    image_model = build_model(cfg, task, data.spatial_dims, data.in_channels, data.input_size)
    model = FusionClassifier(image_model, enc.n_features, task.num_outputs, cfg.model.fusion)
    tab = {s: encode_tabular(data.splits[s].clinical, enc) for s in ("train", "val")}
    result = fit(cfg, data, model=model, tab=tab, callback=callback)
    return result, fusion_meta(result.model, enc)
