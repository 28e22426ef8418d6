"""The one "needs review" rule (medsight.review): a margin on the logit scale, fitted on validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsight.review import (
    DEFAULT_MARGIN,
    MAX_MARGIN,
    ReviewRule,
    closeness,
    fit_review,
    flags,
    review,
    rule_from_meta,
    sig3,
    threshold_text,
)
from medsight.tasks import Task

BIN = Task("binary", 2)
MC = Task("multiclass", 3)
ML = Task("multilabel", 3)


def test_zero_probability_is_not_near_a_threshold_of_0_1():
    """The issue's contradiction: "P = 0.000 is within 0.1 of the threshold 0.100" must not happen."""
    for rule in (ReviewRule(), ReviewRule(margin=MAX_MARGIN, fitted=True)):
        for p in (0.0, 1e-4, 0.001):
            assert review(BIN, ["normal", "pneumonia"], {"normal": 1 - p, "pneumonia": p}, 0.1, rule) == []
    # ... while a probability really close to it (on the odds scale) is flagged, in words that say why
    why = review(BIN, ["normal", "pneumonia"], {"normal": 0.91, "pneumonia": 0.09}, 0.09999008476734161, ReviewRule())
    assert len(why) == 1 and why[0].startswith("P(pneumonia) = 0.09 is too close to the threshold 0.1 to call")


def test_youden_threshold_at_the_edge_does_not_flag_every_negative():
    """A Youden threshold of 0.0111 with negatives at p ~ 1e-4: the fitted rule flags at most 10% of val."""
    rng = np.random.default_rng(0)
    neg = 1 / (1 + np.exp(-rng.normal(-9, 1.5, 400)))
    pos = 1 / (1 + np.exp(-rng.normal(3, 1.5, 100)))
    val = np.concatenate([neg, pos])
    fitted = fit_review(BIN, val, 0.0111)
    assert fitted["rule"] == "logit_margin" and fitted["target_share"] == 0.1
    assert 0 < fitted["val_share"] <= 0.1 and 0 < fitted["margin"] <= MAX_MARGIN
    rule = rule_from_meta({"review": fitted})
    f = flags(BIN, val, 0.0111, rule)
    assert f.mean() == pytest.approx(fitted["val_share"]) and f.mean() <= 0.1
    # nothing farther than the margin (on the logit scale) is ever flagged
    d = closeness(BIN, val, 0.0111)[:, 0]
    assert not f[d >= rule.margin].any() and f[d < rule.margin].all()


@pytest.mark.parametrize("target", [0.0, 0.05, 0.1, 0.3])
def test_fitted_share_never_passes_the_target(target):
    rng = np.random.default_rng(1)
    val = rng.uniform(0, 1, 97)
    val[:10] = 0.5  # ties at the threshold: still never more than the target
    fitted = fit_review(BIN, val, 0.5, target_share=target)
    assert fitted["val_share"] <= target + 1e-12
    assert flags(BIN, val, 0.5, rule_from_meta({"review": fitted})).mean() <= target + 1e-12


def test_margin_is_capped_so_far_probabilities_are_never_flagged():
    val = np.full(50, 0.5)  # every validation case at the threshold: the cap decides
    val[:] = np.linspace(0.3, 0.7, 50)
    fitted = fit_review(BIN, val, 0.5, target_share=1.0)
    assert fitted["margin"] == pytest.approx(MAX_MARGIN)
    assert not flags(BIN, np.array([0.1, 0.9]), 0.5, rule_from_meta({"review": fitted})).any()  # odds x9


def test_multiclass_uses_the_top_two_log_probabilities():
    probs = np.array([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05], [0.34, 0.33, 0.33]])
    d = closeness(MC, probs, None)[:, 0]
    np.testing.assert_allclose(d, np.log([0.5 / 0.45, 0.9 / 0.05, 0.34 / 0.33]))
    why = review(MC, ["a", "b", "c"], {"a": 0.5, "b": 0.45, "c": 0.05}, None, ReviewRule())
    assert len(why) == 1 and "two most likely classes are too close to call (a 0.5, b 0.45)" in why[0]
    assert review(MC, ["a", "b", "c"], {"a": 0.9, "b": 0.05, "c": 0.05}, None, ReviewRule()) == []


def test_multilabel_each_label_against_its_threshold():
    why = review(ML, ["x", "y", "z"], {"x": 0.31, "y": 0.99, "z": 0.0}, [0.3, 0.3, 0.3], ReviewRule())
    assert len(why) == 1 and why[0].startswith("P(x) = 0.31")
    fitted = fit_review(ML, np.random.default_rng(2).uniform(0, 1, (60, 3)), [0.3, 0.5, 0.7])
    assert fitted["val_share"] <= 0.1


def test_ood_reason_comes_first_and_says_no_verdict():
    why = review(BIN, ["n", "p"], {"n": 0.5, "p": 0.5}, 0.5, ReviewRule(), ood_flag=True, ood_score=12.34,
                 ood_threshold=3.0)
    assert why[0] == ("the scan does not look like the training data (out-of-distribution score 12.3 > 3.0); "
                      "no verdict is given")
    assert len(why) == 2  # and it is also too close to call


def test_old_bundle_gets_the_stated_default():
    rule = rule_from_meta({"task": "binary"})
    assert rule.margin == DEFAULT_MARGIN == math.log(2) and not rule.fitted
    assert "default margin ln 2" in rule.describe() and rule.as_dict()["fitted"] is False
    bad = rule_from_meta({"review": {"rule": "something-else", "margin": 3}})
    assert bad == ReviewRule()


def test_thresholds_are_displayed_to_three_significant_digits():
    assert threshold_text(0.09999008476734161) == "0.1" and threshold_text(0.011123) == "0.0111"
    assert threshold_text([0.33333, 0.5]) == "0.333, 0.5" and threshold_text(None) == "-"
    assert sig3(0.98765) == "0.988"
