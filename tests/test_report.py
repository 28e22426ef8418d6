"""report.py: a self-contained HTML report whose every image is an embedded, valid PNG."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import torch

from medsight.calibration import fit_temperature
from medsight.tasks import Task
import pytest
from PIL import Image

from medsight import metrics as M
from medsight.errors import ConfigError, DataError
from medsight.explain import overlay_png
from medsight.report import build_report, write_report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.refs, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for k in ("href", "src"):
            if k in a:
                self.refs.append(a[k])


def _check_self_contained(text: str) -> _Collect:
    p = _Collect()
    p.feed(text)
    assert p.imgs, "no images in the report"
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        img.verify()
        assert img.format == "PNG"
    assert not re.search(r"https?://", text), "external reference in the report"
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert all(not r.startswith(("http", "//")) for r in p.refs)
    return p


def _binary(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.5 * (2 * y - 1))))
    return y, p


def test_binary_report(tmp_path):
    yv, pv = _binary(150, 0)
    yt, pt = _binary(200, 1)
    thr = M.choose_threshold(yv, pv, "youden")
    logits_v = np.log(pv / (1 - pv)) * 3  # over-confident on purpose
    T = fit_temperature(Task("binary", 2), logits_v, yv)
    rng = np.random.default_rng(2)
    gallery = [
        dict(png=overlay_png(rng.random((16, 16)), rng.random((16, 16))), caption=f"case <{i}> p=0.{i}", correct=i % 2 == 0)
        for i in range(4)
    ]
    text = build_report(
        title="Pneumonia <test> & report",
        task="binary",
        class_names=["normal", "pneumonia"],
        splits={
            "val": {"y_true": yv, "probs": pv, "metrics": M.evaluate_predictions("binary", yv, pv, threshold=thr, n_boot=100)},
            "test": {"y_true": yt, "probs": pt},  # metrics computed by the report
        },
        threshold=thr,
        history=[{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.2 / (e + 1), "val_auc": 0.7 + e / 50, "lr": 1e-3} for e in range(6)],
        calibration={
            "temperature": T,
            "ece_before": M.expected_calibration_error("binary", yv, Task("binary", 2).probabilities(torch.as_tensor(logits_v), 1.0).numpy()),
            "ece_after": M.expected_calibration_error("binary", yv, Task("binary", 2).probabilities(torch.as_tensor(logits_v), T).numpy()),
            "reliability_before": M.reliability_curve("binary", yv, Task("binary", 2).probabilities(torch.as_tensor(logits_v), 1.0).numpy()),
            "reliability_after": M.reliability_curve("binary", yv, Task("binary", 2).probabilities(torch.as_tensor(logits_v), T).numpy()),
        },
        gallery=gallery,
        extra_sections=[("Data <QC>", "<p>ok</p>")],
    )
    p = _check_self_contained(text)
    # roc/pr x2, confusion x2, reliability, history, 4 gallery cards
    assert len(p.imgs) == 2 + 2 + 1 + 1 + 4
    assert "Pneumonia &lt;test&gt; &amp; report" in text and "<test>" not in text
    assert "case &lt;0&gt;" in text and "Data &lt;QC&gt;" in text
    assert "Correct (2)" in text and "Wrong (2)" in text
    out = write_report(tmp_path / "sub" / "report.html", text)
    assert out.read_text(encoding="utf-8") == text
    assert [f.name for f in out.parent.iterdir()] == ["report.html"]  # no temp file left


@pytest.mark.parametrize("task", ["multiclass", "multilabel", "ordinal"])
def test_multi_reports(task):
    rng = np.random.default_rng(3)
    n, k = 120, 3
    if task == "multilabel":
        y = rng.integers(0, 2, (n, k))
        p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, (n, k)), 0.01, 0.99)
        thr = M.choose_threshold(y, p, "f1")
    else:
        y = rng.integers(0, k, n)
        p = rng.dirichlet(np.ones(k), n)
        p[np.arange(n), y] += 0.5
        p /= p.sum(1, keepdims=True)
        thr = None
    text = build_report(
        title=task, task=task, class_names=["a", "b", "c"],
        splits={"test": {"y_true": y, "probs": p, "metrics": M.evaluate_predictions(task, y, p, threshold=thr, n_boot=50)}},
        threshold=thr,
    )  # fmt: skip
    _check_self_contained(text)
    assert "Per class (test)" in text and "Sens" in text


def test_report_errors():
    y, p = _binary(20, 0)
    with pytest.raises(ConfigError, match="unknown task"):
        build_report(title="x", task="nope", class_names=["a", "b"], splits={"t": {"y_true": y, "probs": p}})
    with pytest.raises(DataError, match="at least one split"):
        build_report(title="x", task="binary", class_names=["a", "b"], splits={})
    with pytest.raises(DataError, match="needs 'y_true'"):
        build_report(title="x", task="binary", class_names=["a", "b"], splits={"t": {"probs": p}})


def test_report_single_class_split_does_not_crash():
    y = np.ones(10, dtype=int)
    p = np.linspace(0.1, 0.9, 10)
    text = build_report(title="x", task="binary", class_names=["a", "b"], splits={"t": {"y_true": y, "probs": p}}, threshold=0.5)
    _check_self_contained(text)


# ------------------------------------------------------------------ clinically honest wording and numbers


def _breast_like():
    """57 benign / 21 malignant (val) as BreastMNIST, malignant = class 1; the model finds 18 of 21."""
    y = np.array([0] * 57 + [1] * 21)
    p = np.r_[np.full(40, 0.1), np.full(17, 0.6), np.full(3, 0.2), np.full(18, 0.8)]
    return y, p


def test_report_names_the_positive_class_and_states_the_tuned_rule():
    y, p = _breast_like()
    text = build_report(title="b", task="binary", class_names=["normal, benign", "malignant"],
                        splits={"val": {"y_true": y, "probs": p}}, threshold=0.43, threshold_rule="youden")
    assert "threshold 0.43, chosen on the validation split by Youden&#x27;s J" in text
    assert "fixed threshold" not in text and "(chosen on validation)" not in text
    assert "positive class: <b>malignant</b>" in text
    assert "Sensitivity (malignant)" in text and "PPV (malignant)" in text and "ROC AUC (malignant)" not in text
    # sensitivity 18/21, PPV 18/35 in the table
    assert f"{18 / 21:.3f}" in text and f"{18 / 35:.3f}" in text
    # class counts and prevalence
    assert '<td class="l">normal, benign</td><td>57</td>' in text
    assert '<td class="l">malignant (positive)</td><td>21</td>' in text
    assert '<td class="l">prevalence of malignant</td><td>26.9%</td>' in text
    assert "val: 78 images (normal, benign 57, malignant 21); prevalence of malignant 26.9%" in text


def test_report_says_a_fixed_threshold_was_not_tuned():
    y, p = _breast_like()
    text = build_report(title="b", task="binary", class_names=["normal, benign", "malignant"],
                        splits={"val": {"y_true": y, "probs": p}}, threshold=0.5, threshold_rule="0.5")
    assert "fixed threshold 0.5 (not tuned)" in text and "validation split by" not in text
    unknown = build_report(title="b", task="binary", class_names=["a", "b"], splits={"val": {"y_true": y, "probs": p}},
                           threshold=0.5)
    assert "threshold 0.5 (rule not recorded)" in unknown


def test_confusion_row_percentages():
    from medsight.report import row_percentages

    pct = row_percentages([[40, 17], [3, 18]])
    np.testing.assert_allclose(pct, [[100 * 40 / 57, 100 * 17 / 57], [100 * 3 / 21, 100 * 18 / 21]])
    empty = row_percentages([[0, 0], [2, 2]])
    assert np.isnan(empty[0]).all() and empty[1].tolist() == [50.0, 50.0]


def test_history_panels_keep_scales_apart():
    from medsight.report import history_panels

    hist = [{"epoch": e, "train_loss": 0.6 - e / 20, "val_loss": 0.7, "val_auc": 0.7 + e / 50,
             "val_sensitivity": 0.5, "lr": 1e-3, "seconds": 7.0 + e} for e in range(1, 6)]
    panels = history_panels(hist)
    assert panels[0] == (["train_loss", "val_loss"], "loss", None)
    assert panels[1] == (["val_auc", "val_sensitivity"], "metric (validation)", (0, 1.02))
    assert panels[2] == (["seconds"], "seconds per epoch", None)
    assert len(panels) == 3  # lr drawn nowhere
    assert len(history_panels([{"epoch": 1, "train_loss": 1.0}])) == 2  # no seconds recorded: no third panel


def test_one_class_model_is_warned_and_undefined_metrics_explained():
    y = np.array([0] * 15 + [1] * 5)
    p = np.full(20, 0.1)  # never says malignant
    text = build_report(title="b", task="binary", class_names=["normal, benign", "malignant"],
                        splits={"test": {"y_true": y, "probs": p}}, threshold=0.5, threshold_rule="0.5")
    assert ("WARNING: on the test split the model predicts one class only (normal, benign) for all 20 cases"
            in text)
    assert "test: PPV (malignant) undefined: no case predicted malignant" in text
    assert 'undefined <span class="ci">(no case predicted malignant)</span>' in text


def test_gallery_cards_show_image_overlay_and_colour_bar_and_ood_section():
    rng = np.random.default_rng(0)
    y, p = _breast_like()
    items = [{"image": rng.random((1, 28, 28)), "heatmap": rng.random((28, 28)), "caption": f"case {i}",
              "correct": i == 0} for i in range(2)]
    none = build_report(title="b", task="binary", class_names=["a", "b"], splits={"val": {"y_true": y, "probs": p}},
                        gallery=items)
    pics = _check_self_contained(none)
    card = Image.open(io.BytesIO(base64.b64decode(pics.imgs[-1].split(",", 1)[1])))
    assert card.size[0] > 1.6 * card.size[1]  # image, overlay and bar side by side
    assert "Correct (1)" in none and "Wrong (1)" in none
    assert "Not available: this report was given no out-of-distribution results" in none
    flagged = build_report(title="b", task="binary", class_names=["a", "b"], splits={"val": {"y_true": y, "probs": p}},
                           ood_flags={"test": {"flagged": [{"case": "test-12", "score": 5.25}], "n": 156,
                                               "threshold": 3.1}})
    assert "test: 1 case(s) flagged of 156 (score above 3.100)" in flagged
    assert '<td class="l">test-12</td><td>5.250</td>' in flagged


def test_reliability_draws_identical_curves_once():
    from medsight.report import _same_curve

    y, p = _breast_like()
    rc = M.reliability_curve("binary", y, p)
    assert _same_curve(rc, dict(rc)) and not _same_curve(rc, M.reliability_curve("binary", y, p * 0.9))
    assert sum(rc["count"]) == 78 and rc["count"][1] == 40  # 40 cases at p = 0.1 in bin [0.067, 0.133)
