"""Clinical metrics with bootstrap confidence intervals, operating points and calibration.

Pure numpy / scipy / scikit-learn; no torch. Task types are plain strings (their kinds, :mod:`medsight.tasks`,
say what each means; the numeric core is :mod:`medsight.scoring`):

``binary``
    ``y_true`` (N,) in {0, 1}; ``probs`` (N,) = P(class 1), or (N, 1), or (N, 2) softmax.
``multiclass``
    ``y_true`` (N,) ints in 0..K-1; ``probs`` (N, K) softmax.
``multilabel``
    ``y_true`` (N, K) 0/1; ``probs`` (N, K) sigmoid.
``ordinal``
    ``y_true`` (N,) ints in 0..K-1; ``probs`` (N, K) class probabilities; adds ``mae`` and
    ``qwk`` (quadratic weighted kappa).

Decision rules: binary and multilabel predict positive when ``prob >= threshold`` (default 0.5,
per class for multilabel); multiclass and ordinal predict ``argmax``.

Conventions:

* A value that is undefined for the data (AUC with one class present, PPV with no positive
  predictions, ...) is ``nan``, never an exception. :func:`to_jsonable` turns ``nan`` into
  ``None`` (JSON ``null``).
* Macro averages (multiclass / multilabel) are ``nanmean`` over the classes where the value is
  defined, and ``nan`` when it is defined for none.
* Every metric is computed from the same vectorised code path that the bootstrap uses, so a
  point estimate and its interval can never disagree on definitions.
* Operating points (:func:`choose_threshold`) and temperatures (:func:`fit_temperature`) must be
  chosen on the **validation** split only and then applied unchanged to the test split; that is
  the caller's responsibility.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np


from .errors import ConfigError, DataError

from .scoring import BASE_METRICS, PER_CLASS_METRICS, binary_positive_probs, div as _div  # noqa: F401
from .scoring import ap_batch as _ap_batch, auc_batch as _auc_batch  # noqa: F401  (tests use them)
from .scoring import binary_reasons as _binary_reasons
from .tasks import TASK_TYPES as TASKS
from .tasks import TaskKind, kind_of

OPERATING_POINT_HELP = "allowed: youden, f1, sens=<0..1>, spec=<0..1>, or a number in (0,1)"


# --------------------------------------------------------------------------------------------
# input checking
# --------------------------------------------------------------------------------------------


def _check_task(task: str) -> TaskKind:
    return kind_of(task)


def _prepare(task: str, y_true, probs) -> tuple[np.ndarray, np.ndarray, int]:
    """Validate shapes; return (y, p, K). Binary: p is (N,) P(class 1), K=2."""
    kind = _check_task(task)
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape[0] != p.shape[0]:
        raise DataError(f"y_true has {y.shape[0]} samples but probs has {p.shape[0]}")
    if y.shape[0] == 0:
        raise DataError("cannot compute metrics on 0 samples")
    if not np.all(np.isfinite(p)):
        raise DataError("probs contain nan or inf")
    return kind.prepare(y, p)


def _check_threshold(threshold, task: str, k: int):
    return kind_of(task).metric_threshold(threshold, k)


def _batch_metrics(task: str, y: np.ndarray, p: np.ndarray, k: int, thr, idx: np.ndarray):
    """Metrics for each row of the (B, N) index matrix ``idx``."""
    return kind_of(task).batch_metrics(y[idx], p[idx], k, thr)


def _scalar_names(task: str) -> tuple[str, ...]:
    return kind_of(task).metric_names


# --------------------------------------------------------------------------------------------
# public API: point estimates, intervals, metrics.json format
# --------------------------------------------------------------------------------------------


def compute_metrics(task: str, y_true, probs, *, threshold=None) -> dict[str, Any]:
    """Point estimates of every metric for ``task``.

    Returns a dict of floats (``nan`` where undefined) plus ``confusion_matrix`` (list of lists,
    rows = truth; for multilabel a list of K 2x2 matrices ``[[tn, fp], [fn, tp]]``) and, for
    multiclass / multilabel / ordinal, ``per_class``: ``{class_index: {sens, spec, ppv, npv, f1,
    auc}}``. ``threshold`` (binary / multilabel only, default 0.5; per class allowed for
    multilabel) is the decision cut-off: positive when ``prob >= threshold``.
    """
    y, p, k = _prepare(task, y_true, probs)
    thr = _check_threshold(threshold, task, k)
    res = _batch_metrics(task, y, p, k, thr, np.arange(y.shape[0])[None, :])
    out: dict[str, Any] = {name: float(res[name][0]) for name in _scalar_names(task)}
    out["confusion_matrix"] = res["_cm"][0].tolist()
    if "_per_class" in res:
        pc = res["_per_class"]
        out["per_class"] = {c: {m: float(pc[m][0, c]) for m in PER_CLASS_METRICS} for c in range(k)}
    return out


def _resample_indices(task: str, y: np.ndarray, n_boot: int, rng: np.random.Generator, stratified: bool):
    n = y.shape[0]
    if not stratified or not kind_of(task).stratified_bootstrap:
        # multilabel rows carry several labels at once: there is no single stratum, resample rows
        return rng.integers(0, n, size=(n_boot, n))
    cols = []
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        cols.append(members[rng.integers(0, members.size, size=(n_boot, members.size))])
    return np.concatenate(cols, axis=1)


def _bootstrap_arrays(task, y, p, k, thr, n_boot, seed, stratified, chunk=None):
    rng = np.random.default_rng(seed)
    idx = _resample_indices(task, y, n_boot, rng, stratified)
    # keep the working set around ~50M elements for big N x K
    per_row = idx.shape[1] * max(k, 1)
    chunk = chunk or max(1, int(5e7 // max(per_row, 1)))
    parts = [_batch_metrics(task, y, p, k, thr, idx[s : s + chunk]) for s in range(0, n_boot, chunk)]
    merged: dict[str, Any] = {}
    for key in parts[0]:
        if key == "_per_class":
            merged[key] = {m: np.concatenate([q[key][m] for q in parts]) for m in parts[0][key]}
        else:
            merged[key] = np.concatenate([q[key] for q in parts])
    return merged


def _percentile(a: np.ndarray, alpha: float) -> tuple[float, float]:
    a = a[~np.isnan(a)]
    if a.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(a, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def _check_boot_args(n_boot, alpha):
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ConfigError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0,1), got {alpha!r}")


def bootstrap_ci(
    task: str,
    y_true,
    probs,
    *,
    threshold=None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratified: bool = True,
    per_class: bool = False,
) -> dict[str, Any]:
    """Percentile bootstrap intervals ``{metric: (low, high)}`` for every scalar metric.

    Vectorised: one (n_boot, N) matrix of resampled indices, confusion matrices by ``bincount``,
    AUC by the Mann-Whitney rank formula and average precision by sorted cumulative sums, all over
    the whole matrix at once (one row-wise sort serves both). ``stratified`` resamples each class separately (so every resample
    keeps the class counts; not applicable to multilabel, whose rows are resampled as wholes).
    Resamples where a metric is undefined are dropped from that metric's interval. With
    ``per_class=True`` also returns ``per_class: {class: {metric: (low, high)}}``.
    """
    _check_boot_args(n_boot, alpha)
    y, p, k = _prepare(task, y_true, probs)
    thr = _check_threshold(threshold, task, k)
    res = _bootstrap_arrays(task, y, p, k, thr, n_boot, seed, stratified)
    out: dict[str, Any] = {name: _percentile(res[name], alpha) for name in _scalar_names(task)}
    if per_class and "_per_class" in res:
        pc = res["_per_class"]
        out["per_class"] = {c: {m: _percentile(pc[m][:, c], alpha) for m in PER_CLASS_METRICS} for c in range(k)}
    return out


def evaluate_predictions(
    task: str,
    y_true,
    probs,
    *,
    threshold=None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    positive_class: str | None = None,
) -> dict[str, Any]:
    """Point estimates with bootstrap CIs, in the format stored in ``metrics.json``.

    ``{metric: {"value": v, "ci": [lo, hi]}}`` for each scalar metric, plus
    ``"confusion_matrix": {"value": [[...]], "ci": None}`` and, for multi-class style tasks,
    ``"per_class": {"<k>": {metric: {"value": v, "ci": [lo, hi]}}}``. ``n_boot=0`` skips the
    bootstrap (every ``ci`` is ``[nan, nan]``). Pass through :func:`to_jsonable` before dumping.

    A value that is undefined carries ``"reason"`` next to it (see :func:`undefined_reasons`), e.g.
    ``{"value": nan, "ci": [nan, nan], "reason": "no case predicted positive"}``. Binary: ``positive_class``
    (the name of class 1, the class sensitivity / PPV are about) is stored as ``out["positive_class"]``.
    """
    point = compute_metrics(task, y_true, probs, threshold=threshold)
    if n_boot:
        ci = bootstrap_ci(task, y_true, probs, threshold=threshold, n_boot=n_boot, alpha=alpha, seed=seed, per_class=True)
    else:
        nan2 = (math.nan, math.nan)
        ci = {name: nan2 for name in _scalar_names(task)}
        if "per_class" in point:
            ci["per_class"] = {c: {m: nan2 for m in PER_CLASS_METRICS} for c in point["per_class"]}
    out: dict[str, Any] = {
        name: {"value": point[name], "ci": list(ci[name])} for name in _scalar_names(task)
    }
    out["confusion_matrix"] = {"value": point["confusion_matrix"], "ci": None}
    if "per_class" in point:
        out["per_class"] = {
            str(c): {m: {"value": v, "ci": list(ci["per_class"][c][m])} for m, v in d.items()}
            for c, d in point["per_class"].items()
        }
    reasons = undefined_reasons(task, point, positive_class=positive_class)
    for name, why in reasons.items():
        if name == "per_class":
            for c, d in why.items():
                for m, w in d.items():
                    out["per_class"][str(c)][m]["reason"] = w
        else:
            out[name]["reason"] = why
    if kind_of(task).has_positive_class and positive_class is not None:
        out["positive_class"] = str(positive_class)
    return out


def undefined_reasons(task: str, point: dict, *, positive_class: str | None = None) -> dict[str, Any]:
    """For every metric of a :func:`compute_metrics` result that is ``nan``, one sentence saying why.

    Returns ``{metric: reason}`` (and ``"per_class": {class: {metric: reason}}`` for per-class values). Binary
    reasons name the positive class (``positive_class``, else "positive"); a macro average is undefined when its
    metric is undefined for every class.
    """
    kind = _check_task(task)

    def nan(v) -> bool:
        return isinstance(v, (float, np.floating)) and math.isnan(float(v))

    out: dict[str, Any] = {}
    if kind.has_positive_class:
        (tn, fp), (fn, tp) = np.asarray(point["confusion_matrix"], dtype=np.int64).tolist()
        pos = "positive" if positive_class is None else str(positive_class)
        neg = "negative" if positive_class is None else f"non-{pos}"
        why = _binary_reasons(tn, fp, fn, tp, pos, neg)
        names = {"sensitivity": "sens", "specificity": "spec", "ppv": "ppv", "npv": "npv", "f1": "f1", "auc": "auc"}
        for metric, key in names.items():
            if nan(point.get(metric)) and key in why:
                out[metric] = why[key]
        if nan(point.get("pr_auc")):
            out["pr_auc"] = f"no {pos} case in the truth labels"
        if nan(point.get("balanced_accuracy")):
            out["balanced_accuracy"] = why.get("sens") or why.get("spec") or "sensitivity or specificity undefined"
        for metric in _scalar_names(task):
            if nan(point.get(metric)) and metric not in out:
                out[metric] = "undefined for this data"
        return out
    per_class: dict[int, dict[str, str]] = {}
    cm = np.asarray(point["confusion_matrix"], dtype=np.int64)
    k = len(point.get("per_class") or {})
    for c in range(k):
        tn, fp, fn, tp = kind.per_class_counts(cm, c)
        why = _binary_reasons(tn, fp, fn, tp, f"class {c}", f"not-class-{c}")
        vals = point["per_class"][c]
        got = {m: why[m] for m in PER_CLASS_METRICS if nan(vals.get(m)) and m in why}
        if got:
            per_class[c] = got
    macro = {"sensitivity": "sens", "specificity": "spec", "ppv": "ppv", "npv": "npv", "f1": "f1", "auc": "auc"}
    for metric in _scalar_names(task):
        if not nan(point.get(metric)):
            continue
        key = macro.get(metric)
        if key is not None and k:
            out[metric] = f"undefined for every class (e.g. {per_class.get(0, {}).get(key, 'see per class')})"
        elif metric == "qwk":
            out[metric] = "the truth labels or the predictions hold one class only (no disagreement to weigh)"
        else:
            out[metric] = "undefined for every class"
    if per_class:
        out["per_class"] = per_class
    return out


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays and tuples to plain JSON types; nan/inf -> None."""
    from medsight.utils import json_safe

    return json_safe(obj)


# --------------------------------------------------------------------------------------------
# operating points
# --------------------------------------------------------------------------------------------


def parse_operating_point(spec) -> tuple[str, float | None]:
    """Parse an operating-point rule.

    ``'youden'`` -> ``('youden', None)``; ``'f1'`` -> ``('f1', None)``; ``'sens=0.95'`` ->
    ``('sens', 0.95)``; ``'spec=0.9'`` -> ``('spec', 0.9)``; ``0.3`` or ``'0.3'`` ->
    ``('fixed', 0.3)``. Anything else raises :class:`ConfigError`.
    """
    if isinstance(spec, tuple) and len(spec) == 2:
        spec = spec[0] if spec[1] is None else (spec[1] if spec[0] == "fixed" else f"{spec[0]}={spec[1]}")
    if isinstance(spec, bool):
        raise ConfigError(f"bad operating point {spec!r}; {OPERATING_POINT_HELP}")
    if isinstance(spec, (int, float, np.floating, np.integer)):
        v = float(spec)
        if not 0 < v < 1:
            raise ConfigError(f"bad operating point {spec!r}: a fixed threshold must be in (0,1); {OPERATING_POINT_HELP}")
        return ("fixed", v)
    if not isinstance(spec, str):
        raise ConfigError(f"bad operating point {spec!r}; {OPERATING_POINT_HELP}")
    s = spec.strip().lower().replace(" ", "")
    if s in ("youden", "f1"):
        return (s, None)
    m = re.fullmatch(r"(sens|spec)=(.+)", s)
    if m:
        try:
            v = float(m.group(2))
        except ValueError:
            raise ConfigError(f"bad operating point {spec!r}; {OPERATING_POINT_HELP}") from None
        if not 0 < v <= 1:
            raise ConfigError(f"bad operating point {spec!r}: the target must be in (0,1]; {OPERATING_POINT_HELP}")
        return (m.group(1), v)
    try:
        v = float(s)
    except ValueError:
        raise ConfigError(f"bad operating point {spec!r}; {OPERATING_POINT_HELP}") from None
    return parse_operating_point(v)


#: probabilities are clipped to [_P_EPS, 1 - _P_EPS] before the logit when a threshold is placed
_P_EPS = 1e-6


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), _P_EPS, 1 - _P_EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _candidates(y: np.ndarray, p: np.ndarray):
    """Distinct scores in descending order (decision ``p >= t``) with the true and false positives at each."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise DataError("choosing an operating point needs both classes in the validation labels")
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    last = np.r_[ps[:-1] != ps[1:], True]
    tp = np.cumsum(ys)[last].astype(np.float64)
    fp = np.cumsum(1 - ys)[last].astype(np.float64)
    return ps[last], tp, fp, n_pos, y.size - n_pos


def _optimal_interval(y: np.ndarray, p: np.ndarray, rule: str, target: float | None) -> tuple[float, float]:
    """The range ``(lo, hi]`` of thresholds that meet ``rule`` best on (y, p): every threshold in it makes the same
    (best) decisions. Candidate ``i`` (the i-th highest distinct score) decides alike for every t in
    ``(score[i+1], score[i]]``; when several candidates tie on the rule (a small or well-separated split), the
    widest run of adjacent tied candidates on the logit scale is taken."""
    thr, tp, fp, n_pos, n_neg = _candidates(y, p)
    lower = np.r_[thr[1:], 0.0]  # t in (lower[i], thr[i]] decides as candidate i
    tpr, fpr = tp / n_pos, fp / n_neg
    if rule in ("youden", "f1"):
        score = tpr - fpr if rule == "youden" else 2 * tp / (tp + fp + n_pos)
        best = np.flatnonzero(score >= score.max() - 1e-12)
    elif rule == "sens":
        # the highest threshold (best specificity) that reaches the target sensitivity
        best = np.array([int(np.argmax(tpr >= float(target or 0) - 1e-12))])
    elif rule == "spec":
        ok = np.flatnonzero(1 - fpr >= float(target or 0) - 1e-12)
        if ok.size == 0:  # even the highest score is too many false positives: predict none
            return float(thr[0]), 1.0
        best = np.array([int(ok[-1])])  # the lowest threshold (best sensitivity) that keeps the target specificity
    else:  # pragma: no cover - parse_operating_point guards this
        raise ConfigError(f"bad operating point {rule!r}; {OPERATING_POINT_HELP}")
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    spans = [(float(lower[r[-1]]), float(thr[r[0]])) for r in runs]
    return max(spans, key=lambda s: float(_logit(s[1]) - _logit(s[0])))


def _threshold_one(y: np.ndarray, p: np.ndarray, rule: str, target: float | None) -> float:
    if rule == "fixed":
        return float(target)
    lo, hi = _optimal_interval(y, p, rule, target)
    # the midpoint of the optimal range on the logit scale: as far from the nearest validation case on either side
    # as the range allows (never its edge, which sits on a validation case's own score)
    t = float(_sigmoid((_logit(lo) + _logit(hi)) / 2))
    return min(max(t, np.nextafter(lo, 1.0)), hi)


def choose_threshold(y_true, probs, rule="youden"):
    """Decision threshold for binary (float) or multilabel (one per class, ndarray) predictions.

    ``rule``: ``'youden'`` (max sens + spec - 1), ``'f1'`` (max F1), ``'sens=0.95'`` (highest
    threshold with sensitivity >= 0.95, i.e. the best specificity there), ``'spec=0.90'``
    (lowest threshold with specificity >= 0.90, i.e. the best sensitivity there), or a fixed
    number in (0,1). Decisions are ``prob >= threshold``.

    Many thresholds make the same decisions on a finite split; the one returned is the **midpoint, on the logit
    scale, of the range of thresholds that meet the rule best** (for tied optima, the widest such range), so it sits
    between the validation cases on either side instead of on one of them (:data:`THRESHOLD_PLACEMENT`).

    Choose it on the **validation** split only and apply it unchanged to the test split; choosing
    it on the test split inflates every threshold-dependent metric.
    """
    kind, target = parse_operating_point(rule)
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim == 2 and y.shape[1] > 1:  # multilabel
        if p.shape != y.shape:
            raise DataError(f"multilabel y_true {y.shape} and probs {p.shape} must have the same shape")
        return np.array([_threshold_one(y[:, c].astype(np.int64), p[:, c], kind, target) for c in range(y.shape[1])])
    y = y.reshape(-1)
    if p.ndim == 2 and p.shape[1] > 2:
        raise ConfigError("operating points apply to binary and multilabel tasks; multiclass uses argmax")
    p = binary_positive_probs(p)
    if y.shape[0] != p.shape[0]:
        raise DataError(f"y_true has {y.shape[0]} samples but probs has {p.shape[0]}")
    if not np.isin(y, (0, 1)).all():
        raise DataError("binary y_true must be 0/1")
    return _threshold_one(y.astype(np.int64), p, kind, target)


THRESHOLD_PLACEMENT = ("the midpoint, on the logit scale, of the range of thresholds that meet the rule best on "
                       "the validation split")
#: fewer validation cases than this in either class: the threshold rests on too few cases (summary warning)
MIN_CLASS_CASES = 30
#: a 95% bootstrap interval of the threshold wider than this on the logit scale (a factor of about 7 in the odds)
#: is reported as uncertain
WIDE_LOGIT = 2.0


def _detail_one(y: np.ndarray, p: np.ndarray, kind: str, target, n_boot: int, seed: int) -> dict:
    lo, hi = _optimal_interval(y, p, kind, target)
    thr = _threshold_one(y, p, kind, target)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boots = []
    for _ in range(n_boot):  # stratified: every resample keeps both classes at the split's own counts
        idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        boots.append(_threshold_one(y[idx], p[idx], kind, target))
    ci = [float(_sigmoid(v)) for v in np.percentile(_logit(boots), [2.5, 97.5])] if boots else [None, None]
    return {"threshold": thr, "optimal_range": [lo, hi], "ci": ci, "n_pos": int(pos.size), "n_neg": int(neg.size)}


def operating_point_detail(y_true, probs, rule="youden", *, n_boot: int = 200, seed: int = 0) -> dict:
    """How well the validation split places the threshold of ``rule``.

    Returns ``{"rule", "placement", "threshold", "optimal_range", "ci", "n_boot", "n_pos", "n_neg", "warnings"}``
    (multi-label: lists per class for the numbers): ``optimal_range`` is the range of thresholds that meet the rule
    best (the threshold is its logit-midpoint), ``ci`` the 95% interval of the threshold over ``n_boot``
    class-stratified resamples of the validation cases, ``warnings`` sentences for a split too small (fewer than
    :data:`MIN_CLASS_CASES` cases of a class) or too separable (a wide optimal range, or a wide interval) to place
    a threshold well. A fixed threshold has no range, interval or warnings."""
    kind, target = parse_operating_point(rule)
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    out: dict[str, Any] = {"rule": str(rule), "placement": None if kind == "fixed" else THRESHOLD_PLACEMENT,
                           "n_boot": 0 if kind == "fixed" else int(n_boot), "warnings": []}
    if kind == "fixed":
        return {**out, "threshold": float(target or 0), "optimal_range": None, "ci": None}
    multilabel = y.ndim == 2 and y.shape[1] > 1
    cols: list[tuple[int | None, np.ndarray, np.ndarray]]
    if multilabel:
        cols = [(c, y[:, c].astype(np.int64), p[:, c]) for c in range(y.shape[1])]
    else:
        cols = [(None, y.reshape(-1).astype(np.int64), binary_positive_probs(p))]
    details = []
    for c, yc, pc in cols:
        d = _detail_one(yc, pc, kind, target, n_boot, seed)
        details.append(d)
        where = "" if c is None else f"label {c}: "
        small = min(d["n_pos"], d["n_neg"])
        if small < MIN_CLASS_CASES:
            which = "positive" if d["n_pos"] <= d["n_neg"] else "negative"
            out["warnings"].append(
                f"{where}the validation split has only {small} {which} case(s) (fewer than {MIN_CLASS_CASES}): the "
                "threshold rests on few cases; a larger validation split would place it better")
        lo, hi = d["optimal_range"]
        if float(_logit(hi) - _logit(lo)) > WIDE_LOGIT:
            out["warnings"].append(
                f"{where}every threshold from {lo:.3g} to {hi:.3g} meets the rule equally well on the validation "
                f"split (it separates the classes there with a wide gap), so the split cannot say where in that range "
                f"the threshold belongs; medsight takes the logit-midpoint {d['threshold']:.3g}")
        clo, chi = d["ci"]
        if clo is not None and float(_logit(chi) - _logit(clo)) > WIDE_LOGIT:
            out["warnings"].append(
                f"{where}the threshold is uncertain: over {n_boot} resamples of the validation cases it ranges "
                f"{clo:.3g} to {chi:.3g} (95%)")
    if multilabel:
        for k in ("threshold", "optimal_range", "ci", "n_pos", "n_neg"):
            out[k] = [d[k] for d in details]
    else:
        out.update({k: details[0][k] for k in ("threshold", "optimal_range", "ci", "n_pos", "n_neg")})
    return out


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


def _calibration_pairs(task: str, y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) pairs that a reliability diagram bins.

    binary: P(class 1) vs y; multilabel: every (sample, label) probability vs its 0/1 label;
    multiclass / ordinal: top-label confidence vs whether the argmax is correct.
    """
    y, p, k = _prepare(task, y_true, probs)
    return kind_of(task).calibration_pairs(y, p)


def reliability_curve(task: str, y_true, probs, n_bins: int = 15) -> dict[str, list]:
    """Equal-width reliability bins: ``edges`` (n_bins+1), and per bin ``accuracy`` (observed
    frequency), ``confidence`` (mean predicted probability) and ``count``; empty bins are nan."""
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")
    conf, outcome = _calibration_pairs(task, y_true, probs)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    acc = _div(np.bincount(b, weights=outcome, minlength=n_bins), count)
    cf = _div(np.bincount(b, weights=conf, minlength=n_bins), count)
    return {"edges": edges.tolist(), "accuracy": acc.tolist(), "confidence": cf.tolist(), "count": count.tolist()}


#: the fewest cases an equal-count reliability bin holds (the report's diagram)
MIN_BIN_CASES = 25


def reliability_curve_equal_count(task: str, y_true, probs, *, min_count: int = MIN_BIN_CASES,
                                  max_bins: int = 10) -> dict[str, Any]:
    """Reliability bins that each hold about the same number of cases, at least ``min_count`` (fewer bins on a
    small split; one bin when the split has fewer than ``2 * min_count`` cases): the cases sorted by confidence
    and cut into equal shares, so no bin is made of two cases and the curve does not zig-zag. Same keys as
    :func:`reliability_curve` (``edges``: each bin's lowest and the last bin's highest confidence), plus
    ``binning = "equal-count"`` and ``min_count``. ECE keeps its equal-width definition."""
    conf, outcome = _calibration_pairs(task, y_true, probs)
    n = len(conf)
    n_bins = int(max(1, min(max_bins, n // max(1, int(min_count)))))
    order = np.argsort(conf, kind="stable")
    chunks = [c for c in np.array_split(order, n_bins) if len(c)]
    edges = ([float(conf[chunks[0]].min())] + [float(conf[c].max()) for c in chunks]) if chunks else [0.0, 1.0]
    return {"edges": edges, "accuracy": [float(outcome[c].mean()) for c in chunks],
            "confidence": [float(conf[c].mean()) for c in chunks], "count": [int(len(c)) for c in chunks],
            "binning": "equal-count", "min_count": int(min_count)}


def expected_calibration_error(task: str, y_true, probs, n_bins: int = 15) -> float:
    """ECE = sum over bins of (bin share) * |observed frequency - mean confidence|."""
    rc = reliability_curve(task, y_true, probs, n_bins=n_bins)
    count = np.asarray(rc["count"], dtype=np.float64)
    gap = np.abs(np.asarray(rc["accuracy"]) - np.asarray(rc["confidence"]))
    return float(np.sum(np.where(count > 0, gap * count, 0.0)) / count.sum())


__all__ = [
    "TASKS",
    "binary_positive_probs",
    "bootstrap_ci",
    "choose_threshold",
    "compute_metrics",
    "evaluate_predictions",
    "expected_calibration_error",
    "operating_point_detail",
    "parse_operating_point",
    "reliability_curve",
    "reliability_curve_equal_count",
    "to_jsonable",
]
