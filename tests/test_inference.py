"""The one loop that runs a model over images: batching, TTA, clinical input, features, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medsight.errors import ConfigError, DataError
from medsight.inference import combine_views, run_logits, run_model, tta_views


class _Tab(nn.Module):
    """``model(x, tab)``: a linear read-out of the image plus the clinical row, ending in a Linear (features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.ReLU())
        self.head = nn.Linear(5 + 2, 3)

    def forward(self, x, tab):
        return self.head(torch.cat([self.body(x), tab], dim=1))


def _images(n=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)


def test_batches_tta_and_features_match_a_hand_computation():
    model = _Tab().eval()
    x, tab = _images(), np.random.default_rng(1).normal(size=(7, 2)).astype(np.float32)
    out = run_model(model, x, tab=tab, tta_flip=[2], batch_size=3, features=True)
    xf, tt = torch.as_tensor(x).float() / 255, torch.as_tensor(tab)
    with torch.no_grad():
        want = (model(xf, tt) + model(xf.flip(3), tt)) / 2
        feats = (torch.cat([model.body(xf), tt], 1) + torch.cat([model.body(xf.flip(3)), tt], 1)) / 2
    torch.testing.assert_close(out.logits, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.features, feats, rtol=0, atol=1e-6)
    # numpy views follow the same rule as tensors (the ONNX backend uses them)
    views = list(tta_views(x.astype(np.float32), [1, 2]))
    assert len(views) == 3 and np.array_equal(views[1], x[:, :, ::-1, :]) and np.array_equal(views[2], x[:, :, :, ::-1])
    assert np.allclose(combine_views([np.ones(2), np.zeros(2)]), 0.5)


def test_transform_sees_each_float_batch_with_its_index():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1)).eval()
    seen = []

    def transform(x, bi):
        seen.append((bi, x.dtype, float(x.max())))
        return torch.zeros_like(x)

    z = run_logits(model, _images(), batch_size=4, transform=transform)
    assert [s[0] for s in seen] == [0, 1] and all(s[1] == torch.float32 and s[2] <= 1 for s in seen)
    torch.testing.assert_close(z, model(torch.zeros(7, 1, 8, 8)).detach())


def test_refusals_name_what_was_wrong():
    model = _Tab().eval()
    with pytest.raises(ConfigError, match="tta_flip axis 3 is not a spatial axis of a 2D image"):
        run_model(model, _images(), tab=np.zeros((7, 2)), tta_flip=[3])
    with pytest.raises(DataError, match=r"7 images but 5 clinical rows"):
        run_model(model, _images(), tab=np.zeros((5, 2)))
    with pytest.raises(DataError, match=r"images must have shape .* got \(7, 8, 8\)"):
        run_model(model, _images()[:, 0])
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        run_model(model, _images(), batch_size=0)
    with pytest.raises(ConfigError, match="no final nn.Linear"):
        run_model(nn.Sequential(nn.Flatten()), _images(), features=True)


def test_read_clinical_csv_refusals(tmp_path):
    from medsight.fusion import read_clinical_csv

    with pytest.raises(DataError, match="missing.csv: file not found"):
        read_clinical_csv(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,age\nx.png,3\n")
    with pytest.raises(DataError, match=r"bad.csv: needs a header with a 'path' column"):
        read_clinical_csv(bad)
    good = tmp_path / "good.csv"
    good.write_text("path,age\nx.png,3\n")
    assert read_clinical_csv(good) == {"x.png": {"age": "3"}}


def test_resume_without_a_checkpoint_and_argmax_operating_point(tmp_path):
    from medsight.config import load_config
    from medsight.errors import MedsightError
    from medsight.evaluate import rechoose_threshold
    from medsight.pipeline import load_data_for, run_training
    from tests.conftest import make_npz

    npz = make_npz(tmp_path / "d.npz", classes=3)
    cfg = load_config(None, {"data.name": str(npz), "train.epochs": 1, "train.n_boot": 0, "model.width": 0.25})
    with pytest.raises(MedsightError, match=r"--resume: no checkpoint in .*run/checkpoints"):
        run_training(cfg, tmp_path / "run", resume=True)
    out, _, _ = run_training(cfg, tmp_path / "run")
    from medsight.bundle import load_bundle

    with pytest.raises(MedsightError, match="multiclass and decides by argmax"):
        rechoose_threshold(load_bundle(out), load_data_for(cfg), "youden")
