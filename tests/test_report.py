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
