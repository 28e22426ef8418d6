"""Distribution-shift battery: every corruption (2D and 3D), determinism, error paths, and a real PneumoniaMNIST
model evaluated under shift."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from beyond_helpers import pneumonia, pneumonia_model, root_of
from medsight.errors import ConfigError, DataError
from medsight.shift import (CORRUPTIONS, corrupt, corruptions_for, evaluate_shift, plot_shift, shift_table_html)
from medsight.tasks import Task

CASES = [(n, d) for d in (2, 3) for n in corruptions_for(d)]


def _structured(dims, b=3, side=16):
    """Smooth images with an edge, so every corruption changes them measurably."""
    g = torch.linspace(0, 1, side)
    if dims == 2:
        x = (g[:, None] * 0.5 + 0.25 + 0.2 * (g[None, :] > 0.5)).expand(b, 1, side, side)
    else:
        x = (g[:, None, None] * 0.5 + 0.25 + 0.2 * (g[None, None, :] > 0.5)).expand(b, 1, side, side, side)
    return x.clone().clamp(0, 1)


def test_registry_lists_the_battery():
    assert set(CORRUPTIONS) == {"gaussian_noise", "gaussian_blur", "contrast", "gamma", "resolution_loss", "jpeg",
                                "bias_field", "intensity_shift"}
    assert "jpeg" in corruptions_for(2) and "jpeg" not in corruptions_for(3)
    assert all(len(c.levels) == 5 for c in CORRUPTIONS.values())


@pytest.mark.parametrize("name,dims", CASES)
def test_corruption_shape_range_determinism_and_severity(name, dims):
    x = _structured(dims)
    y1 = corrupt(x, name, 1, seed=0)
    y5 = corrupt(x, name, 5, seed=0)
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert float(y5.min()) >= 0 and float(y5.max()) <= 1
    assert torch.equal(corrupt(x, name, 3, seed=7), corrupt(x, name, 3, seed=7))
    d1, d5 = (y1 - x).abs().mean(), (y5 - x).abs().mean()
    assert d5 > d1 > 0, (name, float(d1), float(d5))
    assert torch.equal(x, _structured(dims))  # input untouched


def test_random_corruptions_depend_on_the_seed():
    x = _structured(2)
    for name in ("gaussian_noise", "bias_field"):
        assert not torch.equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=1))


def test_fixed_corruptions_are_what_they_say():
    x = torch.full((2, 1, 12, 12), 0.5)
    assert torch.allclose(corrupt(x, "gaussian_blur", 5), x, atol=1e-6)  # blur keeps a constant image
    assert torch.allclose(corrupt(x, "resolution_loss", 5), x, atol=1e-6)
    xr = torch.rand(2, 1, 12, 12)
    c = corrupt(xr, "contrast", 5)
    assert torch.allclose(c.mean((1, 2, 3)), xr.mean((1, 2, 3)), atol=1e-5)
    assert torch.allclose(c.std((1, 2, 3)), xr.std((1, 2, 3)) * 0.2, atol=1e-4)
    s = corrupt(x, "intensity_shift", 5, seed=3)
    assert torch.allclose((s - x).abs(), torch.full_like(x, 0.2), atol=1e-6)
    assert torch.allclose(corrupt(x, "gamma", 4), x ** 2.0)


def test_jpeg_handles_rgb():
    x = torch.rand(2, 3, 16, 16)
    y = corrupt(x, "jpeg", 5)
    assert y.shape == x.shape and (y - x).abs().mean() > 0


@pytest.mark.parametrize("bad", [0, 6, 2.5, True, "3"])
def test_bad_severity(bad):
    with pytest.raises(ConfigError, match="severity must be an integer 1..5"):
        corrupt(torch.rand(1, 1, 8, 8), "gamma", bad)


def test_corrupt_errors():
    with pytest.raises(ConfigError, match="unknown corruption 'snow'; allowed: bias_field"):
        corrupt(torch.rand(1, 1, 8, 8), "snow", 1)
    with pytest.raises(ConfigError, match="jpeg.*2D images, not 3D"):
        corrupt(torch.rand(1, 1, 8, 8, 8), "jpeg", 1)
    with pytest.raises(DataError, match="torch.Tensor"):
        corrupt(np.zeros((1, 1, 8, 8)), "gamma", 1)
    with pytest.raises(DataError, match="float images in"):
        corrupt(torch.zeros((1, 1, 8, 8), dtype=torch.uint8), "gamma", 1)
    with pytest.raises(DataError, match=r"\(B, C, H, W\)"):
        corrupt(torch.rand(8, 8), "gamma", 1)


class _Mean(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return (x.mean(dim=tuple(range(1, x.dim()))) - 0.5)[:, None] * self.w


def test_evaluate_shift_structure_3d():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    x = (rng.random((40, 1, 10, 10, 10)) * 0.3 + 0.35 * y[:, None, None, None, None]) * 255
    x = x.astype(np.uint8)
    r = evaluate_shift(_Mean(), "binary", x, y, severities=(1, 5), batch_size=16)
    assert set(r["corruptions"]) == set(corruptions_for(3)) and r["primary"] == "auc"
    assert [row["severity"] for row in r["corruptions"]["gamma"]] == [1, 5]
    row = r["corruptions"]["intensity_shift"][1]
    assert row["drop"]["auc"] == pytest.approx(r["clean"]["auc"] - row["metrics"]["auc"])
    json.dumps(r)  # JSON-able as is


@pytest.mark.parametrize("case", range(13), ids=['40-images-but-39-labels', 'no-images', 'shape', 'batch-size', 'jpeg', 'unknown-corruption', 'no-corruptions', 'no-severities', 'severity', 'unknown-task', 'task-must-be', 'not-a-shift-result', 'not-a-shift-result-2'])
def test_evaluate_shift_refusals(case):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    x = (rng.random((40, 1, 10, 10, 10)) * 0.3 + 0.35 * y[:, None, None, None, None]) * 255
    x = x.astype(np.uint8)
    m = _Mean()
    refusals = [
        (DataError, "40 images but 39 labels",
         lambda: evaluate_shift(m, "binary", x, y[:-1])),
        (DataError, "no images",
         lambda: evaluate_shift(m, "binary", x[:0], y[:0])),
        (DataError, "shape",
         lambda: evaluate_shift(m, "binary", x[:, 0, 0], y)),
        (ConfigError, "batch_size",
         lambda: evaluate_shift(m, "binary", x, y, batch_size=0)),
        (ConfigError, "jpeg",
         lambda: evaluate_shift(m, "binary", x, y, corruptions=["jpeg"])),
        (ConfigError, "unknown corruption",
         lambda: evaluate_shift(m, "binary", x, y, corruptions=["fog"])),
        (ConfigError, "no corruptions",
         lambda: evaluate_shift(m, "binary", x, y, corruptions=[])),
        (ConfigError, "no severities",
         lambda: evaluate_shift(m, "binary", x, y, severities=())),
        (ConfigError, "severity",
         lambda: evaluate_shift(m, "binary", x, y, severities=(0,))),
        (ConfigError, "unknown task",
         lambda: evaluate_shift(m, "regression", x, y)),
        (ConfigError, "task must be",
         lambda: evaluate_shift(m, 3, x, y)),
        (DataError, "not a shift result",
         lambda: plot_shift({"clean": {}})),
        (DataError, "not a shift result",
         lambda: shift_table_html([])),
    ]
    error, message, call = refusals[case]
    with pytest.raises(error, match=message):
        call()


def test_pneumonia_model_under_shift(medmnist_dir):
    root = root_of(medmnist_dir)
    model, data = pneumonia_model(root), pneumonia(root)
    test = data.splits["test"]
    r = evaluate_shift(model, Task("binary", 2), test.images, test.labels, severities=(1, 3, 5), seed=0)
    assert r["clean"]["auc"] > 0.85 and r["n"] == len(test)
    assert set(r["corruptions"]) == set(corruptions_for(2))
    # severity 5 hurts more than severity 1 on average, and the worst corruption costs real AUC
    s1 = np.mean([rows[0]["metrics"]["auc"] for rows in r["corruptions"].values()])
    s5 = np.mean([rows[-1]["metrics"]["auc"] for rows in r["corruptions"].values()])
    assert s5 < s1
    assert max(rows[-1]["drop"]["auc"] for rows in r["corruptions"].values()) > 0.05
    assert r["mean_drop"] == pytest.approx(r["clean"]["auc"] - r["mean_corrupted"])
    # deterministic for a given seed; TTA runs
    r2 = evaluate_shift(model, "binary", test.images, test.labels, corruptions=["gaussian_noise"], severities=(5,))
    assert r2["corruptions"]["gaussian_noise"][0]["metrics"] == r["corruptions"]["gaussian_noise"][-1]["metrics"]
    r3 = evaluate_shift(model, "binary", test.images[:200], test.labels[:200], corruptions=["gamma"],
                        severities=(3,), tta_flip=[2])
    assert r3["tta_flip"] == [2]
    # the clean row with TTA is the metric of the averaged logits of the image and its left-right mirror
    from medsight.metrics import compute_metrics
    from medsight.inference import to_float

    x = to_float(torch.as_tensor(test.images[:200]))
    with torch.no_grad():
        z = (model(x) + model(x.flip(-1))) / 2
    want = compute_metrics("binary", test.labels[:200], torch.sigmoid(z.reshape(-1)).numpy())["auc"]
    assert r3["clean"]["auc"] == pytest.approx(want, abs=1e-9)
    png = plot_shift(r)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = shift_table_html(r)
    assert table.startswith('<table class="medsight-shift">') and table.count("<tr>") == 1 + len(r["corruptions"])
    assert "jpeg" in table and "severity 5" in table
