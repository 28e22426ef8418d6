"""The main job as a library call: data -> fit -> calibrate on val -> OOD detector -> metrics -> one bundle.

The bundle is built once, in a staging folder beside ``out`` (``.<name>.partial``), and replaces ``out`` only
when every file is written (:func:`medsight.bundle.publish`): a crash, a full disk or a SIGKILL during a retrain
leaves the previous bundle as it was. The CLI, tests and benchmarks share :func:`run_training`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from medsight.bundle import (Bundle, is_nonempty_dir, make_meta, publish, recover, save_weights, staging_dir,
                             write_meta)
from medsight.calibration import choose_calibration
from medsight.config import RunConfig, dump_config
from medsight.data.sources import Dataset, load_dataset
from medsight.errors import ConfigError, MedsightError
from medsight.evaluate import LogitsCache, evaluate_splits, split_logits, split_probs
from medsight.review import fit_review, share_line
from medsight.train import Callback, FitResult, fit, write_history
from medsight.utils import atomic_write_text, write_json


def load_data_for(cfg: RunConfig) -> Dataset:
    data = load_dataset(cfg.data, seed=cfg.train.seed)
    if cfg.data.task is not None and cfg.data.task != data.task:
        data.task = cfg.data.task
    return data


def _prepare_out(out: Path, *, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """The staging folder for this run and the checkpoint to resume from (rank 0 only)."""
    recover(out)
    stage = staging_dir(out)
    resume_from = None
    if resume:
        for ck in (stage / "checkpoints" / "last.pt", out / "checkpoints" / "last.pt"):
            if ck.is_file():
                resume_from = ck
                break
        if resume_from is None:
            raise MedsightError(f"--resume: no checkpoint in {out}/checkpoints or {stage}/checkpoints")
        if resume_from.parent.parent != stage:  # continuing a finished bundle: start a new staging folder from it
            if stage.exists():
                shutil.rmtree(stage)
            (stage / "checkpoints").mkdir(parents=True)
            shutil.copy2(resume_from, stage / "checkpoints" / "last.pt")
            resume_from = stage / "checkpoints" / "last.pt"
    else:
        if is_nonempty_dir(out) and not overwrite:
            raise MedsightError(f"--out {out} already holds files (a bundle?); pass --resume to continue its run "
                                "or --overwrite to replace it once the new run has finished")
        if stage.exists():
            shutil.rmtree(stage)  # a stale, unfinished run
        stage.mkdir(parents=True)
    return stage, resume_from


def resume_config(out_dir: str | Path) -> Path | None:
    """The resolved config of the run ``--resume`` continues: the unfinished run's (staging folder), else the
    published bundle's; None when neither exists."""
    out = Path(out_dir)
    for c in (staging_dir(out) / "config.yaml", out / "config.yaml"):
        if c.is_file():
            return c
    return None


def end_distributed() -> None:
    """Tear down the process group :func:`medsight.train.fit` set up for a distributed run (no-op otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_training(cfg: RunConfig, out_dir: str | Path, *, data: Dataset | None = None, resume: bool = False,
                 overwrite: bool = False, callback: Callback | None = None,
                 evaluate: bool = True) -> tuple[Path, FitResult, dict]:
    from medsight.models import list_models

    out = Path(out_dir)
    if cfg.model.name not in list_models():  # before any data is read or any summary printed
        from medsight.errors import choices_message

        raise ConfigError(choices_message("model", cfg.model.name, list_models()))
    data = data or load_data_for(cfg)
    auto = None
    if cfg.auto:  # the automatic recipe: settings the user did not give, chosen from the data itself
        data, auto = _apply_auto(cfg, data)
    is_main = int(os.environ.get("RANK", "0")) == 0  # fit() sets up the process group with the right backend
    stage, resume_from, tracker = None, None, None
    try:
        if is_main:
            from medsight import tracking

            # None when tracking is off; raises before anything is written when tracking is required but unusable
            tracker = tracking.start_training(cfg, data, out)
            callback = tracker.epoch_callback(callback) if tracker is not None else callback
            stage, resume_from = _prepare_out(out, resume=resume, overwrite=overwrite)
            atomic_write_text(stage / "config.yaml", dump_config(cfg))
        else:
            stage = staging_dir(out)
        summary = training_summary(cfg, data) + (auto["reasons"] if auto else [])
        if is_main and callback is not None:
            callback("summary", {"lines": summary})
        fusion, model, tab = None, None, None
        if cfg.data.clinical_columns:
            model, tab, fusion = _fusion_parts(cfg, data)
        if cfg.train.ensemble > 1:
            if fusion is not None or resume:
                raise ConfigError("train.ensemble > 1 works for image models without --resume (members keep no "
                                  "checkpoints); train members one at a time for image + clinical models")
            from medsight.train import fit_ensemble

            result = fit_ensemble(cfg, data, callback=callback)
        else:
            result = fit(cfg, data, stage, resume=resume, resume_from=resume_from, callback=callback, model=model,
                         tab=tab)
        metrics: dict = {}
        if is_main:
            metrics = _finish_bundle(cfg, data, result, fusion, stage, evaluate=evaluate, summary=summary,
                                     callback=callback, auto=auto)
            if tracker is not None:  # tracking.json travels inside the bundle, published with it
                try:
                    tracker.write_side_file(stage)
                except OSError as e:
                    tracker.warn(f"cannot write {stage / tracking.TRACKING_FILE}: {e.strerror}")
            publish(stage, out)
            tracking.finish_training(tracker, out, metrics, log_model=cfg.track.log_model)  # warnings only
    except OSError as e:  # disk full, permissions: one line, and the previous bundle stays as it was
        raise MedsightError(f"cannot write the bundle for {out}: {e.strerror or e}"
                            + (f" ({e.filename})" if getattr(e, "filename", None) else "")) from e
    return out, result, metrics


def _apply_auto(cfg: RunConfig, data: Dataset) -> tuple[Dataset, dict]:
    """Fill the settings the user did not give by the automatic recipe rule (``medsight.autorecipe``); files are
    re-read at the rule's input size when it differs from the one they were read at."""
    from medsight import autorecipe

    facts = autorecipe.facts_of(data)
    size = None if "data.size" in autorecipe.explicit_keys(cfg) else autorecipe.choose_size(facts)
    recipe = autorecipe.choose(facts, size)
    applied = autorecipe.apply(cfg, recipe)
    if size is not None and size != min(data.input_size):
        data = load_data_for(cfg)  # the files again, at the rule's input size (cfg.data.size is now set)
    return data, {"rule": "medsight.autorecipe", "applied": applied, "given": recipe.given, "reasons": recipe.reasons}


def training_summary(cfg: RunConfig, data: Dataset) -> list[str]:
    """What this run is about to do, in sentences: data, splits, classes, positive class, input size, device."""
    import torch

    from medsight.summary import describe_training
    from medsight.utils import pick_device

    return describe_training(data, cfg, pick_device(cfg.train.device), cfg.train.threads or torch.get_num_threads())


def _finish_bundle(cfg: RunConfig, data: Dataset, result: FitResult, fusion: dict | None, stage: Path, *,
                   evaluate: bool, summary: list[str], callback: Callback | None = None,
                   auto: dict | None = None) -> dict:
    """Calibrate on val, fit the OOD detector, score the splits and write every file of the bundle into
    ``stage``, each once."""
    extra: dict[str, Any] = {"train_seconds": round(result.seconds, 2)}
    if cfg.train.tta_flip:
        extra["tta_flip"] = list(cfg.train.tta_flip)
    meta = make_meta(model_spec=result.model_spec, task=data.task, classes=data.classes, recipe=data.recipe,
                     data_name=data.name, best_epoch=result.best_epoch, monitor=cfg.train.monitor, extra=extra)
    if fusion is not None:
        meta["fusion"] = fusion
    if auto is not None:
        meta["auto_recipe"] = auto
    if result.extra.get("ensemble"):
        meta["ensemble"] = result.extra["ensemble"]
    if result.extra.get("pretrained"):
        meta["pretrained"] = result.extra["pretrained"]
    meta["data_facts"] = {"positive_class": getattr(data, "positive_class", None),
                          "positive_class_source": getattr(data, "positive_class_source", None),
                          "split_origin": getattr(data, "split_origin", None),
                          "native_size": getattr(data, "native_size", None), "leakage": getattr(data, "leakage", None)}
    meta["training_summary"] = summary
    cache = LogitsCache()  # one inference pass per split, shared by calibration, OOD and metrics
    bundle = Bundle.draft(stage, meta, result.model)
    val = data.split("val")
    meta.update(choose_calibration(bundle.task, split_logits(bundle, data, "val", cache=cache), val.labels,
                                   operating_point=cfg.train.operating_point, calibrate=cfg.train.calibrate))
    bundle = Bundle.draft(stage, meta, result.model)  # with the chosen temperature and threshold
    meta["review"] = fit_review(bundle.task, split_probs(bundle, data, "val", cache=cache),
                                bundle.threshold)  # medsight.review
    bundle = Bundle.draft(stage, meta, result.model)
    from medsight.summary import outcome_line, threshold_lines

    after, threshold_warnings = threshold_lines(meta)
    after = [outcome_line(result, cfg)] + after  # how training ended, where the threshold sits and how sure it is
    meta["training_summary"] = list(summary) + after
    meta["warnings"] = threshold_warnings
    if callback is not None:
        callback("summary", {"lines": after})
    if cfg.train.ood:
        from medsight.ood import fit_bundle_detector, save_ood

        det = fit_bundle_detector(bundle, data)
        save_ood(stage / "ood.npz", det)
        meta["ood"] = {"file": "ood.npz", "score": det["score"], "quantile": det["quantile"],
                       "threshold": float(det["threshold"])}
    save_weights(stage, result.model)
    write_history(stage / "history.csv", result.history)
    metrics: dict = {}
    if evaluate:
        from medsight.summary import warn_degenerate

        metrics = evaluate_splits(bundle, data, ("val", "test"), n_boot=cfg.train.n_boot, cache=cache)
        write_json(stage / "metrics.json", metrics)
        if meta.get("ensemble"):  # members beside the ensemble, and how much they disagree (in the report's summary)
            from medsight.evaluate import ensemble_summary

            ens = meta["ensemble"]["splits"] = ensemble_summary(bundle, data)
            for s, e in ens.items():
                aucs = ", ".join(f"{r['auc']:.3f}" for r in e["members"])
                meta["training_summary"].append(
                    f"seed ensemble of {len(e['members'])} members, {s}: ensemble AUC "
                    f"{float((metrics[s].get('auc') or {}).get('value', float('nan'))):.3f}, members {aucs}; members' probabilities differ by "
                    f"{e['mean_spread']:.3f} (sd) on average, at most {e['max_spread']:.3f}")
        shares = [share_line(bundle, split_probs(bundle, data, s, cache=cache), s)  # medsight.review
                  for s in ("val", "test") if s in data.splits]
        meta["training_summary"] += shares  # the report's facts
        if callback is not None:
            callback("summary", {"lines": shares})
        meta["warnings"] = threshold_warnings + warn_degenerate(metrics, bundle.classes, bundle.positive_class)
        if meta["warnings"] and callback is not None:
            callback("warnings", {"lines": meta["warnings"]})
    write_meta(stage, meta)
    return metrics


def load_data_for_bundle(bundle: Bundle, data: str | None = None, size: int | None = None) -> Dataset:
    """The dataset a bundle was trained on (or ``data``), with the bundle's own settings."""
    import yaml

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
            if v is None or _is_missing(v):
                continue
            try:
                float(v)
            except (TypeError, ValueError):
                cats.append(c)
                break
    return cats


def _fusion_parts(cfg: RunConfig, data: Dataset):
    """Image + clinical columns: a FusionClassifier over the registered image model, its encoded clinical rows
    per split and the bundle's ``fusion`` metadata (encoder fitted on the training split)."""
    from medsight.fusion import FusionClassifier, TabularEncoder, encode_tabular, fusion_meta
    from medsight.tasks import Task
    from medsight.train import build_model

    train = data.splits["train"]
    if train.clinical is None:
        raise ConfigError(f"data.clinical_columns is set but {data.name} carries no clinical values "
                          "(use a CSV manifest with those columns)")
    cols = list(cfg.data.clinical_columns or [])
    cats = cfg.data.categorical_columns or infer_categorical(train.clinical, cols)
    unknown = sorted(set(cats) - set(cols))
    if unknown:
        raise ConfigError(f"data.categorical_columns {unknown} are not among data.clinical_columns {cols}")
    enc = TabularEncoder.fit(train.clinical, numeric=[c for c in cols if c not in cats], categorical=cats)
    task = Task(data.task, len(data.classes))
    image_model = build_model(cfg, task, data.spatial_dims, data.in_channels, data.input_size)
    model = FusionClassifier(image_model, enc.n_features, task.num_outputs, cfg.model.fusion)
    tab = {s: encode_tabular(data.splits[s].clinical, enc) for s in ("train", "val")}
    return model, tab, fusion_meta(model, enc)
