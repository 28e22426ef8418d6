"""Round trips through a real Orthanc: DICOMweb (QIDO-RS / WADO-RS / STOW-RS) and DIMSE (C-FIND / C-MOVE /
C-STORE), and the push path (storescu to the node's SCP). The SR's values equal `medsight predict`'s."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from medsight.review import NO_VERDICT
from nodekit import make_series, node_config, run_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _subproc import env, free_port, medsight_cmd

pytestmark = pytest.mark.realdata


def _samples() -> Path:
    d = Path(os.environ.get("MEDSIGHT_SAMPLES_DIR", "")) / "ct_dicom_series"
    if not d.is_dir():
        pytest.fail(f"sample CT series not found in {d}; set MEDSIGHT_SAMPLES_DIR")
    return d


def _node(tmp_path, raw):
    from medsight.node.config import parse_config
    from medsight.node.service import Node

    return Node(parse_config(raw, tmp_path), worker=False).start()


def _predict_cli(bundle: Path, files: list[Path], out: Path) -> dict[str, dict]:
    """`medsight predict` on the files -> {SOPInstanceUID: row}."""
    r = subprocess.run(medsight_cmd("predict", str(bundle), *map(str, files), "--out", str(out)), env=env(),
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    return {str(pydicom.dcmread(row["file"], stop_before_pixels=True).SOPInstanceUID): row for row in rows}


def _check_results(orthanc, study: str, source_uids: set[str], expected: dict[str, dict], version: str) -> dict:
    """One SR and one SC in the study; the SR references every source instance and its values equal
    `medsight predict`'s; both are readable by pydicom / highdicom."""
    import highdicom as hd

    from medsight.node.results import CAPTION, read_sr

    res = orthanc.results(study)
    assert len(res["SR"]) == 1 and len(res["heatmap"]) == 1, {k: len(v) for k, v in res.items()}
    sr = pydicom.dcmread(io.BytesIO(res["SR"][0]))
    hd.sr.ComprehensiveSR.from_dataset(sr)
    assert sr.StudyInstanceUID == study and sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    got = read_sr(sr)
    assert got["Algorithm Version"] == version and got["Comment"] == CAPTION
    assert len(got["Weights SHA-256"]) == 64
    assert {s for g in got["groups"] for s in g["sources"]} == source_uids
    for g in got["groups"]:
        (sop,) = g["sources"]
        row = expected[sop]
        assert g["Probability of positive class"] == pytest.approx(row["probabilities"][row["positive_class"]], abs=1e-6)
        # the same verdict as `medsight predict`: an out-of-distribution input has none
        assert g["Decision"] == (NO_VERDICT if row["decision"] is None else str(row["decision"]))
        assert g["Threshold"] == pytest.approx(row["threshold"], abs=1e-9)
        assert g["Finding"] == (NO_VERDICT if row["predicted"] is None else row["predicted"])
        assert g["Needs review"] == ("yes" if row["review"] else "no")
        assert g["reasons"] == row["review_reasons"]
    sc = pydicom.dcmread(io.BytesIO(res["heatmap"][0]))
    assert sc.StudyInstanceUID == study and sc.BurnedInAnnotation == "YES"
    assert sc.pixel_array.ndim == 3 and sc.pixel_array.shape[2] == 3
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID
    return got


def test_dicomweb_round_trip_ct_series_and_cr_image(tmp_path, orthanc, served_bundle, breast):
    ct_files = sorted(_samples().glob("*.dcm"))
    for f in ct_files:
        orthanc.upload(f.read_bytes())
    ct = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    (cr,) = make_series(breast.splits["test"].images[:1], 1)
    orthanc.upload(cr["files"][0])
    cr_file = tmp_path / "cr.dcm"
    cr_file.write_bytes(cr["files"][0])

    node = _node(tmp_path, node_config(tmp_path, served_bundle, orthanc, poll={"interval_s": 0.5}))
    try:
        run_until(node, lambda: node.wl.counts()["sent"] == 2)
        version = node.loaded["breast"].version
    finally:
        node.stop()
    expected = _predict_cli(served_bundle, [*ct_files, cr_file], tmp_path / "pred.json")
    ct_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ct_files}
    got = _check_results(orthanc, str(ct.StudyInstanceUID), ct_uids, expected, version)
    assert len(got["groups"]) == len(ct_files)
    _check_results(orthanc, cr["study"], {str(pydicom.dcmread(cr_file).SOPInstanceUID)}, expected, version)
    # the received files were removed once the results were sent; folders and files were private meanwhile
    assert not [p for p in (tmp_path / "node" / "store").rglob("*") if p.is_file()]
    assert (tmp_path / "node").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "node" / "worklist.sqlite").stat().st_mode & 0o777 == 0o600


def test_dimse_round_trip_find_move_store(tmp_path, orthanc, served_bundle, breast):
    ct_files = sorted(_samples().glob("*.dcm"))
    for f in ct_files:
        orthanc.upload(f.read_bytes())
    ct = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    (dx,) = make_series(breast.splits["test"].images[1:2], 1, modality="DX")
    orthanc.upload(dx["files"][0])
    port = free_port()
    orthanc.set_modality("MEDSIGHT", port)
    raw = node_config(tmp_path, served_bundle, orthanc, port=port, send="dimse", retrieve="dimse",
                      poll={"interval_s": 0.5, "query": "dimse"})
    node = _node(tmp_path, raw)
    try:
        run_until(node, lambda: node.wl.counts()["sent"] == 2)
        version = node.loaded["breast"].version
        p = node.loaded["breast"].predictor
        expected = {}
        for f in ct_files:
            expected[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = p.predict_file(f).to_dict()
        expected[str(pydicom.dcmread(io.BytesIO(dx["files"][0])).SOPInstanceUID)] = \
            p.predict_bytes(dx["files"][0], "dx.dcm").to_dict()
    finally:
        node.stop()
    ct_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ct_files}
    _check_results(orthanc, str(ct.StudyInstanceUID), ct_uids, expected, version)
    _check_results(orthanc, dx["study"], set(expected) - ct_uids, expected, version)
