"""Placeholder replaced on merge by the full metrics module (CIs, operating points, calibration)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def compute_metrics(task, y_true, probs, *, threshold=None):
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    out = {}
    if task == "binary":
        pred = (probs >= (0.5 if threshold is None else threshold)).astype(int)
        out["accuracy"] = float((pred == y_true).mean())
        out["auc"] = float(roc_auc_score(y_true, probs)) if len(np.unique(y_true)) > 1 else float("nan")
    return out
