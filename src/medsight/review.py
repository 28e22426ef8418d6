"""The one "needs review" rule: when a prediction must not be read as a verdict, and why.

A result needs review when

- the scan is out of distribution (the bundle's OOD detector flags it): then no class verdict is given at all
  (``predicted`` and ``decision`` are null everywhere), only the probabilities and the reason; or
- it is too close to call. Closeness is measured on the **logit (log-odds) scale** of the calibrated
  probability, where "0.000 vs a threshold of 0.1" is far apart and "0.08 vs 0.1" is near:

  * binary / multilabel: ``|logit(p) - logit(threshold)|`` (multilabel: the closest label);
  * multiclass / ordinal: ``log p1 - log p2`` between the two most likely classes.

  A case is flagged when its closeness is below the bundle's ``margin``. The margin is fitted on the validation
  split right after calibration (:func:`fit_review`) so that at most ``target_share`` (default 10%) of the
  validation cases are flagged, and it never exceeds :data:`MAX_MARGIN` (odds within a factor of 4 of the
  threshold's): a probability farther than that from the threshold on the logit scale is never flagged.

The rule is stored in ``bundle.json`` under ``review``::

    {"rule": "logit_margin", "margin": 0.42, "target_share": 0.1, "val_share": 0.097}

A bundle written before this rule existed has no ``review`` key; it gets :data:`DEFAULT_MARGIN` (ln 2: odds
within a factor of 2 of the threshold's odds, e.g. 0.053-0.182 around a threshold of 0.1), stated as a default
in the rule's description. ``medsight predict`` (CSV/JSON), ``POST /v1/predict``, the web page, ``/v1/model``
and the MLflow model all call :func:`review` through :class:`medsight.predict.Predictor`, so the decision, the
reasons and their wording are the same everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

RULE = "logit_margin"
#: share of validation cases the fitted margin flags at most
DEFAULT_TARGET_SHARE = 0.10
#: the margin of a bundle without a fitted rule: ln 2 (odds within a factor of 2 of the threshold's odds)
DEFAULT_MARGIN = math.log(2.0)
#: no fitted margin is wider than this: ln 4 (odds within a factor of 4 of the threshold's odds)
MAX_MARGIN = math.log(4.0)
#: probabilities are clipped to [EPS, 1 - EPS] before taking logits (float32 sigmoids reach 0 and 1)
EPS = 1e-7
NO_VERDICT = "no verdict"


def sig3(x: float) -> str:
    """A probability or threshold as displayed: 3 significant digits (stored exactly elsewhere)."""
    return f"{float(x):.3g}"


def threshold_text(threshold: float | Sequence[float] | None) -> str:
    """A threshold (or one per label) as displayed: 3 significant digits; '-' when the task has none."""
    if threshold is None:
        return "-"
    return ", ".join(sig3(v) for v in np.atleast_1d(np.asarray(threshold, dtype=np.float64)))


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class ReviewRule:
    """The fitted (or default) rule of one bundle."""

    margin: float = DEFAULT_MARGIN
    target_share: float | None = None
    val_share: float | None = None
    fitted: bool = False

    def as_dict(self) -> dict:
        return {"rule": RULE, "margin": self.margin, "target_share": self.target_share, "val_share": self.val_share,
                "fitted": self.fitted, "description": self.describe()}

    def describe(self) -> str:
        m = f"{self.margin:.2f}"
        if not self.fitted:
            return (f"review when the log-odds are within {m} of the threshold's (multiclass: of the runner-up's); "
                    "default margin ln 2, this bundle has no fitted rule")
        share = "" if self.val_share is None else f", flagging {self.val_share:.1%} of validation cases"
        target = "" if self.target_share is None else f" (target at most {self.target_share:.0%})"
        return (f"review when the log-odds are within {m} of the threshold's (multiclass: of the runner-up's); "
                f"margin fitted on the validation split{target}{share}")


def rule_from_meta(meta) -> ReviewRule:
    """The bundle's rule: ``bundle.json`` ``review`` (the ONE place that reads it), or the default. ``meta``: a
    :class:`medsight.bundle.BundleMeta` (or a bundle.json dict)."""
    if isinstance(meta, Mapping):
        raw = meta.get("review")
    else:
        raw = None if meta.review is None else meta.review.model_dump()
    if not isinstance(raw, Mapping) or raw.get("rule") != RULE or not isinstance(raw.get("margin"), (int, float)):
        return ReviewRule()

    def opt(v):
        return float(v) if isinstance(v, (int, float)) else None

    return ReviewRule(margin=float(raw["margin"]), target_share=opt(raw.get("target_share")),
                      val_share=opt(raw.get("val_share")), fitted=True)


def closeness(task, probs: np.ndarray, threshold) -> np.ndarray:
    """(N, ...) calibrated probabilities as ``Task.probabilities`` gives them -> (N, L) distances on the logit
    scale: binary (N, 1) to the threshold, multilabel (N, K) per label, multiclass/ordinal (N, 1) between the
    top two classes' log-probabilities."""
    probs = np.asarray(probs, dtype=np.float64)
    if task.uses_threshold:
        p = probs.reshape(len(probs), -1)
        thr = np.broadcast_to(np.asarray(0.5 if threshold is None else threshold, dtype=np.float64).reshape(-1),
                              (p.shape[1],))
        return np.abs(_logit(p) - _logit(thr)[None, :])
    top = -np.sort(-probs.reshape(len(probs), -1), axis=1)[:, :2]
    lp = np.log(np.clip(top, EPS, 1.0))
    return (lp[:, :1] - lp[:, 1:2])


def fit_review(task, val_probs: np.ndarray, threshold, target_share: float = DEFAULT_TARGET_SHARE) -> dict:
    """The margin that flags at most ``target_share`` of the validation cases (never wider than
    :data:`MAX_MARGIN`) -> the ``bundle.json`` ``review`` entry."""
    if not 0 <= target_share <= 1:
        raise ValueError(f"target_share must be in [0, 1], got {target_share}")
    c = np.sort(closeness(task, val_probs, threshold).min(axis=1))
    n = len(c)
    k = int(math.floor(target_share * n + 1e-9))  # at most k cases strictly below the margin
    margin = float(c[k]) if k < n else MAX_MARGIN
    margin = min(margin, MAX_MARGIN)
    val_share = float(np.mean(c < margin)) if n else 0.0
    return {"rule": RULE, "margin": margin, "target_share": float(target_share), "val_share": val_share}


def flags(task, probs: np.ndarray, threshold, rule: ReviewRule) -> np.ndarray:
    """(N,) bool: which cases are too close to call (OOD not included)."""
    return closeness(task, probs, threshold).min(axis=1) < rule.margin


def share_flagged(bundle, probs: np.ndarray) -> tuple[float, str]:
    """(share of a split's cases flagged for review as too close to call, the rule in words), from the bundle's
    calibrated probabilities on that split, for the training summary and the report."""
    rule = rule_from_meta(bundle.meta)
    f = flags(bundle.task, probs, bundle.threshold, rule)
    return (float(np.mean(f)) if len(f) else 0.0), rule.describe()


def share_line(bundle, probs: np.ndarray, split: str) -> str:
    """One summary/report sentence: "share of test cases flagged for review: 7.5% (too close to call, not counting
    out-of-distribution scans; rule ...)"."""
    share, words = share_flagged(bundle, probs)
    what = {"val": "validation"}.get(split, split)
    return (f"share of {what} cases flagged for review: {share:.1%} (too close to call, not counting "
            f"out-of-distribution scans; {words})")


def review(task, classes: Sequence[str], probabilities: Mapping[str, float], threshold, rule: ReviewRule, *,
           ood_flag: bool | None = None, ood_score: float | None = None,
           ood_threshold: float | None = None) -> list[str]:
    """Why one prediction must not be read as a verdict (empty: it can be). ``probabilities`` per class name as a
    Prediction carries them. The first reason of an out-of-distribution scan says so; its class verdict is
    withheld by the caller."""
    reasons: list[str] = []
    if ood_flag:
        score = "" if ood_score is None else f" {ood_score:.1f}"
        above = "" if ood_threshold is None else f" > {ood_threshold:.1f}"
        reasons.append(f"the scan does not look like the training data (out-of-distribution score{score}{above}); "
                       f"{NO_VERDICT} is given")
    m = f"{rule.margin:.2f}"
    if task.uses_threshold:
        names = [classes[1]] if task.num_outputs == 1 else list(classes)
        thr = np.broadcast_to(np.asarray(0.5 if threshold is None else threshold, dtype=np.float64).reshape(-1),
                              (len(names),))
        for c, t in zip(names, thr):
            p = float(probabilities[c])
            d = abs(float(_logit(p)) - float(_logit(t)))
            if d < rule.margin:
                reasons.append(f"P({c}) = {sig3(p)} is too close to the threshold {sig3(t)} to call: its log-odds "
                               f"differ from the threshold's by {d:.2f}, less than the review margin {m}")
    else:
        (c1, p1), (c2, p2) = sorted(probabilities.items(), key=lambda kv: -kv[1])[:2]
        d = float(np.log(max(p1, EPS)) - np.log(max(p2, EPS)))
        if d < rule.margin:
            reasons.append(f"the two most likely classes are too close to call ({c1} {sig3(p1)}, {c2} {sig3(p2)}): "
                           f"their log-probabilities differ by {d:.2f}, less than the review margin {m}")
    return reasons


__all__ = ["DEFAULT_MARGIN", "DEFAULT_TARGET_SHARE", "MAX_MARGIN", "NO_VERDICT", "RULE", "ReviewRule", "closeness",
           "fit_review", "flags", "review", "rule_from_meta", "share_flagged", "share_line", "sig3", "threshold_text"]
