"""What a training run should say about itself, as plain sentences: the data it saw and the warnings its metrics
deserve. Library code: returns lines, prints nothing (the CLI prints them, the report renders them).

- :func:`describe_training`: images per split and class, the positive class and who chose it, how the splits were
  made, the input size and why, device and threads, an accepted leakage finding.
- :func:`warn_degenerate`: a model that predicts one class only on a split, and every undefined metric with the
  reason it is undefined (instead of a bare ``nan``).
- :func:`class_counts`: cases per class (or per label) of a split: the one place these are counted.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

#: how metric keys read in sentences
METRIC_NAMES = {"accuracy": "Accuracy", "auc": "ROC AUC", "pr_auc": "PR AUC", "sensitivity": "Sensitivity",
                "specificity": "Specificity", "ppv": "PPV", "npv": "NPV", "f1": "F1",
                "balanced_accuracy": "Balanced accuracy", "mae": "MAE", "qwk": "Quadratic weighted kappa",
                "subset_accuracy": "Subset accuracy"}
#: binary metrics whose meaning depends on which class is positive
POSITIVE_DEPENDENT = ("sensitivity", "specificity", "ppv", "npv", "f1", "pr_auc")


def metric_label(name: str, positive_class: str | None = None) -> str:
    """``Sensitivity (malignant)`` for a binary metric that is about the positive class; else the plain name."""
    label = METRIC_NAMES.get(name, name)
    if positive_class is not None and name in POSITIVE_DEPENDENT:
        return f"{label} ({positive_class})"
    return label


def class_counts(task: str, labels, classes: Sequence[str]) -> dict[str, int]:
    """Cases per class (multi-label: cases carrying each label), in class order."""
    from medsight.tasks import kind_of

    return kind_of(task).class_counts(labels, classes)


def quoted(names: Sequence[str]) -> str:
    """Class names for a sentence, quoted when one holds a comma (BreastMNIST's "normal, benign")."""
    names = [str(n) for n in names]
    return ", ".join(f'"{n}"' for n in names) if any("," in n for n in names) else ", ".join(names)


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "n/a"


def split_line(task: str, name: str, labels, classes: Sequence[str], positive_class: str | None = None) -> str:
    """``train: 546 images (normal, benign 399, malignant 147); prevalence of malignant 26.9%``."""
    n = len(labels)
    counts = class_counts(task, labels, classes)
    parts = ", ".join(f"{c} {k}" for c, k in counts.items())
    from medsight.tasks import kind_of

    line = kind_of(task).split_counts_line(name, n, parts)
    if positive_class is not None:
        line += f"; prevalence of {positive_class} {_pct(counts[positive_class], n)}"
    return line


def _size_lines(dataset) -> list[str]:
    size = list(dataset.input_size)
    shown = "x".join(map(str, size))
    ns = dataset.native_size or {}
    source = (dataset.recipe or {}).get("source") or {}
    if "medmnist" in source:
        return [f"input size: {shown}, the MedMNIST release's own size (no resizing; other releases: "
                "data.size = 28, 64, 128 or 224)"]
    med = ns.get("median")
    if not med:
        return [f"input size: {shown}, as stored in the file"]
    native = "x".join(map(str, med))
    if not ns.get("resized"):
        return [f"input size: {shown}, the files' own size (no resizing)"]
    lo, hi = "x".join(map(str, ns.get("min", med))), "x".join(map(str, ns.get("max", med)))
    spread = f" (from {lo} to {hi})" if lo != hi else ""
    factor = ns.get("factor") or 1.0
    lines = [f"input size: {shown} (data.size); the files are {native} px (median){spread}, so each is resized "
             + (f"down {factor:.1f}x" if factor > 1 else f"up {1 / factor:.1f}x" if factor < 1 else "to fit")]
    if factor > 2:
        lines.append(f"WARNING: images are shrunk {factor:.1f}x ({native} -> {shown}); fine detail is lost. "
                     f"Train at a larger size with data.size (e.g. --size {min(int(max(med)), 224)}) if the finding "
                     "is small")
    return lines


def describe_training(dataset, cfg, device: Any = None, threads: int | None = None) -> list[str]:
    """The facts of a training run, one sentence per line (no patient data: counts and settings only)."""
    task = dataset.task
    pos = getattr(dataset, "positive_class", None)
    lines = [f"data: {dataset.name}, {task} task, {len(dataset.classes)} classes: {quoted(dataset.classes)}"]
    for s in ("train", "val", "test"):
        if s in dataset.splits:
            lines.append(split_line(task, s, dataset.splits[s].labels, dataset.classes, pos))
    if pos is not None:
        how = getattr(dataset, "positive_class_source", None) or "as loaded"
        lines.append(f"positive class: {pos} ({how}); sensitivity, PPV and the threshold are about {pos}, and the "
                     f"model outputs P({pos})")
    lines.append(f"splits: {getattr(dataset, 'split_origin', None) or 'as given'}")
    leak = getattr(dataset, "leakage", None)
    if leak and leak.get("findings"):
        f = leak["findings"]
        lines.append(f"WARNING: leakage accepted (data.allow_leakage): {f.get('patients_in_several_splits', 0)} "
                     f"patient(s) in more than one split, {f.get('identical_images_across_splits', 0)} identical "
                     "image(s) in different splits; test metrics may be optimistic")
    lines += _size_lines(dataset)
    if cfg is not None:
        op = str(cfg.train.operating_point)
        lines.append(model_line(cfg))
        lines.append(stopping_line(cfg))
        from medsight.tasks import kind_of

        if kind_of(task).uses_threshold:
            lines.append("decision threshold: " + threshold_rule_sentence(op))
    if device is not None:
        lines.append(f"device: {device}" + (f", {threads} CPU thread(s)" if threads else ""))
    return lines


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _src(cfg, *keys: str) -> str:
    """`` (from --epochs)`` when the first of ``keys`` the config's origins know was given explicitly."""
    sources = getattr(cfg, "_sources", None) or {}
    for k in keys:
        if k in sources:
            return f" (from {sources[k]})"
    return ""


def model_line(cfg) -> str:
    """The model and schedule that run, exactly as in the run's config.yaml, each given value with its origin."""
    m, t = cfg.model, cfg.train
    return (f"model: {m.name}{_src(cfg, 'model.name')}, width {m.width:g}, dropout {m.dropout:g}"
            f"{_src(cfg, 'model.dropout')}; at most {_plural(t.epochs, 'epoch')}{_src(cfg, 'train.epochs')} of batch "
            f"{t.batch_size}{_src(cfg, 'train.batch_size')}, {t.optimizer} learning rate {t.lr:g}"
            f"{_src(cfg, 'train.lr')}, {t.schedule} schedule, seed {t.seed}{_src(cfg, 'train.seed')}; augmentation "
            f"{'on' if cfg.augment.enabled else 'off'}{_src(cfg, 'augment.enabled')}")


def stopping_line(cfg) -> str:
    """Early stopping as configured, in words."""
    t = cfg.train
    monitor = "loss" if t.monitor == "loss" else METRIC_NAMES.get(t.monitor, t.monitor)
    if t.patience is None:
        return (f"early stopping: off (train.patience null{_src(cfg, 'train.patience')}); every one of the "
                f"{_plural(t.epochs, 'epoch')} runs, the epoch with the best validation {monitor} is kept")
    gain = f"a drop by more than {t.min_delta:g}" if t.monitor == "loss" else f"a gain of more than {t.min_delta:g}"
    return (f"early stopping: training stops after {_plural(t.patience, 'epoch')} in a row without {gain} in "
            f"validation {monitor} (train.patience{_src(cfg, 'train.patience')}, train.min_delta); "
            f"{t.epochs} epochs at most; the epoch with the best validation {monitor} is kept")


def outcome_line(result, cfg) -> str:
    """How training ended: the epoch it stopped at and the best epoch (from a FitResult)."""
    run = len(getattr(result, "history", []) or [])
    best = getattr(result, "best_epoch", None)
    ensemble = (getattr(result, "extra", None) or {}).get("ensemble")
    if ensemble:
        ran = ensemble.get("epochs_run") or []
        return (f"training: the ensemble members ran {', '.join(map(str, ran))} epochs (at most {cfg.train.epochs} "
                f"each, early stopping patience {cfg.train.patience}); their best epochs "
                f"{', '.join(map(str, ensemble.get('best_epochs', [])))}, whose weights are kept")
    if getattr(result, "stopped_early", False):
        return (f"training: stopped early at epoch {run} of at most {cfg.train.epochs} ({cfg.train.patience} epochs "
                f"without a gain on validation); best epoch {best}, whose weights are kept")
    return f"training: ran {_plural(run, 'epoch')} of {cfg.train.epochs}; best epoch {best}, whose weights are kept"


def threshold_lines(meta: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(summary lines, warnings) about a bundle's threshold: value (3 significant digits), the rule in words, how it
    was placed, its 95% interval over validation resamples; warnings when the validation split is too small or too
    separable to place it well (from ``threshold_detail``)."""
    if meta.get("threshold") is None:
        return [], []
    d = meta.get("threshold_detail") or {}
    said = threshold_rule_sentence(meta.get("threshold_rule"), meta.get("threshold"))
    line = ("decision " if said.startswith("threshold ") else "decision threshold: ") + said
    if d.get("placement"):
        line += f"; placed at {d['placement']}"
    ci = d.get("ci")
    if ci:
        pairs = ci if isinstance(ci[0], (list, tuple)) else [ci]  # multi-label: one interval per label
        shown = ", ".join(f"{_thr(lo)} to {_thr(hi)}" for lo, hi in pairs if lo is not None)
        if shown:
            line += f"; 95% interval over {d.get('n_boot')} resamples of the validation cases: {shown}"
    return [line], [f"threshold: {w}" for w in d.get("warnings", [])]


def threshold_rule_sentence(rule: str | None, threshold=None) -> str:
    """How the threshold was set, truthfully: a rule chosen on validation, or a fixed number (not tuned)."""
    from medsight.metrics import parse_operating_point

    if rule is None:
        return "fixed threshold 0.5 (default, not tuned)" if threshold is None else \
            f"threshold {_thr(threshold)} (rule not recorded)"
    kind, target = parse_operating_point(rule)
    if kind == "fixed":
        return f"fixed threshold {target:g} (not tuned)"
    if kind in ("sens", "spec"):
        how = f"{'sensitivity' if kind == 'sens' else 'specificity'} >= {target:g}"
    else:
        how = {"youden": "Youden's J (sensitivity + specificity - 1, maximised)", "f1": "the best F1"}.get(kind, kind)
    if threshold is None:
        return f"chosen on the validation split by {how}"
    return f"threshold {_thr(threshold)}, chosen on the validation split by {how}"


def _thr(threshold) -> str:
    t = np.atleast_1d(np.asarray(threshold, dtype=np.float64))
    return ", ".join(f"{v:.3g}" for v in t)


def _is_nan(v) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and math.isnan(float(v)))


def warn_degenerate(metrics: Mapping[str, Any], classes: Sequence[str] | None = None,
                    positive_class: str | None = None) -> list[str]:
    """Warnings for ``metrics`` (``{split: evaluate_predictions result}`` as in metrics.json).

    - the model predicts one class only on a split (from the confusion matrix);
    - a metric is undefined: ``"test: PPV (malignant) undefined: no case predicted malignant"`` (the ``reason`` the
      metric carries, or "undefined" when an older file has none).
    """
    out: list[str] = []
    for split, m in metrics.items():
        if not isinstance(m, Mapping) or "confusion_matrix" not in m:
            continue
        pos = m.get("positive_class") or positive_class
        cm = np.asarray((m.get("confusion_matrix") or {}).get("value") or [], dtype=np.int64)
        if cm.ndim == 2 and cm.size and cm.sum() > 0:
            predicted = cm.sum(axis=0)
            used = np.flatnonzero(predicted)
            if len(used) == 1:
                c = int(used[0])
                name = classes[c] if classes is not None and c < len(classes) else f"class {c}"
                out.append(f"WARNING: on the {split} split the model predicts one class only ({name}) for all "
                           f"{int(cm.sum())} cases: it has not learned to tell the classes apart")
        elif cm.ndim == 3 and cm.size and classes is not None:
            for c in range(cm.shape[0]):
                n_pos_pred = int(cm[c, :, 1].sum())
                if n_pos_pred in (0, int(cm[c].sum())):
                    word = "never" if n_pos_pred == 0 else "always"
                    out.append(f"WARNING: on the {split} split the model {word} predicts {classes[c]}")
        for k, v in m.items():
            if isinstance(v, Mapping) and "value" in v and k != "confusion_matrix" and _is_nan(v.get("value")):
                reason = v.get("reason") or "undefined for this data"
                out.append(f"{split}: {metric_label(k, pos)} undefined: {reason}")
    return out


__all__ = ["class_counts", "describe_training", "metric_label", "model_line", "outcome_line", "split_line",
           "stopping_line", "threshold_lines", "threshold_rule_sentence", "warn_degenerate"]
