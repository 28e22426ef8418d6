"""metrics.py: checked against scikit-learn, bootstrap coverage on simulated data, operating
points, calibration, nan handling and every validation path."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

from medsight import metrics as M
from medsight.errors import ConfigError, DataError


def _binary(n=300, seed=0, d=1.0, round_to=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = norm.cdf(rng.normal(0, 1, n) + d * y - d / 2)
    return y, (np.round(p, round_to) if round_to else p)  # rounding makes ties


def _multiclass(n=300, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n)
    p[np.arange(n), y] += 0.4
    return y, p / p.sum(1, keepdims=True)


# ---------------------------------------------------------------------------------- vs sklearn


@pytest.mark.parametrize("thr", [0.5, 0.3])
def test_binary_matches_sklearn(thr):
    y, p = _binary()
    m = M.compute_metrics("binary", y, p, threshold=thr)
    pred = (p >= thr).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert m["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    # (N,1) and (N,2) probabilities mean the same thing
    assert M.compute_metrics("binary", y, p[:, None], threshold=thr) == m
    assert M.compute_metrics("binary", y, np.stack([1 - p, p], 1), threshold=thr) == m


def test_small_known_binary_example():
    y = [0, 0, 1, 1]
    p = [0.1, 0.4, 0.35, 0.8]
    m = M.compute_metrics("binary", y, p)
    assert m["auc"] == pytest.approx(0.75)
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["confusion_matrix"] == [[2, 0], [1, 1]]
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == (0.5, 1.0, 1.0, pytest.approx(2 / 3))


def test_multiclass_matches_sklearn():
    y, p = _multiclass()
    m = M.compute_metrics("multiclass", y, p)
    pred = p.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    ap = np.mean([skm.average_precision_score(y == c, p[:, c]) for c in range(4)])
    assert m["pr_auc"] == pytest.approx(ap)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["ppv"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    for c in range(4):
        pc = m["per_class"][c]
        assert pc["auc"] == pytest.approx(skm.roc_auc_score(y == c, p[:, c]))
        assert pc["sens"] == pytest.approx(skm.recall_score(y == c, pred == c))
        assert pc["spec"] == pytest.approx(skm.recall_score(y == c, pred == c, pos_label=False))
        assert pc["ppv"] == pytest.approx(skm.precision_score(y == c, pred == c))
        assert pc["npv"] == pytest.approx(skm.precision_score(y == c, pred == c, pos_label=False))
        assert pc["f1"] == pytest.approx(skm.f1_score(y == c, pred == c))
    assert m["specificity"] == pytest.approx(np.mean([m["per_class"][c]["spec"] for c in range(4)]))


def test_multilabel_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (200, 3))
    p = np.clip(0.3 + 0.35 * y + rng.normal(0, 0.2, y.shape), 0.001, 0.999)
    thr = np.array([0.4, 0.5, 0.6])
    m = M.compute_metrics("multilabel", y, p, threshold=thr)
    pred = (p >= thr).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p, average="macro"))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p, average="macro"))
    assert m["subset_accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["accuracy"] == pytest.approx(1 - skm.hamming_loss(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == [c.tolist() for c in skm.multilabel_confusion_matrix(y, pred)]
    assert m["per_class"][2]["auc"] == pytest.approx(skm.roc_auc_score(y[:, 2], p[:, 2]))


def test_ordinal_adds_mae_and_qwk():
    y, p = _multiclass(k=5, seed=2)
    m = M.compute_metrics("ordinal", y, p)
    pred = p.argmax(1)
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, pred))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))


def test_vectorised_auc_and_ap_match_sklearn_on_resamples():
    y, p = _binary(n=120, seed=3, round_to=1)  # heavy ties
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(y), (20, len(y)))
    auc = M._auc_batch(p[idx], y[idx])
    ap = M._ap_batch(p[idx], y[idx])
    for b in range(20):
        assert auc[b] == pytest.approx(skm.roc_auc_score(y[idx[b]], p[idx[b]]))
        assert ap[b] == pytest.approx(skm.average_precision_score(y[idx[b]], p[idx[b]]))


# ---------------------------------------------------------------------------------- nan handling


def test_undefined_values_are_nan_and_json_null():
    m = M.compute_metrics("binary", [1, 1, 1], [0.1, 0.2, 0.3])
    assert math.isnan(m["auc"]) and math.isnan(m["ppv"]) and math.isnan(m["specificity"])
    assert m["sensitivity"] == 0.0 and m["pr_auc"] == 1.0
    mc = M.compute_metrics("multiclass", [0, 0, 1], np.array([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1]]))
    assert math.isnan(mc["per_class"][2]["auc"]) and math.isnan(mc["per_class"][2]["sens"])
    assert mc["auc"] == pytest.approx(1.0)  # macro over the classes where it is defined
    ev = M.evaluate_predictions("binary", [1, 1, 0, 1], [0.9, 0.8, 0.7, 0.6], n_boot=50)
    text = json.dumps(M.to_jsonable(ev), allow_nan=False)
    assert json.loads(text)["auc"]["value"] == pytest.approx(2 / 3)
    single = M.to_jsonable(M.evaluate_predictions("binary", [1, 1], [0.2, 0.9], n_boot=20))
    assert single["auc"] == {"value": None, "ci": [None, None],
                             "reason": "the truth labels hold one class only (AUC needs both positive and negative cases)"}
    assert M.to_jsonable({"a": (np.float32(1.5), np.int64(2), np.inf, np.array([np.nan]))}) == {"a": [1.5, 2, None, [None]]}


def test_undefined_metrics_carry_the_reason_and_the_positive_class():
    # 3 malignant, 5 benign; the model calls every case benign: sensitivity 0, PPV undefined
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.1, 0.2, 0.3, 0.1, 0.2, 0.05, 0.3, 0.4]
    ev = M.evaluate_predictions("binary", y, p, threshold=0.5, n_boot=0, positive_class="malignant")
    assert ev["positive_class"] == "malignant"
    assert ev["confusion_matrix"]["value"] == [[5, 0], [3, 0]]
    assert ev["sensitivity"]["value"] == 0.0 and "reason" not in ev["sensitivity"]
    assert math.isnan(ev["ppv"]["value"]) and ev["ppv"]["reason"] == "no case predicted malignant"
    assert ev["npv"]["value"] == pytest.approx(5 / 8) and "reason" not in ev["npv"]
    assert ev["f1"]["value"] == 0.0  # 2TP / (2TP + FP + FN) = 0 / 3: defined
    # all predicted malignant, truth all malignant: specificity and NPV undefined
    ev2 = M.evaluate_predictions("binary", [1, 1], [0.9, 0.8], n_boot=0, positive_class="malignant")
    assert ev2["specificity"]["reason"] == "no non-malignant case in the truth labels"
    assert ev2["npv"]["reason"] == "no case predicted non-malignant"
    assert ev2["balanced_accuracy"]["reason"] == "no non-malignant case in the truth labels"
    assert "positive_class" not in M.evaluate_predictions("binary", [1, 0], [0.9, 0.1], n_boot=0)
    # multiclass: class 2 never occurs and is never predicted
    mc = M.evaluate_predictions("multiclass", [0, 0, 1], np.array([[0.9, 0.1, 0.0], [0.8, 0.1, 0.1], [0.2, 0.7, 0.1]]),
                                n_boot=0)
    assert mc["per_class"]["2"]["sens"]["reason"] == "no class 2 case in the truth labels"
    assert mc["per_class"]["2"]["ppv"]["reason"] == "no case predicted class 2"
    assert "reason" not in mc["per_class"]["0"]["sens"] and "reason" not in mc["sensitivity"]


# ---------------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_fast_deterministic_and_stratified():
    y, p = _binary(n=1000, seed=4, round_to=None)
    t0 = time.perf_counter()
    ci = M.bootstrap_ci("binary", y, p, n_boot=1000)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5, f"vectorised bootstrap took {elapsed:.2f}s"
    assert ci == M.bootstrap_ci("binary", y, p, n_boot=1000)
    assert ci != M.bootstrap_ci("binary", y, p, n_boot=1000, seed=1)
    auc = skm.roc_auc_score(y, p)
    assert ci["auc"][0] < auc < ci["auc"][1]
    idx = M._resample_indices("binary", y, 50, np.random.default_rng(0), True)
    assert (y[idx].sum(1) == y.sum()).all()  # every resample keeps the class counts
    idx = M._resample_indices("binary", y, 50, np.random.default_rng(0), False)
    assert len(set(y[idx].sum(1).tolist())) > 1


def test_bootstrap_other_tasks_and_per_class():
    y, p = _multiclass(n=200)
    ci = M.bootstrap_ci("multiclass", y, p, n_boot=200, per_class=True)
    assert set(ci) >= set(M.BASE_METRICS) and set(ci["per_class"]) == {0, 1, 2, 3}
    assert ci["per_class"][1]["auc"][0] <= ci["per_class"][1]["auc"][1]
    yo, po = _multiclass(n=200, k=5)
    assert {"mae", "qwk"} <= set(M.bootstrap_ci("ordinal", yo, po, n_boot=100))
    rng = np.random.default_rng(0)
    yl = rng.integers(0, 2, (150, 3))
    pl = np.clip(0.3 + 0.4 * yl + rng.normal(0, 0.2, yl.shape), 0, 1)
    assert "subset_accuracy" in M.bootstrap_ci("multilabel", yl, pl, n_boot=100)


def test_evaluate_predictions_format():
    y, p = _multiclass(n=150, k=3)
    ev = M.evaluate_predictions("multiclass", y, p, n_boot=100)
    point = M.compute_metrics("multiclass", y, p)
    assert ev["auc"]["value"] == point["auc"] and len(ev["auc"]["ci"]) == 2
    assert ev["auc"]["ci"][0] <= ev["auc"]["value"] <= ev["auc"]["ci"][1]
    assert ev["confusion_matrix"] == {"value": point["confusion_matrix"], "ci": None}
    assert set(ev["per_class"]) == {"0", "1", "2"} and set(ev["per_class"]["0"]) == set(M.PER_CLASS_METRICS)
    no_ci = M.evaluate_predictions("multiclass", y, p, n_boot=0)
    assert all(math.isnan(v) for v in no_ci["f1"]["ci"])


def _coverage(metric: str, n_sets: int = 200, n: int = 100, n_boot: int = 400):
    d = 1.2  # binormal: positives ~ N(d, 1), negatives ~ N(0, 1)
    truth = {"auc": norm.cdf(d / math.sqrt(2)), "sensitivity": norm.cdf(d / 2)}[metric]
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(n_sets):
        y = np.r_[np.zeros(n // 2, int), np.ones(n // 2, int)]
        score = rng.normal(0, 1, n) + d * y
        probs = 1 / (1 + np.exp(-(score - d / 2)))  # threshold 0.5 <=> score >= d/2
        lo, hi = M.bootstrap_ci("binary", y, probs, n_boot=n_boot, seed=i)[metric]
        hits += lo <= truth <= hi
    return hits / n_sets


@pytest.mark.parametrize("metric", ["auc", "sensitivity"])
def test_bootstrap_ci_coverage(metric):
    rate = _coverage(metric)
    assert 0.90 <= rate <= 0.99, f"95% CI for {metric} covered the truth in {rate:.1%} of datasets"


# ---------------------------------------------------------------------------------- operating points


def test_threshold_rules():
    y, p = _binary(n=400, seed=5, round_to=3)
    fpr, tpr, thr = skm.roc_curve(y, p)
    t = M.choose_threshold(y, p, "youden")
    edge = thr[np.argmax(tpr - fpr)]  # sklearn's edge: the lowest score called positive at the optimum
    below = p[p < edge].max()  # the next score down: every threshold in (below, edge] decides alike
    assert below < t <= edge
    logit = lambda v: np.log(v / (1 - v))  # noqa: E731
    assert logit(t) == pytest.approx((logit(below) + logit(edge)) / 2)  # the logit-midpoint, never the edge
    m = M.compute_metrics("binary", y, p, threshold=t)
    assert m["sensitivity"] + m["specificity"] - 1 == pytest.approx(np.max(tpr - fpr))
    for target in (0.95, 0.8):
        t = M.choose_threshold(y, p, f"sens={target}")
        m = M.compute_metrics("binary", y, p, threshold=t)
        assert m["sensitivity"] >= target
        higher = np.nextafter(p[p >= t].min(), 1)  # just above the lowest case called positive: loses the target
        assert M.compute_metrics("binary", y, p, threshold=higher)["sensitivity"] < target
    t = M.choose_threshold(y, p, "spec=0.90")
    assert M.compute_metrics("binary", y, p, threshold=t)["specificity"] >= 0.9
    lower = p[p < t].max()
    assert M.compute_metrics("binary", y, p, threshold=lower)["specificity"] < 0.9
    prec, rec, pthr = skm.precision_recall_curve(y, p)
    f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
    assert M.compute_metrics("binary", y, p, threshold=M.choose_threshold(y, p, "f1"))["f1"] == pytest.approx(f1.max())
    assert M.choose_threshold(y, p, 0.3) == 0.3 and M.choose_threshold(y, p, "0.7") == 0.7
    assert M.choose_threshold(y, np.stack([1 - p, p], 1), "youden") == M.choose_threshold(y, p, "youden")
    # spec=1 with the top score negative: nothing may be called positive
    t = M.choose_threshold([0, 1, 0], [0.9, 0.5, 0.1], "spec=1")
    assert 0.9 < t < 1


def test_tied_optimum_takes_the_logit_midpoint_not_the_edge():
    """A perfectly separated validation split: every threshold between the highest negative and the lowest positive
    is optimal; the rule takes the midpoint on the logit scale (the old edge rule gave the lowest positive's score,
    0.0111 for BreastMNIST, so every negative call sat within 0.1 of it)."""
    y = np.array([0] * 40 + [1] * 10)
    p = np.r_[np.linspace(0.0001, 0.002, 40), np.linspace(0.0111, 0.9, 10)]
    for rule in ("youden", "f1"):
        t = M.choose_threshold(y, p, rule)
        assert 0.002 < t < 0.0111
        assert np.log(t / (1 - t)) == pytest.approx((np.log(0.002 / 0.998) + np.log(0.0111 / 0.9889)) / 2)
    d = M.operating_point_detail(y, p, "youden", n_boot=50)
    assert d["optimal_range"] == [pytest.approx(0.002), pytest.approx(0.0111)]
    assert d["threshold"] == pytest.approx(M.choose_threshold(y, p, "youden"))
    assert d["ci"][0] <= d["threshold"] <= d["ci"][1] and d["n_pos"] == 10 and d["n_neg"] == 40
    assert "midpoint" in d["placement"]
    # 10 positives: too few to place a threshold well, said in words
    assert any("only 10 positive case(s)" in w for w in d["warnings"]), d["warnings"]


def test_wide_separating_gap_is_warned_and_well_placed_split_is_not():
    y = np.array([0] * 200 + [1] * 200)
    sep = np.r_[np.full(200, 0.01), np.full(200, 0.99)] + np.r_[np.linspace(0, 0.005, 200), -np.linspace(0, 0.005, 200)]
    d = M.operating_point_detail(y, sep, "youden", n_boot=50)
    assert any("equally well" in w for w in d["warnings"]) and 0.1 < d["threshold"] < 0.9
    rng = np.random.default_rng(3)
    z = np.r_[rng.normal(-1, 1, 200), rng.normal(1, 1, 200)]
    d = M.operating_point_detail(y, 1 / (1 + np.exp(-z)), "youden", n_boot=100)
    assert d["warnings"] == [] and d["ci"][0] < d["threshold"] < d["ci"][1]
    assert M.operating_point_detail(y, sep, "0.3")["ci"] is None


def test_threshold_multilabel_and_errors():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (100, 3))
    p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, y.shape), 0, 1)
    t = M.choose_threshold(y, p, "youden")
    assert t.shape == (3,)
    assert t[1] == M.choose_threshold(y[:, 1], p[:, 1], "youden")
    with pytest.raises(ConfigError, match="multiclass uses argmax"):
        M.choose_threshold(*_multiclass(n=20), "youden")
    with pytest.raises(DataError, match="both classes"):
        M.choose_threshold([1, 1, 1], [0.2, 0.5, 0.7], "youden")
    with pytest.raises(DataError, match="0/1"):
        M.choose_threshold([0, 2, 1], [0.2, 0.5, 0.7], "youden")
    with pytest.raises(DataError, match="samples"):
        M.choose_threshold([0, 1], [0.2, 0.5, 0.7], "youden")


def test_parse_operating_point():
    assert M.parse_operating_point("youden") == ("youden", None)
    assert M.parse_operating_point(" F1 ") == ("f1", None)
    assert M.parse_operating_point("sens=0.95") == ("sens", 0.95)
    assert M.parse_operating_point("spec = 0.9") == ("spec", 0.9)
    assert M.parse_operating_point(0.25) == ("fixed", 0.25)
    assert M.parse_operating_point("0.25") == ("fixed", 0.25)
    assert M.parse_operating_point(("sens", 0.8)) == ("sens", 0.8)


@pytest.mark.parametrize("bad", ["youdn", "sens=", "sens=abc", "sens=1.5", "spec=0", "spec=-0.1", "1.5", "0", 0, 1.0, True, None, "sens:0.9", [0.5]])
def test_parse_operating_point_errors(bad):
    with pytest.raises(ConfigError, match=r"allowed: youden, f1, sens=<0\.\.1>, spec=<0\.\.1>, or a number in \(0,1\)"):
        M.parse_operating_point(bad)


# ---------------------------------------------------------------------------------- calibration


def test_reliability_and_ece_known_values():
    y = np.array([0, 1, 1, 1])
    p = np.array([0.05, 0.95, 0.95, 0.05])
    rc = M.reliability_curve("binary", y, p, n_bins=10)
    assert rc["count"][0] == 2 and rc["count"][9] == 2 and sum(rc["count"]) == 4
    assert rc["accuracy"][0] == 0.5 and rc["confidence"][9] == pytest.approx(0.95)
    assert math.isnan(rc["accuracy"][5]) and len(rc["edges"]) == 11
    assert M.expected_calibration_error("binary", y, p, n_bins=10) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
    perfect = M.expected_calibration_error("multiclass", [0, 1], np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert perfect == 0.0


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("case", range(17), ids=['unknown-task-nope-allowed-binary-multicl', 'threshold-must-be-in', 'one-number', 'not-multiclass', 'multilabel-threshold', 'n-boot', 'alpha', 'n-bins', 'samples', '0-samples', '0-1', 'nan-or-inf', 'n-n-1-or-n-2', 'ints-in-0-3', 'n-k', 'shape-of-probs', 'multilabel-y-true-must-be-0-1'])
def test_validation_refusals(case):
    y, p = _binary(n=20)
    refusals = [
        (ConfigError, "unknown task 'nope'; allowed: binary, multiclass, multilabel, ordinal",
         lambda: M.compute_metrics("nope", y, p)),
        (ConfigError, "threshold must be in",
         lambda: M.compute_metrics("binary", y, p, threshold=1.5)),
        (ConfigError, "one number",
         lambda: M.compute_metrics("binary", y, p, threshold=[0.5, 0.5])),
        (ConfigError, "not multiclass",
         lambda: M.compute_metrics("multiclass", *_multiclass(n=20), threshold=0.5)),
        (ConfigError, "multilabel threshold",
         lambda: M.compute_metrics("multilabel", np.zeros((5, 3)), np.full((5, 3), 0.5), threshold=[0.5, 0.5])),
        (ConfigError, "n_boot",
         lambda: M.bootstrap_ci("binary", y, p, n_boot=0)),
        (ConfigError, "alpha",
         lambda: M.bootstrap_ci("binary", y, p, alpha=1.5)),
        (ConfigError, "n_bins",
         lambda: M.reliability_curve("binary", y, p, n_bins=0)),
        (DataError, "samples",
         lambda: M.compute_metrics("binary", y[:5], p)),
        (DataError, "0 samples",
         lambda: M.compute_metrics("binary", [], [])),
        (DataError, "0/1",
         lambda: M.compute_metrics("binary", y + 1, p)),
        (DataError, "nan or inf",
         lambda: M.compute_metrics("binary", y, np.full(len(y), np.nan))),
        (DataError, r"\(N,\), \(N, 1\) or \(N, 2\)",
         lambda: M.compute_metrics("binary", y, np.zeros((len(y), 3)))),
        (DataError, "ints in 0..3",
         lambda: M.compute_metrics("multiclass", np.full(20, 4), _multiclass(n=20)[1])),
        (DataError, r"\(N, K\)",
         lambda: M.compute_metrics("multiclass", y, p)),
        (DataError, "shape of probs",
         lambda: M.compute_metrics("multilabel", y, np.zeros((20, 2)))),
        (DataError, "multilabel y_true must be 0/1",
         lambda: M.compute_metrics("multilabel", np.full((20, 2), 2), np.zeros((20, 2)))),
    ]
    error, message, call = refusals[case]
    with pytest.raises(error, match=message):
        call()
