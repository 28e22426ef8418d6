"""OOD scores: formulas, threshold on validation, persistence, error paths, and the real-data separation of
PneumoniaMNIST (in-distribution) from BreastMNIST (OOD) by a PneumoniaMNIST model."""

import inspect
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from beyond_helpers import pneumonia, pneumonia_model, root_of
from medsight import ood
from medsight.errors import ConfigError, DataError


def test_energy_binary_uses_two_class_logits():
    z = torch.tensor([[-3.0], [0.0], [4.0]])
    expect = -torch.logsumexp(torch.cat([torch.zeros_like(z), z], 1), 1).numpy()
    np.testing.assert_allclose(ood.energy_score(z), expect, rtol=1e-6)
    np.testing.assert_allclose(ood.energy_score(z.reshape(-1)), expect, rtol=1e-6)  # (N,) accepted
    # confident predictions (large |z| with z > 0) have lower energy = less OOD
    assert ood.energy_score(z)[2] < ood.energy_score(z)[1]


def test_energy_multiclass_and_temperature():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(ood.energy_score(z), -torch.logsumexp(z, 1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ood.energy_score(z, 2.0), -2 * torch.logsumexp(z / 2, 1).numpy(), rtol=1e-6)
    # multilabel: per-output two-class energies, summed
    per = ood.energy_score(z, task="multilabel")
    np.testing.assert_allclose(per, sum(ood.energy_score(z[:, k:k + 1]) for k in range(3)), rtol=1e-6)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        ood.energy_score(z, 0)
    with pytest.raises(ConfigError, match="unknown task 'survival'"):
        ood.energy_score(z, task="survival")
    with pytest.raises(DataError, match="logits must have shape"):
        ood.energy_score(torch.zeros(2, 2, 2))


def test_msp():
    z = torch.tensor([[10.0, 0.0], [0.0, 0.0]])
    s = ood.msp_score(z)
    assert s[0] < 1e-3 and s[1] == pytest.approx(0.5)
    assert ood.msp_score(torch.tensor([[0.0]]))[0] == pytest.approx(0.5)


def test_threshold_and_flags():
    s = np.arange(101, dtype=float)
    assert ood.fit_ood_threshold(s, 0.95) == pytest.approx(95.0)
    assert ood.ood_flags([94, 95, 96], 95.0).tolist() == [False, False, True]
    with pytest.raises(ConfigError, match=r"quantile must be in \(0, 1\)"):
        ood.fit_ood_threshold(s, 1.0)
    with pytest.raises(DataError, match="no validation scores"):
        ood.fit_ood_threshold([], 0.9)
    with pytest.raises(DataError, match="NaN"):
        ood.fit_ood_threshold([1.0, float("nan")])
    with pytest.raises(ConfigError, match="threshold must be a finite number"):
        ood.ood_flags([1.0], None)
    with pytest.raises(ConfigError, match="threshold must be a finite number"):
        ood.ood_flags([1.0], float("inf"))


def test_mahalanobis_formula_on_known_gaussians():
    state = {"means": np.array([[0.0, 0.0], [10.0, 0.0]]), "precision": np.diag([1.0, 0.25])}
    d = ood.mahalanobis_from_features(np.array([[0.0, 2.0], [9.0, 0.0], [5.0, 0.0]]), state)
    np.testing.assert_allclose(d, [1.0, 1.0, 25.0])
    with pytest.raises(DataError, match="do not match the fitted Mahalanobis state"):
        ood.mahalanobis_from_features(np.zeros((2, 3)), state)


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))


def test_fit_mahalanobis_hooks_the_last_linear_and_errors():
    m = _tiny()
    x = torch.rand(30, 1, 4, 4)
    y = np.arange(30) % 2
    st = ood.fit_mahalanobis(m, x, y)
    assert st["layer"] == "3" and st["means"].shape == (2, 8) and st["precision"].shape == (8, 8)
    assert st["classes"].tolist() == [0, 1]
    one = ood.fit_mahalanobis(m, x, None)
    assert one["means"].shape == (1, 8)
    multi = ood.fit_mahalanobis(m, x, np.eye(3)[np.arange(30) % 3])  # multilabel -> class-agnostic
    assert multi["means"].shape == (1, 8)
    s = ood.ood_scores(m, x, state=st)
    assert s.shape == (30,) and np.isfinite(s).all()
    with pytest.raises(DataError, match="30 images but 29 labels"):
        ood.fit_mahalanobis(m, x, y[:-1])
    with pytest.raises(DataError, match="at least 2 training images"):
        ood.fit_mahalanobis(m, x[:1], y[:1])
    with pytest.raises(ConfigError, match="has no final nn.Linear"):
        ood.fit_mahalanobis(nn.Sequential(nn.Conv2d(1, 1, 3)), x, y)
    with pytest.raises(ConfigError, match="unknown OOD score 'knn'"):
        ood.ood_scores(m, x, score="knn")
    with pytest.raises(ConfigError, match="needs a fitted state"):
        ood.ood_scores(m, x)
    with pytest.raises(ConfigError, match="no layer 'fc'"):
        ood.logits_and_features(m, x, layer="fc")
    with pytest.raises(ConfigError, match="batch_size"):
        ood.logits_and_features(m, x, batch_size=0)
    with pytest.raises(DataError, match="no images"):
        ood.logits_and_features(m, x[:0])
    with pytest.raises(ConfigError, match="unknown OOD score"):
        ood.fit_ood_detector(m, x, y, x, score="odin")


def test_detector_persistence(tmp_path):
    m = _tiny()
    x = torch.rand(40, 1, 4, 4)
    y = np.arange(40) % 2
    det = ood.fit_ood_detector(m, x[:30], y[:30], x[30:])
    ref = ood.detect(m, x, det)
    p = ood.save_ood(tmp_path / "ood.npz", det)
    back = ood.load_ood(p)
    np.testing.assert_allclose(ood.detect(m, x, back)["ood_score"], ref["ood_score"])
    js = json.loads(json.dumps(ood.detector_to_json(det)))  # bundle.json-compatible
    np.testing.assert_allclose(ood.detect(m, x, ood.detector_from_json(js))["ood_score"], ref["ood_score"])
    assert ref["ood_flag"].dtype == bool and ref["logits"].shape == (40, 1)
    energy = ood.fit_ood_detector(m, x[:30], y[:30], x[30:], score="energy")
    assert "means" not in energy and np.isfinite(energy["threshold"])
    with pytest.raises(DataError, match="not an OOD detector"):
        ood.detector_from_json({"score": "energy"})
    with pytest.raises(DataError, match="unknown OOD score in detector"):
        ood.detector_from_json({"format": ood.FORMAT, "score": "x"})
    with pytest.raises(DataError, match="not found"):
        ood.load_ood(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read OOD detector"):
        ood.load_ood(tmp_path / "bad.npz")


def test_default_score_is_mahalanobis():
    for fn in (ood.ood_scores, ood.fit_ood_detector):
        assert inspect.signature(fn).parameters["score"].default == "mahalanobis"


def test_pneumonia_model_flags_breast_ultrasound(medmnist_dir):
    from medsight.data.sources import load_medmnist

    root = root_of(medmnist_dir)
    model, data = pneumonia_model(root), pneumonia(root)
    breast = load_medmnist("breastmnist", 28, root=root, download_missing=False)
    tr = data.splits["train"]
    det = ood.fit_ood_detector(model, tr.images, tr.labels, data.splits["val"].images)  # TRAIN fit, VAL threshold
    ind = ood.detect(model, data.splits["test"].images, det)
    out = ood.detect(model, breast.splits["test"].images, det)
    y = np.r_[np.zeros(len(ind["ood_score"])), np.ones(len(out["ood_score"]))]
    auroc = roc_auc_score(y, np.r_[ind["ood_score"], out["ood_score"]])
    assert auroc >= 0.95, auroc
    assert ind["ood_flag"].mean() < 0.15  # ~5 % false alarms by construction (95th percentile of val)
    assert out["ood_flag"].mean() > 0.9
    # the logit-based scores are much weaker here, which is why the default is Mahalanobis
    z_in, z_out = ind["logits"], out["logits"]
    energy_auroc = roc_auc_score(y, np.r_[ood.energy_score(z_in), ood.energy_score(z_out)])
    assert energy_auroc < auroc


def test_with_features_gives_logits_and_the_mahalanobis_features():
    m = _tiny().eval()
    x = torch.rand(5, 1, 4, 4)
    logits, feats = ood.WithFeatures(m)(x)
    ref_logits, ref_feats = ood.logits_and_features(m, x)
    assert torch.allclose(logits, ref_logits) and torch.allclose(feats, ref_feats)
    with pytest.raises(ConfigError, match="no layer 'head'"):
        ood.WithFeatures(m, layer="head")
