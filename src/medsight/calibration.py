"""Which temperature and which threshold: chosen on the **validation** split only, before a bundle is written.

- ``fit_temperature``: the T > 0 that minimises the negative log-likelihood of ``task.probabilities(logits, T)``
  (so every task type, ordinal included, is calibrated through the same activation that serves it);
- ``choose_calibration``: the temperature (kept only when it lowers validation ECE) and the operating threshold by
  a stated rule (``youden``, ``f1``, ``sens=0.95``, ``spec=0.9`` or a fixed number) for binary and multilabel
  tasks, placed at the logit-midpoint of the range of thresholds that meet the rule best (robust on a small or
  well-separated validation split), with its bootstrap interval; multiclass and ordinal decide by argmax.

The result is a plain dict (``temperature``, ``threshold``, ``threshold_rule``, ``calibration``) that the
pipeline puts into ``bundle.json`` once; nothing here writes files.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import optimize

from medsight import metrics as M
from medsight.errors import DataError
from medsight.tasks import Task

_EPS = 1e-7


def nll(task: Task, logits, y_true, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``task.probabilities(logits, temperature)``."""
    p = task.probabilities(torch.as_tensor(np.asarray(logits, dtype=np.float32)), temperature).double().numpy()
    return task.kind.nll(p, y_true, _EPS)


def _check(task: Task, logits, y_true) -> None:
    z = np.asarray(logits)
    y = np.asarray(y_true)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[1] != task.num_outputs:
        raise DataError(f"{task.name} logits must have shape (N, {task.num_outputs}), got {np.asarray(logits).shape}")
    if len(y) != len(z):
        raise DataError(f"{len(y)} labels but {len(z)} logits")
    if not task.kind.indicator_labels:
        yi = y.reshape(-1)
        if len(yi) and (yi.min() < 0 or yi.max() >= task.num_classes):
            raise DataError(f"{task.name} labels must be ints in 0..{task.num_classes - 1}")


def fit_temperature(task: Task, logits, y_true) -> float:
    """Temperature T in [0.05, 20] minimising the validation NLL (bounded 1-D search on log T)."""
    _check(task, logits, y_true)
    res = optimize.minimize_scalar(lambda lt: nll(task, logits, y_true, math.exp(lt)),
                                   bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(res.x))


def choose_calibration(task: Task, logits_val, y_val, *, operating_point: str | float | None = "youden",
                       calibrate: bool = True, n_boot_threshold: int = 200) -> dict:
    """Temperature and operating threshold from the validation split's logits and labels.

    Returns ``{"temperature", "threshold", "threshold_rule", "calibration": {split, ece_before, ece_after, ...}}``
    ready to merge into ``bundle.json``. ``threshold_rule`` is the rule as given (``"youden"``, ``"0.5"``, ...);
    ``None`` for argmax tasks. Threshold tasks also get ``threshold_detail``
    (:func:`medsight.metrics.operating_point_detail`): where the rule puts the threshold when many tie (the
    logit-midpoint of the optimal range, never its edge), its 95% interval over ``n_boot_threshold`` resamples
    of the validation cases, and warnings when the split is too small or too separable to place it well."""
    logits = torch.as_tensor(np.asarray(logits_val, dtype=np.float32))
    y = np.asarray(y_val)
    _check(task, logits, y)
    probs_before = task.probabilities(logits).numpy()
    ece_before = M.expected_calibration_error(task.name, y, probs_before)
    temperature = 1.0
    if calibrate:
        t = fit_temperature(task, logits, y)
        # an NLL-optimal T does not always lower ECE; keep it only when it does on the validation split
        if M.expected_calibration_error(task.name, y, task.probabilities(logits, t).numpy()) < ece_before:
            temperature = t
    probs = task.probabilities(logits, temperature).numpy()
    threshold, rule, detail = None, None, None
    if task.uses_threshold and operating_point is not None:
        rule = str(operating_point)
        M.parse_operating_point(rule)
        threshold = task.as_threshold(M.choose_threshold(y, probs, rule))
        detail = M.operating_point_detail(y, probs, rule, n_boot=n_boot_threshold)
    summary = {"split": "val", "temperature": temperature, "ece_before": ece_before,
               "ece_after": M.expected_calibration_error(task.name, y, probs)}
    out = {"temperature": temperature, "threshold": threshold, "threshold_rule": rule, "calibration": summary}
    if detail is not None:
        out["threshold_detail"] = detail
    return out
