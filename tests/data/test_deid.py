"""DICOM de-identification: allow-list, PS3.15 Table E.1-1 coverage, the verifier, burned-in text."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from medsight.data import deid as deid_mod
from medsight.data.deid import E1_1_TABLE, KEEP, deidentify
from medsight.data.io import read_image
from medsight.errors import DataError, MedsightError
from tests.data.conftest import make_dicom

STUDY_UID = "1.2.826.0.1.3680043.8.498.77.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.77.2"
FOR_UID = "1.2.826.0.1.3680043.8.498.77.3"
PLANT_UID = "1.2.826.0.1.3680043.8.498.424242."
PLANT_DATE = "19870412"
PATIENT_DIR = "DOE^JOHN_MRN-998877"


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _outputs(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _forms(s: str) -> list[bytes]:
    out = {s.encode("utf-8"), s.encode("utf-16-le")}
    try:
        out.add(s.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    return list(out)


def _grep(root: Path, needles) -> list[tuple[str, str]]:
    """Independent of the verifier: every needle searched in the raw bytes (UTF-8, Latin-1, UTF-16) of every
    output file, pixel data included, and in the relative paths. Digit-only needles (dates, UIDs) must not be
    part of a longer number."""
    hits = []
    for p in _outputs(root):
        raw = p.read_bytes()
        rel = p.relative_to(root).as_posix()
        for n in needles:
            for b in _forms(n):
                if b not in raw and b not in rel.encode():
                    continue
                if re.fullmatch(rb"[0-9.]+", b):
                    pat = rb"(?<![0-9.])" + re.escape(b) + rb"(?![0-9.])"
                    found = re.search(pat, raw) or re.search(pat, rel.encode())
                else:
                    found = b in raw or b in rel.encode()
                if found:
                    hits.append((n, rel))
    return hits


# ---------------------------------------------------------------------------------------------- the table


def _planted_value(idx: int, vr: str):
    from pydicom.dataset import Dataset

    if vr == "PN":
        return f"PHI{idx:03d}^Person"
    if vr in ("LO", "LT", "ST", "UT", "UC", "SH", "AE", "CS"):
        return f"T{idx:03d}PHI"
    if vr == "UR":
        return f"http://h{idx:03d}phi.example/x"
    if vr == "DA":
        return PLANT_DATE
    if vr == "DT":
        return PLANT_DATE + "101112"
    if vr == "TM":
        return "101112"
    if vr == "UI":
        return f"{PLANT_UID}{idx}"
    if vr == "AS":
        return "042Y"
    if vr in ("IS", "DS"):
        return str(9000 + idx)
    if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
        return 900 + idx
    if vr in ("FL", "FD"):
        return 900.5 + idx
    if vr == "AT":
        return 0x00100010
    if vr == "SQ":
        item = Dataset()
        item.CodeValue = f"C{idx:03d}PHI"
        item.CodingSchemeDesignator = "99PHI"
        item.CodeMeaning = f"M{idx:03d}PHI"
        item.ReferencedSOPInstanceUID = f"{PLANT_UID}{5000 + idx}"
        return [item]
    if vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV"):
        return f"B{idx:03d}PHIBINARY".encode()
    raise AssertionError(f"no planted value for VR {vr}")


def _table_tag(row) -> int | None:
    t = row["tag"]
    if "gggg" in t or t.startswith("(50xx"):
        return None
    t = t.replace("xx", "00")
    return int(t[1:5], 16) << 16 | int(t[6:10], 16)


def test_table_is_complete_data_and_consistent_with_the_allow_list():
    from pydicom.datadict import dictionary_keyword

    assert len(E1_1_TABLE) >= 500
    assert {"tag", "keyword", "name", "basic_profile"} <= set(E1_1_TABLE[0])
    for row in E1_1_TABLE:
        assert re.fullmatch(r"[XZDKCU*/]+", row["basic_profile"]), row
        tag = _table_tag(row)
        if tag is not None and tag >> 16 != 0x6000:
            assert dictionary_keyword(tag) == row["keyword"], row
    # nothing the profile removes, empties or replaces is on the allow-list, except the X/Z/U* reference
    # sequences (kept, their UIDs remapped, everything else inside removed)
    kept = sorted(r["keyword"] for r in E1_1_TABLE if r["keyword"] in KEEP and "U*" not in r["basic_profile"] and "K" not in r["basic_profile"])
    assert kept == []
    for kw in ("SendingApplicationEntityTitle", "StudyArrivalDate", "ClinicalTrialSubjectID", "ReasonForVisit", "LabelText",
               "BarcodeValue", "OverlayDescription", "OverlayLabel", "EncapsulatedDocument", "PrivateInformation"):
        assert kw in {r["keyword"] for r in E1_1_TABLE}, kw


def test_every_table_row_is_handled(tmp_path):
    """A value planted in every row of Table E.1-1 (file meta included) does not survive."""
    import pydicom
    from pydicom.datadict import dictionary_VR

    src = tmp_path / "in" / PATIENT_DIR
    src.mkdir(parents=True)
    path = make_dicom(src / "scan.dcm", (np.arange(64, dtype=np.uint16).reshape(8, 8) * 7), modality="CT",
                      position=(1.0, 2.0, 3.0), study_uid=STUDY_UID, series_uid=SERIES_UID)
    ds = pydicom.dcmread(path)
    planted: dict[str, object] = {}
    for idx, row in enumerate(E1_1_TABLE):
        tag = _table_tag(row)
        if tag is None or tag >> 16 == 0x0000:
            continue
        vr = dictionary_VR(tag).split(" or ")[0] if tag >> 16 != 0x6000 else {0x3000: "OW", 0x4000: "LT", 0x0022: "LO", 0x1500: "LO"}[tag & 0xFFFF]
        value = _planted_value(idx, vr)
        target = ds.file_meta if tag >> 16 == 0x0002 else ds
        target.add_new(tag, vr, value)
        planted[row["keyword"] or row["tag"]] = value
    ds.BurnedInAnnotation = "NO"
    ds.save_as(path, enforce_file_format=True)
    assert len(planted) >= 490
    summary = deidentify(tmp_path / "in", tmp_path / "out", secret="k")
    assert summary["written"] == 1 and not summary["errors"], summary
    (out_path,) = _outputs(tmp_path / "out")
    out = pydicom.dcmread(out_path)
    raw = out_path.read_bytes()
    survivors = []
    for kw, value in planted.items():
        if isinstance(value, str) and value not in ("101112",):
            if _grep(tmp_path / "out", [value]):
                survivors.append(kw)
        elif isinstance(value, bytes) and value in raw:
            survivors.append(kw)
        elif isinstance(value, list):  # sequences: kept only the X/Z/U* reference sequences, their contents cleaned
            if kw in out and kw not in KEEP:
                survivors.append(kw)
            for s in (value[0].CodeValue, value[0].CodeMeaning, value[0].ReferencedSOPInstanceUID):
                if s.encode() in raw:
                    survivors.append(kw)
        elif isinstance(value, (int, float)) and kw in out and kw not in KEEP:
            survivors.append(kw)
    assert survivors == []
    # the documented exception: times are kept (the date shift is whole days, so they stay consistent)
    assert out.StudyTime == "101112"
    assert PLANT_DATE not in str(out) and out.StudyDate != PLANT_DATE
    assert out.PatientIdentityRemoved == "YES"
    assert not any(e.tag.is_private for e in out.iterall())
    assert sorted(e.keyword for e in out.file_meta) == sorted(
        ["FileMetaInformationGroupLength", "FileMetaInformationVersion", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
         "TransferSyntaxUID", "ImplementationClassUID", "ImplementationVersionName"])


# ---------------------------------------------------------------------------------------------- the corpus

NAMES = ["DOE^JOHN", "ROE^JANE", "POE^EDGAR", "MOE^SIZLAK", "LOE^ANNABEL", "KOE^BERTRAND"]


def _testdata_files() -> list[Path]:
    """pydicom's bundled test files (local only: names from its data folder, resolved by get_testdata_file)."""
    from pydicom.data import get_testdata_file
    from pydicom.data.data_manager import DATA_ROOT

    names = sorted(n for n in os.listdir(Path(DATA_ROOT) / "test_files") if n.endswith(".dcm"))
    return [Path(get_testdata_file(n)) for n in names]


def _plant(ds, k: int, planted: list[str]) -> None:
    """Identifying values in every VR class, nested sequences, private tags, file meta, overlays, a PDF."""
    from pydicom.dataset import Dataset, FileMetaDataset

    p = k % len(NAMES)
    name = NAMES[p]
    mrn = f"MRN-99887{p}"

    def put(kw, value, into=ds):
        setattr(into, kw, value)
        if isinstance(value, str):
            planted.append(value)

    put("PatientName", name)
    put("PatientID", mrn)
    put("OtherPatientIDs", f"OPID-{k:03d}-ZQ")
    put("PatientBirthDate", "19510817")
    put("InstitutionName", f"St Elsewhere Hospital {k}")
    put("InstitutionAddress", f"{k} Harbour Road, Springfield")
    put("ReferringPhysicianName", f"HOUSE^GREGORY{k}")
    put("OperatorsName", f"OPERATOR^JIMMY{k}")
    put("AccessionNumber", f"ACC{k:05d}Q")
    put("StudyID", f"SID{k:04d}Q")
    put("StationName", f"STATION{k:03d}Q")
    put("StudyDescription", f"Scan of {name} after fall")
    put("ReasonForVisit", f"Follow-up for {name.split('^')[1]} {k}")
    put("ClinicalTrialSubjectID", f"SUBJ-{k:04d}-ZQ")
    put("ImageComments", f"patient {name} bed 7 ward {k}")
    put("AdditionalPatientHistory", f"History of {mrn} diabetes {k}")
    put("LabelText", f"LABEL {name} {k}")
    put("BarcodeValue", f"BARCODE{k:06d}ZQ")
    put("PerformedStationAETitle", f"PERFAE{k:03d}")
    put("RetrieveAETitle", f"RETRAE{k:03d}")
    put("RetrieveURL", f"http://pacs{k}.hospital.example/wado")
    put("StudyArrivalDate", "20190702")
    put("AcquisitionDateTime", "20190703081522")
    put("PatientAge", "067Y")
    ds.PatientWeight = 81.5
    ds.add_new(0x00089999, "LO", f"UNKNOWN-PUBLIC-{k}-ZQ")  # a public tag no dictionary knows
    planted.append(f"UNKNOWN-PUBLIC-{k}-ZQ")
    block = ds.private_block(0x0029, "ACME PHI", create=True)
    block.add_new(0x01, "LO", f"PRIVATE-{name}-{k}")
    planted.append(f"PRIVATE-{name}-{k}")
    # nested: a removed sequence and a kept one whose items carry identifying values and a private tag
    other = Dataset()
    put("PatientID", f"NESTED-ID-{k}-ZQ", other)
    put("IssuerOfPatientID", f"ISSUER-{k}-ZQ", other)
    ds.OtherPatientIDsSequence = [other]
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ref.ReferencedSOPInstanceUID = f"{PLANT_UID}{k}"
    planted.append(f"{PLANT_UID}{k}")
    put("InstitutionName", f"NESTED-HOSPITAL-{k}", ref)
    ref.private_block(0x0031, "ACME NESTED", create=True).add_new(0x01, "LO", f"NESTED-PRIVATE-{k}-ZQ")
    planted.append(f"NESTED-PRIVATE-{k}-ZQ")
    ds.ReferencedImageSequence = [ref]
    # overlays
    ds.add_new(0x60000010, "US", 2)
    ds.add_new(0x60000011, "US", 2)
    ds.add_new(0x60000022, "LO", f"OVERLAY-DESC-{name}")
    ds.add_new(0x60001500, "LO", f"OVERLAY-LABEL-{k}-ZQ")
    ds.add_new(0x60003000, "OW", b"\x0f\x00")
    planted += [f"OVERLAY-DESC-{name}", f"OVERLAY-LABEL-{k}-ZQ"]
    pdf = f"%PDF-1.4\n1 0 obj << /Title (Report for {name}) >>\nBT (EMBEDDED-PDF-{k}-ZQ) Tj ET\n%%EOF".encode("latin-1")
    ds.EncapsulatedDocument = pdf
    planted.append(f"EMBEDDED-PDF-{k}-ZQ")
    # file meta
    fm = getattr(ds, "file_meta", None) or FileMetaDataset()
    put("SourceApplicationEntityTitle", f"SRCAE{k:03d}", fm)
    put("SendingApplicationEntityTitle", f"SENDAE{k:03d}", fm)
    put("ReceivingApplicationEntityTitle", f"RECVAE{k:03d}", fm)
    put("SourcePresentationAddress", f"10.66.{k}.77:104", fm)
    fm.PrivateInformationCreatorUID = "1.2.826.0.1.3680043.8.498.5"
    fm.PrivateInformation = f"PRIVINFO {name} {k}".encode()
    planted.append(f"PRIVINFO {name} {k}")
    ds.file_meta = fm


def _originals(ds, planted: list[str]) -> None:
    """Instance UIDs and dates of the original file (they must not survive either)."""
    for e in ds.iterall():
        if e.VR == "UI" and e.value and not (e.keyword or "").endswith("ClassUID"):
            for v in (e.value if isinstance(e.value, list) else [e.value]):
                if str(v) and not str(v).startswith("1.2.840.10008."):
                    planted.append(str(v))
        if e.VR == "DA" and e.value:
            for v in (e.value if isinstance(e.value, list) else [e.value]):
                if len(str(v)) == 8:
                    planted.append(str(v))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """≥ 50 of pydicom's test files with identifying values planted, below patient-named folders."""
    import pydicom

    root = tmp_path_factory.mktemp("phi") / "in"
    planted: list[str] = []
    pixels: dict[str, bytes] = {}
    k = 0
    for f in _testdata_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f)
                _ = list(ds)
            if "SOPInstanceUID" not in ds or "PixelData" not in ds:
                continue
            mine: list[str] = []
            _originals(ds, mine)
            _plant(ds, k, mine)
            d = root / f"{NAMES[k % len(NAMES)].replace('^', '^')}_MRN-99887{k % len(NAMES)}" / f"visit {k // 6}"
            d.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.save_as(d / f"{f.stem}_{NAMES[k % len(NAMES)].split('^')[0]}.dcm")
        except Exception:
            continue  # a test file pydicom cannot rewrite (deliberately broken ones): not part of the corpus
        pixels[str((d / f"{f.stem}_{NAMES[k % len(NAMES)].split('^')[0]}.dcm").relative_to(root))] = ds.PixelData
        planted += mine
        k += 1
    return root, k, sorted(set(planted)), pixels


def test_corpus_zero_values_survive(corpus, tmp_path):
    root, n, planted, _ = corpus
    assert n >= 50
    out = tmp_path / "out"
    before = {p: _sha(p) for p in _outputs(root)}
    summary = deidentify(root, out, secret="corpus-secret", allow_burned_in=True, mapping_csv=tmp_path / "map.csv")
    assert {p: _sha(p) for p in _outputs(root)} == before  # input untouched
    assert summary["written"] + len(summary["errors"]) == n and summary["written"] >= 50, summary["errors"]
    # every path is pseudonym / study / series / sop, none of the input's names
    for p in _outputs(out):
        parts = p.relative_to(out).parts
        assert len(parts) == 4 and parts[0].startswith("ANON-") and parts[3].endswith(".dcm"), parts
        assert all(re.fullmatch(r"[0-9.]+", x) for x in (parts[1], parts[2], parts[3][:-4])), parts
    # the planted folder and file names: patient folders in full and their name / MRN parts, file stems in full
    # (the words of pydicom's own file names, such as JPEG, also occur in compressed pixel data)
    path_parts = set()
    for p in _outputs(root):
        patient, _, _ = p.relative_to(root).parts
        path_parts |= {patient, p.stem, *(t for t in re.split(r"[^A-Za-z0-9]+", patient) if len(t) >= 4)}
    hits = _grep(out, planted + sorted(path_parts))
    assert hits == [], hits[:10]
    # patient-level pseudonyms: one per planted patient, the same for all of a patient's files
    assert len({p.relative_to(out).parts[0] for p in _outputs(out)}) == len(NAMES)
    with open(tmp_path / "map.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(r["kind"] == "file" for r in rows) == summary["written"]


@pytest.mark.slow
def test_corpus_reads_identically(corpus, tmp_path):
    """De-identified outputs read with read_image to the same pixels (uncompressed files)."""
    import pydicom

    root, _, _, _ = corpus
    out = tmp_path / "out"
    deidentify(root, out, secret="s", allow_burned_in=True, mapping_csv=tmp_path / "map.csv")
    with open(tmp_path / "map.csv", newline="") as fh:
        files = {r["original"]: r["new"] for r in csv.DictReader(fh) if r["kind"] == "file"}
    compared = 0
    for old, new in files.items():
        try:
            a, ma = read_image(root / old)
        except MedsightError:
            continue
        ts = pydicom.dcmread(root / old, stop_before_pixels=True).file_meta.TransferSyntaxUID
        b, mb = read_image(out / new)
        if not ts.is_compressed:
            np.testing.assert_array_equal(a, b)
            compared += 1
        assert (ma.get("spacing"), ma.get("modality")) == (mb.get("spacing"), mb.get("modality"))
    assert compared >= 15


# ---------------------------------------------------------------------------------------------- behaviour


@pytest.fixture
def study(tmp_path):
    src = tmp_path / "in" / PATIENT_DIR / "series"
    src.mkdir(parents=True)
    px = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 97).astype(np.uint16)
    extra = {"PatientID": "PID-777", "PatientName": "Doe^Jane", "PatientBirthDate": "19700101", "StudyDate": "20200315",
             "AcquisitionDate": "20200320", "FrameOfReferenceUID": FOR_UID, "BurnedInAnnotation": "NO"}
    a = make_dicom(src / "a.dcm", px, modality="CT", position=(0.0, 0.0, 0.0), study_uid=STUDY_UID, series_uid=SERIES_UID,
                   extra=extra)
    b = make_dicom(src / "b.dcm", px + 1, modality="CT", position=(0.0, 0.0, 2.5), study_uid=STUDY_UID, series_uid=SERIES_UID,
                   extra={**extra, "AcquisitionDate": "20200401"})
    import pydicom

    ds = pydicom.dcmread(b)
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = pydicom.dcmread(a).SOPInstanceUID
    ds.ReferencedImageSequence = [item]
    ds.save_as(b, enforce_file_format=True)
    (tmp_path / "in" / "notes.txt").write_text("Jane Doe's scan")
    return tmp_path / "in", a, b


def _by_sop(out: Path, map_csv: Path) -> dict[str, Path]:
    with open(map_csv, newline="") as fh:
        return {Path(r["original"]).name: out / r["new"] for r in csv.DictReader(fh) if r["kind"] == "file"}


def test_uids_consistent_dates_shifted_pixels_identical(study, tmp_path):
    import pydicom

    src, a, b = study
    summary = deidentify(src, tmp_path / "out", secret="s3cret", mapping_csv=tmp_path / "map.csv")
    assert summary["written"] == 2 and summary["skipped"] == ["notes.txt"] and not summary["errors"]
    files = _by_sop(tmp_path / "out", tmp_path / "map.csv")
    oa, ob = pydicom.dcmread(files["a.dcm"]), pydicom.dcmread(files["b.dcm"])
    ia, ib = pydicom.dcmread(a), pydicom.dcmread(b)
    assert oa.StudyInstanceUID == ob.StudyInstanceUID != STUDY_UID
    assert oa.SeriesInstanceUID == ob.SeriesInstanceUID != SERIES_UID
    assert oa.FrameOfReferenceUID == ob.FrameOfReferenceUID != FOR_UID
    assert oa.SOPInstanceUID != ob.SOPInstanceUID and oa.SOPInstanceUID != ia.SOPInstanceUID
    assert oa.file_meta.MediaStorageSOPInstanceUID == oa.SOPInstanceUID
    assert oa.file_meta.ImplementationClassUID == deid_mod.implementation_class_uid()
    assert oa.SOPClassUID == ia.SOPClassUID  # class UIDs are kept
    assert ob.ReferencedImageSequence[0].ReferencedSOPInstanceUID == oa.SOPInstanceUID  # reference follows the remap
    assert oa.PatientID == ob.PatientID == oa.PatientName and oa.PatientID.startswith("ANON-")
    assert files["a.dcm"].relative_to(tmp_path / "out").as_posix() == (
        f"{oa.PatientID}/{oa.StudyInstanceUID}/{oa.SeriesInstanceUID}/{oa.SOPInstanceUID}.dcm")

    def d(s):
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))

    assert ob.StudyDate != ib.StudyDate
    assert (d(ob.AcquisitionDate) - d(ob.StudyDate)) == (d(ib.AcquisitionDate) - d(ib.StudyDate))
    assert (d(oa.StudyDate) - d(ia.StudyDate)) == (d(ob.StudyDate) - d(ib.StudyDate))  # one offset per patient
    assert oa.PixelData == ia.PixelData and ob.PixelData == ib.PixelData
    assert oa.PatientBirthDate in ("", None)
    assert oa.PatientIdentityRemoved == "YES" and "allow-list" in str(oa.DeidentificationMethod)
    assert [c.CodeValue for c in oa.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    # the readers still work: same pixels, same geometry, and the two files still form one series
    for i, o in ((a, files["a.dcm"]), (b, files["b.dcm"])):
        x, mx = read_image(i)
        y, my = read_image(o)
        np.testing.assert_array_equal(x, y)
        assert mx["spacing"] == my["spacing"]
    vol, meta = read_image(files["a.dcm"].parent)
    np.testing.assert_array_equal(vol, read_image(a.parent)[0])


def test_deterministic_per_secret_and_mapping(study, tmp_path):
    src, *_ = study
    deidentify(src, tmp_path / "o1", secret="k1")
    deidentify(src, tmp_path / "o2", secret="k1")
    deidentify(src, tmp_path / "o3", secret="k2", mapping_csv=tmp_path / "map.csv")
    rel = lambda root: sorted(p.relative_to(root).as_posix() for p in _outputs(root))  # noqa: E731
    assert rel(tmp_path / "o1") == rel(tmp_path / "o2") != rel(tmp_path / "o3")
    with open(tmp_path / "map.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"kind", "original", "new"} == set(rows[0])
    assert any(r["kind"] == "uid" and r["original"] == STUDY_UID and r["new"] in rel(tmp_path / "o3")[0] for r in rows)
    assert any(r["kind"] == "patient" and r["original"] == "PID-777" for r in rows)


def test_burned_in_held_back_unless_allowed(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    px = np.zeros((8, 8), np.uint8)
    make_dicom(src / "us.dcm", px, modality="US")  # risky modality, no BurnedInAnnotation
    make_dicom(src / "sc.dcm", px, modality="CT")  # Secondary Capture SOP class (make_dicom's default)
    make_dicom(src / "flag.dcm", px, modality="CT", extra={"BurnedInAnnotation": "YES"})
    make_dicom(src / "ok.dcm", px, modality="US", extra={"BurnedInAnnotation": "NO"})
    held = deidentify(src, tmp_path / "held")
    assert held["written"] == 1 and sorted(held["burned_in"]) == ["flag.dcm", "sc.dcm", "us.dcm"]
    assert held["burned_in_written"] is False and len(_outputs(tmp_path / "held")) == 1
    allowed = deidentify(src, tmp_path / "all", allow_burned_in=True)
    assert allowed["written"] == 4 and sorted(allowed["burned_in"]) == ["flag.dcm", "sc.dcm", "us.dcm"]
    assert allowed["burned_in_written"] is True


def test_keep_private(study, tmp_path):
    import pydicom

    src, a, _ = study
    ds = pydicom.dcmread(a)
    ds.private_block(0x0011, "ACME", create=True).add_new(0x01, "LO", "scanner setting 7")
    ds.save_as(a, enforce_file_format=True)
    deidentify(src, tmp_path / "kp", keep_private=True)
    assert any(any(e.tag.is_private for e in pydicom.dcmread(p)) for p in _outputs(tmp_path / "kp"))
    assert all("private attributes: kept" in str(pydicom.dcmread(p).DeidentificationMethod) for p in _outputs(tmp_path / "kp"))
    deidentify(src, tmp_path / "rp")
    assert not any(any(e.tag.is_private for e in pydicom.dcmread(p)) for p in _outputs(tmp_path / "rp"))
    # a kept private tag that repeats the patient's name is caught by the verifier
    ds.private_block(0x0011, "ACME", create=True).add_new(0x02, "LO", "Doe^Jane")
    ds.save_as(a, enforce_file_format=True)
    summary = deidentify(src, tmp_path / "kp2", keep_private=True)  # that file is held back, listed by input path
    rel = str(a.relative_to(src))
    assert [e["path"] for e in summary["errors"]] == [rel], summary["errors"]
    assert re.fullmatch(r"verifier: a person name from this file survived in its output; not written", summary["errors"][0]["error"])
    assert summary["written"] == len(_outputs(tmp_path / "kp2")) == 1  # the other file is written
    assert not any(b"Doe" in p.read_bytes() for p in _outputs(tmp_path / "kp2"))


def test_verifier_holds_back_the_leaking_file_only(study, tmp_path, monkeypatch, caplog):
    import pydicom

    src, a, _ = study
    ds = pydicom.dcmread(a)
    ds.SeriesDescription = "Doe^Jane knee"
    ds.save_as(a, enforce_file_format=True)
    monkeypatch.setattr(deid_mod, "KEEP", KEEP | {"SeriesDescription"})  # a broken allow-list
    out = tmp_path / "out"
    summary = deidentify(src, out, secret="x")
    rel = str(a.relative_to(src))
    assert [e["path"] for e in summary["errors"]] == [rel]
    msg = summary["errors"][0]["error"]
    assert re.fullmatch(r"verifier: an? (person name|identifier or text) from this file survived in its output; not written", msg), msg
    assert "Doe" not in msg and "Jane" not in msg and "Doe" not in caplog.text
    assert summary["written"] == len(_outputs(out)) == 1 and not list(tmp_path.glob(".medsight-deid-*"))
    assert not any(b"Doe" in p.read_bytes() for p in _outputs(out))
    assert "medsight-deid" not in msg and str(tmp_path) not in msg  # never a temporary path
    # a leak into the output path is caught too
    assert deid_mod._path_needles(Path("DOE^JOHN_MRN-998877/x.dcm"))["998877"] == "file or folder name"
    work = tmp_path / "w" / "998877"
    work.mkdir(parents=True)
    (work / "f.dcm").write_bytes(b"")
    with pytest.raises(DataError, match="file or folder name from the input survived in the output path"):
        deid_mod.verify(tmp_path / "w", {"998877": "file or folder name"}, {})


def test_errors(study, tmp_path):
    src, *_ = study
    with pytest.raises(DataError, match="must be outside the input folder"):
        deidentify(src, src / "out")
    with pytest.raises(DataError, match="not a folder"):
        deidentify(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="exists and is not a folder"):
        deidentify(src, tmp_path / "file")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        deidentify(src, tmp_path / "full")
    with pytest.raises(DataError, match="write it outside the input and output folders"):
        deidentify(src, tmp_path / "o6", mapping_csv=tmp_path / "o6" / "map.csv")
    with pytest.raises(DataError, match="secret is empty"):
        deidentify(src, tmp_path / "o5", secret="")
    bad = src / "broken.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 10)
    (tmp_path / "empty").mkdir()
    summary = deidentify(src, tmp_path / "empty")
    assert summary["written"] == 2
    assert [e["path"] for e in summary["errors"]] == ["broken.dcm"]


def test_every_date_shifts_by_one_offset_times_kept(tmp_path):
    import pydicom

    src = tmp_path / "in"
    src.mkdir()
    make_dicom(src / "a.dcm", np.zeros((4, 4), np.uint16), modality="MR",
               extra={"PatientID": "P1", "StudyDate": "20200315", "StudyArrivalDate": "20200314", "StudyTime": "081500",
                      "AcquisitionDateTime": "20200316093000.25+0100", "LastMenstrualDate": "20200201",
                      "ContentDate": "20200101-20200131", "BurnedInAnnotation": "NO"})
    deidentify(src, tmp_path / "out", secret="k")
    (out,) = _outputs(tmp_path / "out")
    ds = pydicom.dcmread(out)

    def d(s):
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))

    shift = d(ds.StudyDate) - d("20200315")
    assert -3650 <= shift.days <= -1
    for kw, orig in (("StudyArrivalDate", "20200314"), ("LastMenstrualDate", "20200201"), ("AcquisitionDateTime", "20200316")):
        assert d(str(ds[kw].value)) - d(orig) == shift, kw  # StudyArrivalDate no longer gives the offset away
    assert str(ds.AcquisitionDateTime)[8:] == "093000.25+0100" and ds.StudyTime == "081500"
    assert ds.ContentDate in ("", None)  # a range is dropped, not half shifted


def test_verifier_on_crafted_bytes(tmp_path):
    """verify() itself: bounded matches, UTF-16, kept values excused, one line without the value."""
    root = tmp_path / "w"
    root.mkdir()
    f = root / "x.dcm"
    needles = {"DOE^JOHN": "person name", "1.2.3.4": "UID", "YBR": "file or folder name", "MRN-998877": "identifier or text"}
    f.write_bytes(b"\x00" * 16 + b"1.2.3.45\x00YBR_FULL_422\x00" + b"xDOE^JOHNx")  # no hit: all part of longer runs
    deid_mod.verify(root, needles, {"x.dcm": {"YBR_FULL_422"}})
    with pytest.raises(DataError, match="a file or folder name from the input survived in x.dcm"):
        deid_mod.verify(root, needles, {})  # YBR is a token of YBR_FULL_422 when that value is not a kept one
    f.write_bytes(b"\x00" * 16 + "MRN-998877".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"^de-identification verifier: an identifier or text from the input survived in x\.dcm; nothing written$"):
        deid_mod.verify(root, needles, {})
    f.write_bytes(b"\x01" + "MRN-998877".encode("utf-16-le"))  # odd alignment
    with pytest.raises(DataError, match="identifier or text"):
        deid_mod.verify(root, needles, {})
    f.write_bytes(b"ab 1.2.3.4\x00")
    with pytest.raises(DataError, match="a UID from the input"):
        deid_mod.verify(root, needles, {})


def test_verifier_catches_a_leak_in_the_corpus(corpus, tmp_path, monkeypatch):
    root, *_ = corpus
    monkeypatch.setattr(deid_mod, "KEEP", KEEP | {"InstitutionName"})  # a broken allow-list
    summary = deidentify(root, tmp_path / "out", secret="s", allow_burned_in=True)
    leaks = [e for e in summary["errors"] if e["error"].startswith("verifier: an identifier or text from this file")]
    assert leaks, summary["errors"]  # files holding an institution name are held back, by input path
    assert all((root / e["path"]).is_file() for e in leaks)
    assert summary["written"] == len(_outputs(tmp_path / "out"))  # the corpus plants an institution in every file
