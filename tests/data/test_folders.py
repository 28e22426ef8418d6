"""Class folders, CSV manifests, the preprocessing recipe and load_records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsight.data.folders import load_records, read_manifest, scan_class_folders
from medsight.data.preprocess import apply_recipe, load_one, make_recipe, preprocess_array
from medsight.data.io import read_image
from medsight.errors import DataError


def _png(path, value, size=(12, 10), rgb=False, dtype=np.uint8):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full(size + ((3,) if rgb else ()), value, dtype)
    a[0, 0] = 0
    Image.fromarray(a).save(path)
    return path


@pytest.fixture
def class_tree(tmp_path):
    root = tmp_path / "data"
    for cls, v in (("normal", 50), ("pneumonia", 200)):
        for i in range(3):
            _png(root / cls / f"{i}.png", v + i)
    _png(root / "normal" / "nested" / "deep.png", 60)
    (root / "normal" / "notes.txt").write_text("ignored")
    return root


def test_scan_class_folders(class_tree):
    recs = scan_class_folders(class_tree)
    assert len(recs) == 7
    assert {r["label"] for r in recs} == {"normal", "pneumonia"}
    assert all(r["split"] is None for r in recs)
    assert any(r["path"].endswith("deep.png") and r["label"] == "normal" for r in recs)


def test_scan_split_folders(tmp_path, make_dicom_file):
    root = tmp_path / "d"
    for split in ("train", "val", "test"):
        for cls in ("a", "b"):
            _png(root / split / cls / "x.png", 10)
    # a DICOM series folder below a class folder is one sample
    series = root / "train" / "a" / "case1"
    series.mkdir()
    for z in range(3):
        make_dicom_file(series / f"{z}.dcm", np.zeros((4, 4), np.uint16), position=(0, 0, z))
    recs = scan_class_folders(root)
    assert {r["split"] for r in recs} == {"train", "val", "test"}
    assert len(recs) == 7
    assert any(r["path"].endswith("case1") for r in recs)


def test_scan_errors(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        scan_class_folders(tmp_path / "nope")
    with pytest.raises(DataError, match="expected one sub-folder per class"):
        scan_class_folders(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(DataError, match="no image files found"):
        scan_class_folders(tmp_path)


def _write_csv(path, text):
    path.write_text(text)
    return path


def test_read_manifest(tmp_path):
    _png(tmp_path / "imgs" / "a.png", 10)
    csv_path = _write_csv(
        tmp_path / "m.csv",
        "path,label,patient,split,age\nimgs/a.png,1,P1,train,50\nimgs/b.png,0,P2,Validation,\n/abs/c.png,,P3,test,7.5\n",
    )
    recs = read_manifest(csv_path, patient_col="patient", split_col="split", clinical_cols=["age"])
    assert recs[0]["path"] == str(tmp_path / "imgs" / "a.png")
    assert recs[2]["path"] == "/abs/c.png"
    assert [r["label"] for r in recs] == ["1", "0", None]
    assert [r["split"] for r in recs] == ["train", "val", "test"]
    assert [r["patient_id"] for r in recs] == ["P1", "P2", "P3"]
    assert [r["clinical"]["age"] for r in recs] == [50, None, 7.5]


def test_read_manifest_multilabel(tmp_path):
    p = _write_csv(tmp_path / "m.csv", "file;effusion;nodule\nx.png;1;0\ny.png;0;1\n")
    recs = read_manifest(p, path_col="file", label_cols=["effusion", "nodule"])
    assert recs[0]["label"] == [1, 0] and recs[1]["label"] == [0, 1]
    assert recs[0]["label_names"] == ["effusion", "nodule"]
    bad = _write_csv(tmp_path / "bad.csv", "file,effusion,nodule\nx.png,2,0\n")
    with pytest.raises(DataError, match=r"line 2: label column 'effusion' must be 0 or 1"):
        read_manifest(bad, path_col="file", label_cols="effusion,nodule")


def test_read_manifest_errors(tmp_path):
    p = _write_csv(tmp_path / "m.csv", "path,diagnosis\nx.png,1\n")
    with pytest.raises(DataError, match=r"no 'label' column; pass label_cols \(columns present: path, diagnosis\)"):
        read_manifest(p)
    with pytest.raises(DataError, match=r"no column 'patient'; columns present: path, diagnosis"):
        read_manifest(p, label_cols="diagnosis", patient_col="patient")
    with pytest.raises(DataError, match="file not found"):
        read_manifest(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        read_manifest(_write_csv(tmp_path / "s.csv", "path,label,split\nx.png,1,holdout\n"), split_col="split")
    with pytest.raises(DataError, match="no rows"):
        read_manifest(_write_csv(tmp_path / "e.csv", "path,label\n"))
    with pytest.raises(DataError, match="line 2: empty 'path'"):
        read_manifest(_write_csv(tmp_path / "p.csv", "path,label\n,1\n"))


def test_recipe_is_json_and_validated():
    r = make_recipe(size=(32, 32), channels=3, window="lung")
    assert json.loads(json.dumps(r)) == r
    assert r["window"] == [-600.0, 1500.0] and r["spatial_dims"] == 2
    with pytest.raises(DataError, match="invalid size"):
        make_recipe(size=(32, 32), spatial_dims=3)
    with pytest.raises(DataError, match="unknown intensity mode 'zscore'"):
        make_recipe(size=(8, 8), intensity="zscore")
    with pytest.raises(DataError, match="invalid channels"):
        make_recipe(size=(8, 8), channels=2)
    with pytest.raises(DataError, match="invalid percentiles"):
        make_recipe(size=(8, 8), percentiles=(50, 10))


def test_preprocess_array_modes():
    a = np.arange(16, dtype=np.float32).reshape(1, 4, 4) * 10
    out = preprocess_array(a, {"value_range": (0.0, 255.0)}, size=(4, 4), channels=1)
    np.testing.assert_allclose(out, a / 255.0, atol=1e-6)
    mm = preprocess_array(a, {"value_range": None}, size=(4, 4), intensity="minmax")
    assert mm.min() == 0 and mm.max() == 1
    pc = preprocess_array(a, {"value_range": None}, size=(2, 2), channels=3)
    assert pc.shape == (3, 2, 2) and pc.dtype == np.float32
    flat = preprocess_array(np.ones((1, 4, 4), np.float32), {"value_range": None}, size=(4, 4))
    assert (flat == 0).all()
    up = preprocess_array(a, {"value_range": (0.0, 255.0)}, size=(8, 8))
    assert up.shape == (1, 8, 8)
    hu = np.array([[[-1000, 0], [40, 3000]]], np.float32)
    w = preprocess_array(hu, {"value_range": None, "window": None}, size=(2, 2), window="soft_tissue")
    np.testing.assert_allclose(w[0], [[0, 0.4], [0.5, 1]], atol=1e-6)
    rgb = np.zeros((3, 4, 4), np.float32)
    rgb[0] = 255
    g = preprocess_array(rgb, {"value_range": (0.0, 255.0)}, size=(4, 4), channels=1)
    np.testing.assert_allclose(g, 0.299, atol=1e-5)
    vol = np.random.default_rng(0).random((1, 6, 8, 8)).astype(np.float32)
    v = preprocess_array(vol, {"value_range": (0.0, 1.0)}, size=(3, 4, 4))
    assert v.shape == (1, 3, 4, 4)


def test_preprocess_array_errors():
    with pytest.raises(DataError, match="is a 3D volume"):
        preprocess_array(np.zeros((1, 3, 4, 4), np.float32), {}, size=(4, 4))
    with pytest.raises(DataError, match="is a 2D image"):
        preprocess_array(np.zeros((1, 4, 4), np.float32), {}, size=(4, 4, 4))
    with pytest.raises(DataError, match="has 4 channels, the recipe expects 3"):
        preprocess_array(np.zeros((4, 4, 4), np.float32), {}, size=(4, 4), channels=3)
    with pytest.raises(DataError, match="unknown intensity mode"):
        preprocess_array(np.zeros((1, 4, 4), np.float32), {}, size=(4, 4), intensity="bogus")
    with pytest.raises(DataError, match="missing key 'size'"):
        apply_recipe(np.zeros((1, 4, 4), np.float32), {}, {"channels": 1})


def test_load_records_mixed_channels(tmp_path, class_tree):
    recs = scan_class_folders(class_tree)
    _png(class_tree / "pneumonia" / "colour.png", 100, rgb=True)
    recs.append({"path": str(class_tree / "pneumonia" / "colour.png"), "label": "pneumonia", "split": None})
    images, metas = load_records(recs, size=(8, 8), spatial_dims=2)
    assert images.shape == (8, 3, 8, 8) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    recipe = metas[0]["recipe"]
    assert recipe["channels"] == 3 and json.loads(json.dumps(recipe)) == recipe
    # inference replays the exact same recipe on one file (path or bytes)
    one, _ = load_one(recs[0]["path"], recipe)
    np.testing.assert_array_equal(one, images[0])
    raw = Path(recs[0]["path"]).read_bytes()
    one_b, _ = load_one(raw, recipe, name="upload.png")
    np.testing.assert_array_equal(one_b, images[0])


def test_load_records_errors(tmp_path, class_tree):
    recs = scan_class_folders(class_tree)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    recs.append({"path": str(bad), "label": "x", "split": None})
    with pytest.raises(DataError, match=r"1 of 8 files could not be loaded: cannot read .*broken.png"):
        load_records(recs, size=(8, 8))
    images, metas, errors = load_records(recs, size=(8, 8), on_error="collect")
    assert len(images) == 7 and len(errors) == 1 and errors[0]["path"] == str(bad)
    with pytest.raises(DataError, match="unknown on_error"):
        load_records(recs, size=(8, 8), on_error="ignore")


@pytest.mark.realdata
def test_load_records_volumes(samples_dir):
    recs = [
        {"path": str(samples_dir / "ct_dicom_series"), "label": "a"},
        {"path": str(samples_dir / "nifti" / "anatomical.nii"), "label": "b"},
    ]
    images, metas = load_records(recs, size=(8, 8, 8), spatial_dims=3, window=None)
    assert images.shape == (2, 1, 8, 8, 8)
    ct, _ = load_records(recs[:1], size=(4, 8, 8), window="lung")
    assert ct.min() >= 0 and ct.max() <= 1
    arr, meta = read_image(recs[0]["path"], window="lung")
    np.testing.assert_allclose(ct[0], apply_recipe(arr, meta, make_recipe(size=(4, 8, 8), window="lung")), atol=1e-6)
