"""End to end on the real BreastMNIST release: train, write a bundle, reload it, predict the same probabilities."""

import csv
import json

import numpy as np
import torch

from medsight.bundle import load_bundle
from medsight.config import load_config
from medsight.evaluate import split_logits
from medsight.pipeline import run_training


def test_train_bundle_reload_same_probabilities(tmp_path, breast):
    cfg = load_config(None, {"data.name": "breastmnist", "model.name": "simple_cnn", "train.epochs": 2,
                             "train.batch_size": 32, "train.seed": 0})
    out, result, metrics = run_training(cfg, tmp_path / "run", data=breast)
    assert len(result.history) == 2 and 1 <= result.best_epoch <= 2
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["task"] == "binary" and meta["classes"] == ["normal, benign", "malignant"]  # positive class at 1
    assert meta["input"] == {"spatial_dims": 2, "channels": 1, "size": [28, 28]}
    assert meta["preprocessing"]["range"] == [0.0, 255.0]
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and "val_auc" in rows[0]
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) >= {"val", "test"}
    assert 0.0 <= saved["test"]["auc"]["value"] <= 1.0

    # the in-memory best model and the reloaded bundle agree
    with torch.inference_mode():
        x = torch.as_tensor(breast.splits["test"].images).float() / 255
        p_mem = torch.sigmoid(result.model(x).reshape(-1)).numpy()
    bundle = load_bundle(out)
    p_disk = bundle.task.probabilities(split_logits(bundle, breast, "test")).numpy()
    np.testing.assert_allclose(p_mem, p_disk, atol=1e-6)
    assert saved["test"]["auc"]["value"] == metrics["test"]["auc"]["value"]


def test_resume_continues_to_same_weights(tmp_path, breast):
    base = {"data.name": "breastmnist", "model.name": "simple_cnn", "train.batch_size": 64, "train.seed": 3}
    full_dir = tmp_path / "full"
    run_training(load_config(None, {**base, "train.epochs": 3}), full_dir, data=breast, evaluate=False)
    part_dir = tmp_path / "part"
    # stop after 2 of 3 epochs (same schedule), then resume for the last one
    cfg3 = load_config(None, {**base, "train.epochs": 3})
    from medsight.train import fit

    class Stop(Exception):
        pass

    def stop_after_two(event, info):
        if event == "epoch" and info["epoch"] == 2:
            raise Stop

    try:
        fit(cfg3, breast, part_dir, callback=stop_after_two)
    except Stop:
        pass
    run_training(cfg3, part_dir, data=breast, resume=True, evaluate=False)
    a = torch.load(full_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(part_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_cli_resume_reuses_the_runs_config(tmp_path, tiny_npz):
    """`medsight train --out DIR --resume` continues DIR's own run (its config.yaml), not the defaults."""
    from medsight.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_npz), "--epochs", "2", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress"]) == 0
    import csv as _csv

    rows = list(_csv.DictReader((out / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert str(tiny_npz) in (out / "config.yaml").read_text()
