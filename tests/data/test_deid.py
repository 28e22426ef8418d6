"""DICOM de-identification (PS3.15 Basic Profile)."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib

import numpy as np
import pytest

from medsight.data.deid import BASIC_PROFILE, deidentify
from medsight.errors import DataError

STUDY_UID = "1.2.826.0.1.3680043.8.498.77.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.77.2"
FOR_UID = "1.2.826.0.1.3680043.8.498.77.3"


def _value_for(kw: str, vr: str, idx: int):
    from pydicom.dataset import Dataset

    tag = f"S{idx:03d}"
    if vr == "PN":
        return f"Secret{idx}^Person"
    if vr in ("LO", "LT", "ST", "UT", "UC"):
        return f"SECRET-{kw}"[:64]
    if vr in ("SH", "AE"):
        return f"SEC{tag}"
    if vr == "CS":
        return f"SEC{tag}"
    if vr == "DA":
        return "20200315"
    if vr == "TM":
        return "101112"
    if vr == "DT":
        return "20200315101112"
    if vr == "UI":
        return f"1.2.826.0.1.3680043.8.498.99.{idx}"
    if vr == "AS":
        return "042Y"
    if vr in ("IS",):
        return str(900 + idx)
    if vr == "DS":
        return f"{900 + idx}.5"
    if vr == "US":
        return 900 + idx
    if vr == "SQ":
        item = Dataset()
        item.CodeValue = f"SEC{tag}"
        item.CodingSchemeDesignator = "99SECRET"
        item.CodeMeaning = f"SECRET-{kw}"
        item.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.98.{idx}"
        return [item]
    if vr in ("OB", "OW", "UN"):
        return b"SECRETSECRET"
    return None


def _build(path, *, sop_uid, patient="PID-777", study_date="20200315", acq_date="20200320", with_profile=True):
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    originals = {}
    if with_profile:
        for idx, kw in enumerate(sorted(BASIC_PROFILE)):
            if tag_for_keyword(kw) >> 16 in (0x0000, 0x0002):
                continue  # command / file-meta elements cannot live in a stored dataset
            vr = dictionary_VR(tag_for_keyword(kw)).split(" or ")[0]
            v = _value_for(kw, vr, idx)
            if v is not None:
                setattr(ds, kw, v)
                originals[kw] = v
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CTImageStorage
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.SourceApplicationEntityTitle = "HOSPITAL_PACS"
    ds.file_meta = fm
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = FOR_UID
    ds.PatientID = patient
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = study_date
    ds.AcquisitionDate = acq_date
    ds.ContentDate = acq_date
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(16, dtype=np.uint16) * 97).tobytes()
    # private tags, top level and nested
    block = ds.private_block(0x0011, "ACME SECRET", create=True)
    block.add_new(0x01, "LO", "PRIVATE-SECRET")
    item = Dataset()
    item.ReferencedSOPInstanceUID = sop_uid
    item.ReferencedSOPClassUID = CTImageStorage
    iblock = item.private_block(0x0013, "ACME NESTED", create=True)
    iblock.add_new(0x01, "LO", "NESTED-SECRET")
    ds.ReferencedImageSequence = [item]
    ds.add_new(0x50000010, "US", 1)  # curve data group
    ds.add_new(0x60004000, "LT", "OVERLAY-SECRET")
    ds.save_as(path, enforce_file_format=True)
    originals.update(StudyInstanceUID=STUDY_UID, SeriesInstanceUID=SERIES_UID, SOPInstanceUID=sop_uid, PatientID=patient, PatientName="Doe^Jane", PatientBirthDate="19700101")
    return originals


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def study(tmp_path):
    src = tmp_path / "in"
    (src / "series").mkdir(parents=True)
    a = src / "series" / "a.dcm"
    b = src / "series" / "b.dcm"
    orig = _build(a, sop_uid="1.2.826.0.1.3680043.8.498.77.10")
    _build(b, sop_uid="1.2.826.0.1.3680043.8.498.77.11", study_date="20200315", acq_date="20200401", with_profile=False)
    (src / "notes.txt").write_text("Jane Doe's scan")
    return src, a, b, orig


def test_every_profile_attribute_value_is_gone(study, tmp_path):
    import pydicom

    src, a, b, orig = study
    assert len(orig) > 200  # the test exercises (nearly) the whole table
    before = {p: _sha(p) for p in (a, b)}
    summary = deidentify(src, tmp_path / "out", secret="s3cret")
    assert summary["written"] == 2 and summary["skipped"] == ["notes.txt"] and not summary["errors"]
    assert {p: _sha(p) for p in (a, b)} == before  # input untouched
    out = pydicom.dcmread(tmp_path / "out" / "series" / "a.dcm")
    dump = str(out) + str(out.file_meta)
    survivors = []
    for kw, original in orig.items():
        if kw not in out:
            continue
        new = out[kw].value
        if kw in ("ReferencedImageSequence", "SourceImageSequence", "ReferencedSeriesSequence"):
            # X/Z/U*: kept, but the instance UIDs inside are remapped
            for item in new:
                assert str(item.get("ReferencedSOPInstanceUID", "")) not in (orig.get("SOPInstanceUID"),)
            continue
        if isinstance(original, list):
            if new and any(str(getattr(it, "CodeMeaning", "")) == str(original[0].CodeMeaning) for it in new):
                survivors.append(kw)
            continue
        if str(new) == str(original):
            survivors.append(kw)
    assert survivors == []
    for secret in ("Doe^Jane", "PID-777", "19700101", "PRIVATE-SECRET", "NESTED-SECRET", "OVERLAY-SECRET", "HOSPITAL_PACS"):
        assert secret not in dump, secret
    assert out.PatientIdentityRemoved == "YES" and "Basic Application" in str(out.DeidentificationMethod)
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    assert not any(e.tag.is_private for e in out.iterall())
    kept_sequences = {"SourceImageSequence", "ReferencedSeriesSequence", "ReferencedImageSequence"}
    leftovers = [e.keyword for e in out.iterall() if "SECRET" in str(e.value) and e.VR != "SQ"]
    assert set(leftovers) <= {"CodeMeaning", "CodingSchemeDesignator"}, leftovers
    for kw in kept_sequences & set(out.dir()):
        assert all(not str(getattr(it, "ReferencedSOPInstanceUID", "")).startswith("1.2.826.0.1.3680043.8.498.98.") for it in out[kw].value)
    assert 0x50000010 not in out and 0x60004000 not in out


def test_uids_consistent_dates_shifted_pixels_identical(study, tmp_path):
    import pydicom

    src, a, b, _ = study
    deidentify(src, tmp_path / "out", secret="s3cret")
    oa = pydicom.dcmread(tmp_path / "out" / "series" / "a.dcm")
    ob = pydicom.dcmread(tmp_path / "out" / "series" / "b.dcm")
    ia, ib = pydicom.dcmread(a), pydicom.dcmread(b)
    assert oa.StudyInstanceUID == ob.StudyInstanceUID != STUDY_UID
    assert oa.SeriesInstanceUID == ob.SeriesInstanceUID != SERIES_UID
    assert oa.FrameOfReferenceUID == ob.FrameOfReferenceUID != FOR_UID
    assert oa.SOPInstanceUID != ob.SOPInstanceUID and oa.SOPInstanceUID != ia.SOPInstanceUID
    assert oa.file_meta.MediaStorageSOPInstanceUID == oa.SOPInstanceUID
    assert oa.SOPClassUID == ia.SOPClassUID  # class UIDs are kept
    # the nested reference points at the remapped instance
    assert ob.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ob.SOPInstanceUID
    assert oa.PatientID == ob.PatientID and oa.PatientID.startswith("ANON-")

    def d(s):
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))

    assert ob.StudyDate != ib.StudyDate
    assert (d(ob.AcquisitionDate) - d(ob.StudyDate)) == (d(ib.AcquisitionDate) - d(ib.StudyDate))
    assert (d(oa.StudyDate) - d(ia.StudyDate)) == (d(ob.StudyDate) - d(ib.StudyDate))  # one offset per patient
    assert oa.PixelData == ia.PixelData and ob.PixelData == ib.PixelData
    assert oa.PatientBirthDate in ("", None)


def test_deterministic_per_secret_and_mapping(study, tmp_path):
    import pydicom

    src, *_ = study
    deidentify(src, tmp_path / "o1", secret="k1")
    deidentify(src, tmp_path / "o2", secret="k1")
    deidentify(src, tmp_path / "o3", secret="k2", mapping_csv=tmp_path / "map.csv")
    u1 = pydicom.dcmread(tmp_path / "o1" / "series" / "a.dcm").StudyInstanceUID
    u2 = pydicom.dcmread(tmp_path / "o2" / "series" / "a.dcm").StudyInstanceUID
    u3 = pydicom.dcmread(tmp_path / "o3" / "series" / "a.dcm").StudyInstanceUID
    assert u1 == u2 != u3
    with open(tmp_path / "map.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"kind", "original", "new"} == set(rows[0])
    assert any(r["kind"] == "uid" and r["original"] == STUDY_UID and r["new"] == u3 for r in rows)
    assert any(r["kind"] == "patient" and r["original"] == "PID-777" for r in rows)
    assert not (tmp_path / "map2.csv").exists()


def test_keep_private_and_errors(study, tmp_path):
    import pydicom

    src, *_ = study
    deidentify(src, tmp_path / "kp", keep_private=True)
    out = pydicom.dcmread(tmp_path / "kp" / "series" / "a.dcm")
    assert any(e.tag.is_private for e in out)
    with pytest.raises(DataError, match="must be outside the input folder"):
        deidentify(src, src / "out")
    with pytest.raises(DataError, match="not a folder"):
        deidentify(tmp_path / "nope", tmp_path / "o")
    bad = src / "broken.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 10)
    summary = deidentify(src, tmp_path / "o4")
    assert summary["written"] == 2
    assert [e["path"] for e in summary["errors"]] == ["broken.dcm"]
