"""One "needs review" verdict everywhere (issues 21 and 25): for 50 files of mixed formats (valid PNG / DICOM /
NIfTI, out-of-distribution scans, unreadable files), ``medsight predict`` (JSON and CSV), ``POST /v1/predict``
and the MLflow pyfunc give the same fields and values per file, the review flag and its reasons included; an
out-of-distribution scan gets no class verdict on any of them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medsight.cli import main

pytestmark = pytest.mark.realdata

SAME = ("predicted", "decision", "threshold", "positive_class", "calibrated", "model_version", "ood_flag", "review",
        "review_reasons")


@pytest.fixture(scope="module")
def fifty(breast_files, breast, tmp_path_factory) -> list[Path]:
    import nibabel as nib

    root = tmp_path_factory.mktemp("fifty")
    files = list(breast_files["png"][:14]) + list(breast_files["dcm"][:8])
    imgs = np.asarray(breast.splits["test"].images[20:24])
    for i, img in enumerate(imgs):  # 2D NIfTI of real test images
        p = root / f"nifti_{i}.nii.gz"
        nib.save(nib.Nifti1Image(img.reshape(img.shape[-2:]).astype(np.uint8), np.eye(4)), str(p))
        files.append(p)
    import os

    samples = Path(os.environ["MEDSIGHT_SAMPLES_DIR"])
    files += [samples / "torchio_IMG0001.dcm", samples / "nifti" / "anatomical.nii"]  # a CT slice; a 3D volume
    test_files = sorted((Path(pydicom.__file__).parent / "data" / "test_files").glob("*.dcm"))
    files += test_files[::max(1, len(test_files) // 14)][:14]  # head CTs, MRs, RT objects, compressed...
    rng = np.random.default_rng(0)
    for i in range(3):  # noise: out of distribution
        p = root / f"noise_{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(p)
        files.append(p)
    junk = {"text.png": b"not an image, just text\n", "random.dcm": rng.bytes(3000),
            "cut.png": breast_files["png"][0].read_bytes()[:60], "empty.png": b"", "notes.txt": b"hello"}
    for name, data in junk.items():
        (root / name).write_bytes(data)
        files.append(root / name)
    assert len(files) == 50 and all(f.exists() for f in files)
    return files


@pytest.fixture(scope="module")
def predicted(served_bundle, fifty, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("pred") / "p.json"
    assert main(["predict", str(served_bundle), *map(str, fifty), "--out", str(out), "--backend", "torch"]) == 1
    rows = json.loads(out.read_text())
    assert [r["file"] for r in rows] == [str(f) for f in fifty]
    return {r["file"]: r for r in rows}


def _check_kinds(rows: dict[str, dict]) -> None:
    ok = [r for r in rows.values() if r["error"] is None]
    assert len(ok) >= 25 and sum(r["error"] is not None for r in rows.values()) >= 5
    assert any(r["ood_flag"] for r in ok) and any(r["ood_flag"] is False for r in ok)
    assert any(r["review"] is False for r in ok)  # a normal, readable scan is not flagged


def test_predict_json_and_the_service_agree_file_by_file(served_bundle, fifty, predicted):
    from fastapi.testclient import TestClient

    from medsight.serve.app import create_app

    _check_kinds(predicted)
    client = TestClient(create_app(served_bundle, backend="torch"))
    for f in fifty:
        ref = predicted[str(f)]
        r = client.post("/v1/predict", files={"file": (f.name, f.read_bytes(), "application/octet-stream")})
        if ref["error"] is not None:
            assert r.status_code in (415, 422), (f.name, r.status_code, r.text, ref["error"])
            assert "\n" not in r.json()["detail"]
            continue
        assert r.status_code == 200, (f.name, r.text, ref)
        got = r.json()
        for k in SAME:
            assert got[k] == ref[k], (f.name, k, got[k], ref[k])
        assert got["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-5)
        assert (got["ood_score"] is None) == (ref["ood_score"] is None)
        if ref["ood_score"] is not None:
            assert got["ood_score"] == pytest.approx(ref["ood_score"], rel=1e-4, abs=1e-3)
        if ref["ood_flag"]:  # no class verdict for an out-of-distribution scan, and the reason says so
            assert got["predicted"] is None and got["decision"] is None and got["review"] is True
            assert "no verdict is given" in got["review_reasons"][0]


def test_predict_csv_carries_the_same_review(served_bundle, fifty, predicted, tmp_path):
    out = tmp_path / "p.csv"
    assert main(["predict", str(served_bundle), *map(str, fifty), "--out", str(out), "--backend", "torch"]) == 1
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 50
    for row in rows:
        ref = predicted[row["file"]]
        if ref["error"] is not None:
            assert row["review"] == "" and row["error"]
            continue
        assert row["review"] == str(ref["review"]) and row["review_reasons"] == "; ".join(ref["review_reasons"])
        assert row["predicted"] == (ref["predicted"] or "")
        assert row["threshold"] == "0.5"  # 3 significant digits


def test_mlflow_pyfunc_carries_the_same_review(served_bundle, fifty, predicted, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    from medsight.tracking import save_pyfunc

    model = mlflow.pyfunc.load_model(str(save_pyfunc(served_bundle, tmp_path / "model")))  # local: no server
    rows = model.predict(pd.DataFrame({"path": [str(f) for f in fifty]})).to_dict("records")
    assert len(rows) == 50
    for f, row in zip(fifty, rows):
        ref = predicted[str(f)]
        assert (row["error"] is None) == (ref["error"] is None), (f.name, row["error"], ref["error"])
        if ref["error"] is not None:
            assert row["review"] is None
            continue
        assert row["review"] == ref["review"] and row["review_reasons"] == ref["review_reasons"], f.name
        assert row["predicted"] == ref["predicted"] and row["ood_flag"] == ref["ood_flag"], f.name


def test_summary_and_report_state_the_share_flagged(served_bundle, breast):
    """Training states, per split, the share of cases flagged as too close to call (in bundle.json's summary,
    which is what the report's facts show), and it keeps to the fitted rule's target on validation."""
    from medsight.bundle import load_bundle
    from medsight.evaluate import split_probs
    from medsight.review import share_flagged

    b = load_bundle(served_bundle)
    lines = [s for s in b.meta.training_summary if s.startswith("share of")]
    assert [s.split(":")[0] for s in lines] == ["share of validation cases flagged for review",
                                               "share of test cases flagged for review"]
    val_share, words = share_flagged(b, split_probs(b, breast, "val"))
    assert val_share == pytest.approx(b.meta.review.val_share) and val_share <= 0.1
    assert f"{val_share:.1%}" in lines[0] and words in lines[0]
    test_share, _ = share_flagged(b, split_probs(b, breast, "test"))
    assert test_share <= 0.15 and f"{test_share:.1%}" in lines[1]
