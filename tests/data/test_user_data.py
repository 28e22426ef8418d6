"""Training from user data: a class-per-folder PNG tree and a DICOM manifest with patient ids, both written from
the real BreastMNIST release; and de-identified DICOMs train and predict identically."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from medsight.bundle import load_bundle
from medsight.config import load_config
from medsight.data.deid import deidentify
from medsight.data.sources import load_dataset
from medsight.errors import DataError
from medsight.evaluate import split_logits
from medsight.pipeline import run_training
from tests.data.conftest import make_dicom, save_png


def _cfg(name, **kw):
    return load_config(None, {"data.name": str(name), "model.name": "simple_cnn", "train.epochs": 1,
                              "train.batch_size": 64, **kw})


@pytest.fixture(scope="module")
def breast_small(breast):
    """120 train / 40 val / 40 test images of the real release (enough to exercise every path quickly)."""
    out = {}
    for s, n in (("train", 120), ("val", 40), ("test", 40)):
        sp = breast.splits[s]
        out[s] = (sp.images[:n, 0], sp.labels[:n])
    return out


def test_class_folder_png_tree_trains(tmp_path, breast_small, breast):
    root = tmp_path / "tree"
    for s, (imgs, labels) in breast_small.items():
        for i, (img, y) in enumerate(zip(imgs, labels)):
            d = root / s / breast.classes[y].replace(",", "").replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            save_png(d / f"{i:04d}.png", img)
    ds = load_dataset(str(root), size=28)
    assert ds.task == "binary" and len(ds.classes) == 2
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 120, "val": 40, "test": 40}
    # the PNG path reproduces the archive's pixels exactly: 8-bit PNGs at their own size are cached as uint8
    order = np.argsort(ds.splits["test"].ids)
    assert ds.splits["train"].images.dtype == np.uint8
    assert np.array_equal(np.sort(ds.splits["train"].images.reshape(-1)), np.sort(breast_small["train"][0].reshape(-1)))
    out, result, metrics = run_training(_cfg(root), tmp_path / "run", data=ds)
    assert load_bundle(out).meta.preprocessing.source["kind"] == "folder"
    assert "auc" in metrics["test"] and len(order) == 40


def _write_dicom_manifest(root, breast_small, with_split=False):
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    k = 0
    for s, (imgs, labels) in breast_small.items():
        for img, y in zip(imgs, labels):
            pid = f"P{k // 2:04d}"  # two images per patient
            path = root / f"img{k:04d}.dcm"
            make_dicom(path, img, modality="US", extra={"PatientID": pid, "PatientName": f"Name^{pid}",
                                                          "StudyDate": "20200101"},
                       study_uid=f"1.2.826.0.1.3680043.8.498.{1000 + k // 2}")
            rows.append({"path": path.name, "label": int(y), "patient_id": pid, **({"split": s} if with_split else {})})
            k += 1
    man = root / "manifest.csv"
    with open(man, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return man


def test_dicom_manifest_with_patient_ids_splits_by_patient_and_trains(tmp_path, breast_small):
    man = _write_dicom_manifest(tmp_path / "dcm", breast_small)
    ds = load_dataset(str(man), size=28)
    assert set(ds.splits) == {"train", "val", "test"}
    seen = {}
    for s, sp in ds.splits.items():
        for p in sp.patients:
            assert seen.setdefault(p, s) == s, "a patient spans two splits"
    assert all(p and "P0" not in p for sp in ds.splits.values() for p in sp.patients)  # hashed, not raw
    out, _, metrics = run_training(_cfg(man), tmp_path / "run", data=ds)
    assert 0 <= metrics["test"]["auc"]["value"] <= 1


def test_manifest_leakage_is_refused(tmp_path, breast_small):
    man = _write_dicom_manifest(tmp_path / "dcm", breast_small, with_split=True)
    rows = list(csv.DictReader(open(man)))
    rows[-1]["patient_id"] = rows[0]["patient_id"]  # a test image of a training patient
    with open(man, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(DataError, match="patient"):
        load_dataset(str(man), size=28)


def test_deidentified_dicoms_train_and_predict_identically(tmp_path, breast_small):
    man = _write_dicom_manifest(tmp_path / "dcm", breast_small, with_split=True)
    deid_dir = tmp_path / "deid"
    # ultrasound without BurnedInAnnotation is held back unless allowed; outputs get new names (mapping CSV)
    summary = deidentify(tmp_path / "dcm", deid_dir, secret="test", allow_burned_in=True, mapping_csv=tmp_path / "map.csv")
    assert summary["written"] == 200 and len(summary["burned_in"]) == 200
    with open(tmp_path / "map.csv", newline="") as fh:
        new_name = {r["original"]: r["new"] for r in csv.DictReader(fh) if r["kind"] == "file"}
    rows = list(csv.DictReader(open(man)))
    for r in rows:
        r["path"] = new_name[r["path"]]
    with open(deid_dir / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    a = load_dataset(str(man), size=28)
    b = load_dataset(str(deid_dir / "manifest.csv"), size=28)
    for s in a.splits:
        np.testing.assert_array_equal(a.splits[s].images, b.splits[s].images)
    ra = run_training(_cfg(man), tmp_path / "ra", data=a)[0]
    rb = run_training(_cfg(deid_dir / "manifest.csv"), tmp_path / "rb", data=b)[0]
    pa = split_logits(load_bundle(ra), a, "test")
    pb = split_logits(load_bundle(rb), b, "test")
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_user_data_errors(tmp_path):
    with pytest.raises(DataError, match="one sub-folder per class"):
        (tmp_path / "empty").mkdir()
        load_dataset(str(tmp_path / "empty"))
    bad = tmp_path / "m.csv"
    bad.write_text("file,diagnosis\na.png,1\n")
    with pytest.raises(DataError, match="column 'path'|'label'"):
        load_dataset(str(bad))
