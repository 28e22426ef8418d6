"""Temperature and operating point, chosen on validation through the task's own activation."""

import numpy as np
import pytest
import torch

from medsight import metrics as M
from medsight.calibration import choose_calibration, fit_temperature, nll
from medsight.errors import ConfigError, DataError
from medsight.tasks import Task


def _overconfident(task_name: str, n=3000, k=3, seed=0):
    rng = np.random.default_rng(seed)
    if task_name == "binary":
        z = rng.normal(0, 1.5, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
        return Task("binary", 2), 4.0 * z[:, None], y
    if task_name == "multilabel":
        z = rng.normal(0, 1.5, (n, k))
        y = (rng.random((n, k)) < 1 / (1 + np.exp(-z))).astype(int)
        return Task("multilabel", k), 4.0 * z, y
    if task_name == "ordinal":
        # cumulative logits P(y > j) = sigmoid(s - c_j), labels drawn from the implied class probabilities
        s = rng.normal(0, 1.5, n)
        cuts = np.array([-1.0, 1.0])
        cum = 1 / (1 + np.exp(-(s[:, None] - cuts[None])))
        u = rng.random(n)
        y = (u[:, None] < cum).sum(1)
        return Task("ordinal", 3), 4.0 * (s[:, None] - cuts[None]), y
    z = rng.normal(0, 1.5, (n, k))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return Task("multiclass", k), 4.0 * z, y


@pytest.mark.parametrize("name", ["binary", "multiclass", "multilabel", "ordinal"])
def test_temperature_fixes_overconfidence_for_every_task(name):
    task, logits, y = _overconfident(name)
    t = fit_temperature(task, logits, y)
    assert 3.0 < t < 5.5, t
    before = M.expected_calibration_error(task.name, y, task.probabilities(torch.as_tensor(logits, dtype=torch.float32)).numpy())
    after = M.expected_calibration_error(task.name, y, task.probabilities(torch.as_tensor(logits, dtype=torch.float32), t).numpy())
    assert after < before / 2, (before, after)
    assert nll(task, logits, y, t) < nll(task, logits, y, 1.0)


def test_underconfident_gets_temperature_below_one():
    rng = np.random.default_rng(8)
    z = rng.normal(0, 2, 2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-z))).astype(int)
    assert fit_temperature(Task("binary", 2), z[:, None] / 3, y) < 0.5


def test_choose_calibration_states_rule_and_threshold():
    task, logits, y = _overconfident("binary", n=600)
    c = choose_calibration(task, logits, y, operating_point="youden")
    assert c["threshold_rule"] == "youden"
    probs = task.probabilities(torch.as_tensor(logits, dtype=torch.float32), c["temperature"]).numpy()
    assert c["threshold"] == pytest.approx(M.choose_threshold(y, probs, "youden"))
    fixed = choose_calibration(task, logits, y, operating_point="0.5", calibrate=False)
    assert fixed["threshold"] == 0.5 and fixed["temperature"] == 1.0 and fixed["threshold_rule"] == "0.5"
    mc, lm, ym = _overconfident("multiclass", n=300)
    assert choose_calibration(mc, lm, ym)["threshold"] is None


def test_calibration_validation_errors():
    task = Task("binary", 2)
    y = np.array([0, 1] * 10)
    with pytest.raises(DataError, match=r"shape \(N, 1\)"):
        fit_temperature(task, np.zeros((20, 3)), y)
    with pytest.raises(DataError, match="20 labels but 10 logits"):
        fit_temperature(task, np.zeros((10, 1)), y)
    with pytest.raises(DataError, match="ints in 0..2"):
        fit_temperature(Task("multiclass", 3), np.zeros((20, 3)), np.full(20, 5))
    with pytest.raises(ConfigError, match="bad operating point"):
        choose_calibration(task, np.zeros((20, 1)), y, operating_point="sometimes")
