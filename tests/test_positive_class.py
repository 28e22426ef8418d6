"""The positive class of a binary task: chosen once at load time, always class index 1, named everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medsight.config import load_config
from medsight.data.medmnist import INFO, POSITIVE_CLASS
from medsight.data.sources import load_dataset, medmnist_path
from medsight.errors import ConfigError


def _raw_labels(medmnist_dir, name, split):
    with np.load(medmnist_path(name, 28, medmnist_dir, download_missing=False)) as z:
        return z[f"{split}_labels"].reshape(-1).astype(np.int64)


def test_every_binary_medmnist_set_has_a_positive_class():
    binary = {n for n, i in INFO.items() if i.task == "binary"}
    assert binary == set(POSITIVE_CLASS)
    for name in binary:
        assert INFO[name].positive_class in INFO[name].classes
    assert INFO["breastmnist"].positive_class == "malignant"
    assert INFO["pneumoniamnist"].positive_class == "pneumonia"
    assert INFO["adrenalmnist3d"].positive_class == "hyperplasia"
    assert INFO["pathmnist"].positive_class is None


def test_breastmnist_malignant_is_class_1(medmnist_dir):
    ds = load_dataset("breastmnist", root=medmnist_dir, download=False)
    assert ds.classes == ["normal, benign", "malignant"] and ds.positive_class == "malignant"
    assert ds.positive_class_source == "MedMNIST default for breastmnist"
    raw = _raw_labels(medmnist_dir, "breastmnist", "test")  # 0 = malignant in the official file
    assert int((raw == 0).sum()) == 42
    np.testing.assert_array_equal(ds.splits["test"].labels, 1 - raw)
    assert int(ds.splits["test"].labels.sum()) == 42


def test_pneumonia_keeps_its_order_and_override_by_name_or_index(medmnist_dir):
    ds = load_dataset("pneumoniamnist", root=medmnist_dir, download=False)
    assert ds.classes == ["normal", "pneumonia"]
    np.testing.assert_array_equal(ds.splits["val"].labels, _raw_labels(medmnist_dir, "pneumoniamnist", "val"))
    by_name = load_dataset("breastmnist", root=medmnist_dir, download=False, positive_class="normal, benign")
    by_index = load_dataset("breastmnist", root=medmnist_dir, download=False, positive_class=1)
    for ds in (by_name, by_index):  # index 1 of the file's own order is "normal, benign"
        assert ds.classes == ["malignant", "normal, benign"]
        assert ds.positive_class_source == "set by data.positive_class"
        np.testing.assert_array_equal(ds.splits["test"].labels, _raw_labels(medmnist_dir, "breastmnist", "test"))


def test_bad_positive_class_lists_the_classes(medmnist_dir):
    with pytest.raises(ConfigError, match=r"'tumour'.*'malignant' \(or 0\).*'normal, benign' \(or 1\)"):
        load_dataset("breastmnist", root=medmnist_dir, download=False, positive_class="tumour")


def test_positive_class_on_multiclass_is_refused(tmp_path):
    from tests.conftest import make_npz

    p = make_npz(tmp_path / "three.npz", classes=3)
    with pytest.raises(ConfigError, match="binary tasks; three is a multiclass task"):
        load_dataset(str(p), positive_class="2")


def _folder(tmp_path, names=("benign", "cancer"), n=12):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for c in names:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(root / c / f"{c}_{i}.png")
    return root


def test_user_folder_default_is_stated_and_can_be_chosen(tmp_path):
    root = _folder(tmp_path, names=("cancer", "benign"))
    ds = load_dataset(str(root), size=16)
    assert ds.classes == ["benign", "cancer"]  # sorted; the second is positive by default, and that is said
    assert ds.positive_class_source.startswith("not set: the second class in sorted order")
    ds2 = load_dataset(str(root), size=16, positive_class="benign")
    assert ds2.classes == ["cancer", "benign"] and ds2.positive_class == "benign"
    for s in ds.splits:  # the same files, labels flipped
        np.testing.assert_array_equal(ds2.splits[s].labels, 1 - ds.splits[s].labels)
        assert ds2.splits[s].ids == ds.splits[s].ids


def test_breastmnist_training_metrics_are_for_malignant(tmp_path, breast):
    from medsight.evaluate import evaluate_split
    from medsight.bundle import load_bundle
    from medsight.pipeline import run_training

    cfg = load_config(None, {"data.name": "breastmnist", "train.epochs": 1, "train.n_boot": 20})
    out, _, metrics = run_training(cfg, tmp_path / "b", data=breast)
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["classes"] == ["normal, benign", "malignant"]
    assert meta["threshold_rule"] == "youden"  # the default rule, chosen on val
    stored = json.loads((out / "metrics.json").read_text())
    for split, n_malignant in (("val", 21), ("test", 42)):
        (tn, fp), (fn, tp) = stored[split]["confusion_matrix"]["value"]
        assert tp + fn == n_malignant  # row 1 of the matrix = the malignant cases
        assert stored[split]["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
        assert stored[split]["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    m = evaluate_split(load_bundle(out), breast, "test", n_boot=0)
    assert m["sensitivity"]["value"] == pytest.approx(stored["test"]["sensitivity"]["value"])


def test_align_to_an_older_bundles_class_order(medmnist_dir):
    from medsight.errors import DataError

    ds = load_dataset("breastmnist", root=medmnist_dir, download=False)
    ds.align_to(["malignant", "normal, benign"])  # a bundle trained before the positive class moved to index 1
    assert ds.classes == ["malignant", "normal, benign"] and ds.positive_class_source == "as the model was trained"
    np.testing.assert_array_equal(ds.splits["test"].labels, _raw_labels(medmnist_dir, "breastmnist", "test"))
    with pytest.raises(DataError, match="the model expects"):
        ds.align_to(["benign", "cancer"])


def test_malignant_is_named_by_predict_the_service_and_metrics(served_bundle, breast_files, tmp_path):
    """BreastMNIST: metrics.json, `predict` rows, /v1/model and /v1/predict all name malignant as the positive
    class, and the sensitivity in metrics.json is TP / (TP + FN) of malignant cases in its confusion matrix."""
    import csv

    from fastapi.testclient import TestClient

    from medsight.cli import main
    from medsight.serve.app import create_app

    m = json.loads((served_bundle / "metrics.json").read_text())["test"]
    assert m["positive_class"] == "malignant"
    cm = np.asarray(m["confusion_matrix"]["value"])  # rows: true [normal/benign, malignant], columns: predicted
    tp, fn = cm[1, 1], cm[1, 0]
    assert tp + fn == 42
    assert m["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"]["value"] == pytest.approx(cm[0, 0] / cm[0].sum())

    out = tmp_path / "p.csv"
    assert main(["predict", str(served_bundle), str(breast_files["png"][0]), "--out", str(out)]) == 0
    row = next(csv.DictReader(out.open()))
    assert row["positive_class"] == "malignant" and "p_malignant" in row

    client = TestClient(create_app(served_bundle))
    info = client.get("/v1/model").json()
    assert info["positive_class"] == "malignant" and info["classes"][1] == "malignant"
    assert "fixed threshold 0.5" in info["decision_rule"]  # the served_bundle fixture fixes 0.5: said as such
    png = breast_files["png"][0]
    r = client.post("/v1/predict", files={"file": (png.name, png.read_bytes(), "image/png")}).json()
    assert r["positive_class"] == "malignant"
    assert (r["predicted"] == "malignant") == (r["probabilities"]["malignant"] >= r["threshold"])
