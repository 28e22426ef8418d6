"""Data QC report and its rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsight.data.quality import render_qc, run_qc
from medsight.errors import DataError


def _save(path, arr):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def qc_tree(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    base = [rng.integers(60, 200, (32, 32), dtype=np.uint8) for _ in range(8)]
    for i, a in enumerate(base[:6]):
        _save(root / "train" / ("a" if i % 2 else "b") / f"{i}.png", a)
    _save(root / "test" / "a" / "dup_exact.png", base[1])  # exact duplicate across splits
    near = base[2].astype(np.int16)
    near[0, 0] += 3
    _save(root / "test" / "b" / "dup_near.png", np.clip(near, 0, 255).astype(np.uint8))  # near duplicate
    _save(root / "test" / "b" / "bright.png", np.full((32, 32), 255, np.uint8))  # intensity outlier
    _save(root / "test" / "a" / "big.png", base[6].repeat(2, 0))  # shape mismatch
    (root / "test" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    return root


def test_run_qc_on_folder(qc_tree):
    rep = run_qc(qc_tree)
    assert json.loads(json.dumps(rep)) == rep
    assert rep["n_records"] == 11 and rep["n_unreadable"] == 1
    assert "broken.png" in rep["unreadable"][0]["error"]
    assert any(g["cross_split"] and len(g["items"]) == 2 for g in rep["exact_duplicates"])
    assert any(p["cross_split"] and "dup_near.png" in p["a"]["path"] + p["b"]["path"] for p in rep["near_duplicates"])
    assert rep["outliers"]["n_shape_mismatch"] == 1 and rep["outliers"]["shape_mismatch"][0]["path"].endswith("big.png")
    assert any(o["path"].endswith("bright.png") for o in rep["outliers"]["intensity"])
    cb = rep["class_balance"]
    assert sum(cb["overall"].values()) == 11 and set(cb["per_split"]) == {"train", "test"}
    assert rep["ok"] is False


def test_run_qc_records_missing_labels_and_render(qc_tree):
    from medsight.data.folders import scan_class_folders

    recs = scan_class_folders(qc_tree)
    recs[0]["label"] = None
    rep = run_qc(recs, near_dup_threshold=0)
    assert rep["n_missing_labels"] == 1 and rep["missing_labels"][0]["index"] == 0
    from rich.console import Console
    from rich.table import Table

    table = render_qc(rep)
    assert isinstance(table, Table)
    console = Console(record=True, width=140)
    console.print(table)
    text = console.export_text()
    assert "Unreadable files" in text and "Missing labels" in text


def test_run_qc_arrays_dict():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 255, (20, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 255, (5, 28, 28), dtype=np.uint8)
    test[0] = train[3]
    rep = run_qc({"train": (train, np.arange(20).reshape(-1, 1) % 2), "test": (test, np.zeros((5, 1), int))})
    assert rep["source"] == "arrays" and rep["n_records"] == 25
    assert rep["summary"]["exact_duplicates_across_splits"] == 1
    assert rep["class_balance"]["overall"] == {"0": 15, "1": 10}
    rgb = rng.integers(0, 255, (4, 28, 28, 3), dtype=np.uint8)
    rep = run_qc({"train": (rgb, None)})
    assert rep["outliers"]["common_shape"] == [3, 28, 28] and rep["n_missing_labels"] == 4


def test_run_qc_manifest_and_npz(tmp_path, qc_tree):
    m = tmp_path / "m.csv"
    m.write_text("path,label\n" + str(qc_tree / "train" / "a" / "1.png") + ",a\nmissing.png,b\n")
    rep = run_qc(m)
    assert rep["source"] == "manifest" and rep["n_unreadable"] == 1
    z = tmp_path / "tiny.npz"
    np.savez(z, train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.zeros((3, 1)))
    assert run_qc(z)["n_records"] == 3


def test_run_qc_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="expected records"):
        run_qc(42)
    with pytest.raises(DataError, match="not a folder, a .csv manifest"):
        run_qc(tmp_path / "x.bin")
    with pytest.raises(DataError, match="pairs"):
        run_qc({"train": np.zeros(3)})
    with pytest.raises(DataError, match="3 images but 2 labels"):
        run_qc({"train": (np.zeros((3, 4, 4)), np.zeros(2))})
    z = tmp_path / "e.npz"
    np.savez(z, foo=np.zeros(2))
    with pytest.raises(DataError, match="no '<split>_images'"):
        run_qc(z)


# ------------------------------------------------------------------ raw dumps and accepted leakage


@pytest.fixture
def raw_dicom_dump(tmp_path, make_dicom_file):
    """An unlabelled PACS-style dump: patient/series folders of DICOM slices, plus a flat extra file."""
    rng = np.random.default_rng(5)
    root = tmp_path / "dump"
    a = [rng.integers(0, 4000, (24, 24), dtype=np.uint16) for _ in range(4)]
    for i, px in enumerate(a):  # series A: 4 slices, identifying headers set
        p = root / "P1" / "S1" / f"IM{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        make_dicom_file(p, px, series_uid="1.2.3.1", instance=i + 1, extra={"StudyDate": "20240101"})
    for i in range(3):  # series B: 3 slices, no patient name / id
        p = root / "P2" / "S9" / f"IM{i}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        make_dicom_file(p, rng.integers(0, 4000, (24, 24), dtype=np.uint16), series_uid="1.2.3.2", instance=i + 1,
                        extra={"PatientID": "", "PatientName": ""})
    make_dicom_file(root / "P2" / "S9" / "copy.dcm", a[0], series_uid="1.2.3.2")  # exact copy of a series-A slice
    (root / "P2" / "S9" / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    (root / "notes.txt").write_text("exported 2024")
    return root


def test_qc_raw_dicom_dump_counts_series_and_identifying_headers(raw_dicom_dump):
    rep = run_qc(raw_dicom_dump)
    assert rep["source"] == "raw folder" and rep["labelled"] is False
    assert rep["n_records"] == 9 and rep["n_skipped"] == 1 and rep["skipped"][0]["path"].endswith("notes.txt")
    assert rep["n_unreadable"] == 1 and rep["unreadable"][0]["path"].endswith("bad.dcm")
    assert rep["n_missing_labels"] == 0  # none expected in a raw dump
    assert len(rep["exact_duplicates"]) == 1 and len(rep["exact_duplicates"][0]["items"]) == 2
    d = rep["dicom"]
    assert d["files"] == 8 and d["series"] == 2 and d["files_without_series_uid"] == 0
    assert d["files_per_series"] == {"min": 4, "median": 4.0, "max": 4}  # A: 4 slices, B: 3 + the copy
    assert d["modalities"] == {"CT": 8}
    assert d["phi"] == {"files_with_any": 5, "files_with": {"PatientID": 5, "PatientName": 5, "StudyDate": 4}}
    text = json.dumps(rep)
    assert "PID-12345" not in text and "Doe" not in text and "1.2.3.1" not in text  # counts only, never values
    assert rep["ok"] is False  # one unreadable file


def test_qc_flat_unlabelled_folder_and_layout_choice(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(6):
        _save(tmp_path / "flat" / f"{i}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    rep = run_qc(tmp_path / "flat")
    assert rep["source"] == "raw folder" and rep["n_records"] == 6 and rep["ok"] is True
    assert rep["dicom"] is None
    with pytest.raises(DataError, match="expected one sub-folder per class"):
        run_qc(tmp_path / "flat", layout="classes")
    with pytest.raises(DataError, match="qc layout"):
        run_qc(tmp_path / "flat", layout="tree")
    # patient/study/series/file with nothing at the top: images three levels down, so not a class tree
    _save(tmp_path / "deep" / "P1" / "ST1" / "SE1" / "a.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    _save(tmp_path / "deep" / "P2" / "ST1" / "SE1" / "b.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    assert run_qc(tmp_path / "deep")["source"] == "raw folder"
    assert run_qc(tmp_path / "deep", layout="raw")["n_records"] == 2


def test_qc_allow_leakage_records_the_finding(qc_tree):
    strict = run_qc(qc_tree)
    assert strict["source"] == "folder" and strict["leakage_accepted"] is None
    (qc_tree / "test" / "a" / "broken.png").unlink()
    rep = run_qc(qc_tree, allow_leakage=True)
    assert rep["leakage_accepted"] == {"exact_duplicate_groups_across_splits": 1,
                                       "near_duplicate_pairs_across_splits": 1}
    assert rep["ok"] is True and run_qc(qc_tree)["ok"] is False


def test_qc_cli_raw_and_allow_leakage(raw_dicom_dump, qc_tree, capsys):
    from medsight.cli import main

    (raw_dicom_dump / "P2" / "S9" / "bad.dcm").unlink()
    assert main(["qc", str(raw_dicom_dump)]) == 0
    out = capsys.readouterr().out
    assert "raw folder" in out and "DICOM series" in out and "PatientID 5" in out
    (qc_tree / "test" / "a" / "broken.png").unlink()
    assert main(["qc", str(qc_tree)]) == 1
    assert main(["qc", str(qc_tree), "--allow-leakage"]) == 0
    assert "Leakage accepted" in capsys.readouterr().out
