"""The vectorised numeric core of the metrics: confusion matrices, rates, AUC / average precision, quadratic
weighted kappa, each over a (B, N) matrix of bootstrap resamples at once. Pure numpy.

The task kinds (:mod:`medsight.tasks`) choose which of these make their metric set; :mod:`medsight.metrics` is the
public API (point estimates, bootstrap intervals, metrics.json, operating points, calibration curves).
"""

from __future__ import annotations

import numpy as np

from medsight.errors import ConfigError, DataError

#: scalar metrics shared by every task (macro averages for multiclass / multilabel / ordinal)
BASE_METRICS = (
    "accuracy",
    "auc",
    "pr_auc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "balanced_accuracy",
)
PER_CLASS_METRICS = ("sens", "spec", "ppv", "npv", "f1", "auc")


def check_unit_threshold(t: np.ndarray, given):
    """A threshold (one number or one per class) strictly inside (0, 1): a float, or an array per class."""
    if not np.all((t > 0) & (t < 1)):
        raise ConfigError(f"threshold must be in (0,1), got {given!r}")
    return float(t) if t.ndim == 0 else t


def div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64)
    return np.where(np.asarray(b) == 0, np.nan, out)


def nanmean(a, axis=-1):
    a = np.asarray(a, dtype=np.float64)
    cnt = np.sum(~np.isnan(a), axis=axis)
    s = np.nansum(a, axis=axis)
    return div(s, cnt)


def auc_ap_batch(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC AUC and average precision of each row from one descending sort.

    scores, labels: (B, N). AUC is the Mann-Whitney statistic (a tied positive/negative pair
    counts one half), identical to ``sklearn.roc_auc_score``; AP is sklearn's
    ``average_precision_score`` (precision at each distinct threshold weighted by the recall
    increment). Rows with one class only give nan AUC (and nan AP when no positive).
    """
    b, n = scores.shape
    order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    y = np.take_along_axis(labels, order, axis=1).astype(np.float64)
    tp = np.cumsum(y, axis=1)
    fp = np.arange(1, n + 1) - tp
    ar = np.arange(n)
    # tie groups: every position looks up the cumulative counts at its group's end / before its start
    is_last = np.ones((b, n), dtype=bool)
    is_last[:, :-1] = s[:, :-1] != s[:, 1:]
    is_first = np.ones((b, n), dtype=bool)
    is_first[:, 1:] = is_last[:, :-1]
    group_end = np.minimum.accumulate(np.where(is_last, ar, n - 1)[:, ::-1], axis=1)[:, ::-1]
    group_start = np.maximum.accumulate(np.where(is_first, ar, 0), axis=1)
    fp_end = np.take_along_axis(fp, group_end, axis=1)
    fp_before = np.where(group_start > 0, np.take_along_axis(fp, np.maximum(group_start - 1, 0), axis=1), 0.0)
    n_pos = tp[:, -1]
    n_neg = n - n_pos
    # each positive beats the negatives below its group and ties half of those inside it
    wins = (y * (n_neg[:, None] - 0.5 * (fp_end + fp_before))).sum(axis=1)
    auc = div(wins, n_pos * n_neg)
    prec_end = np.take_along_axis(tp, group_end, axis=1) / (group_end + 1)
    ap = div((y * prec_end).sum(axis=1), n_pos)
    return auc, ap


def auc_batch(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of each row (see :func:`auc_ap_batch`)."""
    return auc_ap_batch(scores, labels)[0]


def ap_batch(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Average precision of each row (see :func:`auc_ap_batch`)."""
    return auc_ap_batch(scores, labels)[1]


def confusion_batch(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(B, N) true and predicted labels -> (B, K, K) confusion matrices (rows = truth)."""
    b = y.shape[0]
    flat = (np.arange(b)[:, None] * k * k + y * k + pred).ravel()
    return np.bincount(flat, minlength=b * k * k).reshape(b, k, k)


def rates(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    sens = div(tp, tp + fn)
    spec = div(tn, tn + fp)
    return {
        "sens": sens,
        "spec": spec,
        "ppv": div(tp, tp + fp),
        "npv": div(tn, tn + fn),
        "f1": div(2 * tp, 2 * tp + fp + fn),
    }


def binary_batch(y, p, thr) -> dict[str, np.ndarray]:
    pred = (p >= thr).astype(np.int64)
    cm = confusion_batch(y, pred, 2)
    tn, fp, fn, tp = cm[:, 0, 0], cm[:, 0, 1], cm[:, 1, 0], cm[:, 1, 1]
    r = rates(tp, fp, tn, fn)
    auc, ap = auc_ap_batch(p, y)
    return {
        "accuracy": div(tp + tn, y.shape[1] * np.ones_like(tp)),
        "auc": auc,
        "pr_auc": ap,
        "sensitivity": r["sens"],
        "specificity": r["spec"],
        "ppv": r["ppv"],
        "npv": r["npv"],
        "f1": r["f1"],
        "balanced_accuracy": (r["sens"] + r["spec"]) / 2.0,
        "_cm": cm,
    }


def per_class_from_cm(cm: np.ndarray) -> dict[str, np.ndarray]:
    """(B, K, K) -> one-vs-rest rates, each (B, K)."""
    n = cm.sum(axis=(1, 2))[:, None]
    tp = np.diagonal(cm, axis1=1, axis2=2)
    fn = cm.sum(axis=2) - tp
    fp = cm.sum(axis=1) - tp
    tn = n - tp - fn - fp
    return rates(tp, fp, tn, fn)


def macro_rates(pc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Macro averages (over classes or labels, NaN-aware) of the per-class rates."""
    return {name: nanmean(pc[key]) for name, key in (("sensitivity", "sens"), ("specificity", "spec"),
                                                      ("ppv", "ppv"), ("npv", "npv"), ("f1", "f1"))}


def multiclass_batch(y, p, k, ordinal: bool) -> dict[str, np.ndarray]:
    # y: (B, N) ints, p: (B, N, K)
    pred = np.argmax(p, axis=2)
    cm = confusion_batch(y, pred, k)
    pc = per_class_from_cm(cm)
    aucs, aps = (np.stack(a, axis=1) for a in zip(*(auc_ap_batch(p[:, :, c], y == c) for c in range(k))))
    pc["auc"] = aucs
    out = {
        "accuracy": (pred == y).mean(axis=1),
        "auc": nanmean(aucs),
        "pr_auc": nanmean(aps),
        **macro_rates(pc),
        "balanced_accuracy": nanmean(pc["sens"]),
        "_cm": cm,
        "_per_class": pc,
    }
    if ordinal:
        out["mae"] = np.abs(pred - y).mean(axis=1).astype(np.float64)
        out["qwk"] = qwk_from_cm(cm)
    return out


def qwk_from_cm(cm: np.ndarray) -> np.ndarray:
    """Quadratic weighted Cohen's kappa from (B, K, K) confusion matrices."""
    k = cm.shape[1]
    cm = cm.astype(np.float64)
    n = cm.sum(axis=(1, 2))
    i = np.arange(k)
    w = (i[:, None] - i[None, :]) ** 2 / max((k - 1) ** 2, 1)
    expected = cm.sum(axis=2)[:, :, None] * cm.sum(axis=1)[:, None, :] / n[:, None, None]
    return 1.0 - div((w * cm).sum(axis=(1, 2)), (w * expected).sum(axis=(1, 2)))


def multilabel_batch(y, p, thr) -> dict[str, np.ndarray]:
    # y, p: (B, N, K)
    b, n, k = p.shape
    thr = np.broadcast_to(np.asarray(thr, dtype=np.float64), (k,))
    pred = (p >= thr).astype(np.int64)
    tp = ((pred == 1) & (y == 1)).sum(axis=1)
    fp = ((pred == 1) & (y == 0)).sum(axis=1)
    fn = ((pred == 0) & (y == 1)).sum(axis=1)
    tn = n - tp - fp - fn
    pc = rates(tp, fp, tn, fn)
    aucs, aps = (np.stack(a, axis=1) for a in zip(*(auc_ap_batch(p[:, :, c], y[:, :, c]) for c in range(k))))
    pc["auc"] = aucs
    cm = np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], -2)  # (B, K, 2, 2)
    return {
        "accuracy": (pred == y).mean(axis=(1, 2)),
        "subset_accuracy": (pred == y).all(axis=2).mean(axis=1),
        "auc": nanmean(aucs),
        "pr_auc": nanmean(aps),
        **macro_rates(pc),
        "balanced_accuracy": nanmean((pc["sens"] + pc["spec"]) / 2.0),
        "_cm": cm,
        "_per_class": pc,
    }


def binary_positive_probs(probs) -> np.ndarray:
    """(N,), (N, 1) or (N, 2) binary probabilities -> (N,) P(class 1)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        return p
    if p.ndim == 2 and p.shape[1] == 1:
        return p[:, 0]
    if p.ndim == 2 and p.shape[1] == 2:
        return p[:, 1]
    raise DataError(f"binary probs must be (N,), (N, 1) or (N, 2), got shape {p.shape}")


def binary_reasons(tn: int, fp: int, fn: int, tp: int, pos: str, neg: str) -> dict[str, str]:
    """Why each binary rate is undefined, from the confusion counts (only the undefined ones)."""
    why: dict[str, str] = {}
    if tp + fn == 0:
        why["sens"] = f"no {pos} case in the truth labels"
    if tn + fp == 0:
        why["spec"] = f"no {neg} case in the truth labels"
    if tp + fp == 0:
        why["ppv"] = f"no case predicted {pos}"
    if tn + fn == 0:
        why["npv"] = f"no case predicted {neg}"
    if 2 * tp + fp + fn == 0:
        why["f1"] = f"no {pos} case in the truth labels and none predicted {pos}"
    if tp + fn == 0 or tn + fp == 0:
        why["auc"] = f"the truth labels hold one class only (AUC needs both {pos} and {neg} cases)"
    return why
