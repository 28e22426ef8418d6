"""`medsight node export`: query Orthanc, retrieve the labelled studies, de-identify, write a manifest that
medsight's dataset reader takes."""

from __future__ import annotations

import pytest
import yaml
from nodekit import PASSWORD, USER, make_series

pytestmark = pytest.mark.realdata  # BreastMNIST images


def test_export_cohort_deidentified_manifest(tmp_path, orthanc, breast, monkeypatch, capsys):
    import io

    import pydicom

    from medsight.cli import main
    from medsight.data.folders import records_from

    series = make_series(breast.splits["test"].images, 3, per_series=2)
    accessions = ["ACC-A", "ACC-B", "ACC-C"]
    for s, acc in zip(series, accessions):
        for f in s["files"]:
            ds = pydicom.dcmread(io.BytesIO(f))
            ds.AccessionNumber = acc
            buf = io.BytesIO()
            ds.save_as(buf)
            orthanc.upload(buf.getvalue())
    labels = tmp_path / "labels.csv"
    labels.write_text("accession_number,label\nACC-A,malignant\nACC-B,benign\n")  # ACC-C has no label
    monkeypatch.setenv("PACS_PW", PASSWORD)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "node"), "routes": [{"name": "a", "bundle": "unused"}],
        "pacs": {"dicomweb": {"url": orthanc.dicomweb, "username": USER, "password_env": "PACS_PW"}}}))
    out = tmp_path / "cohort"
    assert main(["node", "export", "--config", str(cfg), "--out", str(out), "--labels", str(labels),
                 "--filter", "Modality=CR"]) == 0
    assert "exported 4 de-identified instances from 2 series" in capsys.readouterr().out
    recs = records_from(out / "manifest.csv")
    assert sorted(r["label"] for r in recs) == ["benign", "benign", "malignant", "malignant"]
    assert len({r["patient_id"] for r in recs}) == 1  # one (pseudonymous) patient across the studies
    for r in recs:
        ds = pydicom.dcmread(r["path"])
        assert str(ds.PatientName) != "Test^Patient" and ds.PatientID != "PID-NODE-1"
        assert ds.StudyInstanceUID not in {s["study"] for s in series}
        assert str(ds.get("AccessionNumber", "") or "") not in accessions
    # nothing identified left beside the output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".medsight")) == []
