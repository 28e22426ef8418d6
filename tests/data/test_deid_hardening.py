"""deid hardening: identifiers planted in codestream segments, the preamble and deflated files do not survive (an
independent byte grep), pixels decode identically; a fuzzed folder is handled per file; outputs are private."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from medsight.data import deid as deid_mod
from medsight.data.deid import deidentify

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from _subproc import env, medsight_cmd  # noqa: E402 (after the sys.path line)

PLANT = b"Patient SMITH^JOHN MRN 12345 Acc A999"
TOKENS = (b"SMITH", b"JOHN", b"12345", b"A999")


def _testfile(name: str) -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file(name)


def _segment(marker: int, body: bytes) -> bytes:
    return struct.pack(">HH", marker, len(body) + 2) + body


def _plant_jpeg(frame: bytes) -> bytes:
    """COM + APP1 + APP13 right after SOI, and a COM just before EOI (between scans' end and EOI)."""
    assert frame[:2] == b"\xff\xd8"
    planted = _segment(0xFFFE, PLANT) + _segment(0xFFE1, b"Exif\0\0" + PLANT) + _segment(0xFFED, PLANT)
    end = frame.rindex(b"\xff\xd9")
    return frame[:2] + planted + frame[2:end] + _segment(0xFFFE, PLANT) + frame[end:]


def _plant_j2k(frame: bytes) -> bytes:
    """A COM in the main header (after SIZ) and one in the first tile-part header (after SOT; Psot adjusted)."""
    assert frame[:4] == b"\xff\x4f\xff\x51"
    siz_len = int.from_bytes(frame[4:6], "big")
    cut = 4 + siz_len
    com = _segment(0xFF64, b"\x00\x01" + PLANT)  # Rcom 1: Latin text
    out = bytearray(frame[:cut] + com + frame[cut:])
    sot = out.index(b"\xff\x90")
    psot = struct.unpack(">I", out[sot + 6:sot + 10])[0]
    out = out[:sot + 12] + com + out[sot + 12:]
    if psot:
        struct.pack_into(">I", out, sot + 6, psot + len(com))
    return bytes(out)


def _new_sop(ds) -> None:
    from pydicom.uid import generate_uid

    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()


def _planted_file(src: str, dst: Path, plant) -> Path:
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(src)
    n = int(ds.get("NumberOfFrames") or 1)
    frames = [plant(f) for f in generate_frames(ds.PixelData, number_of_frames=n)]
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].is_undefined_length = True
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "SMITH^JOHN", "12345", "A999"
    _new_sop(ds)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    import pydicom

    d = tmp_path_factory.mktemp("planted")
    cases = {
        "jpeg_baseline.dcm": ("SC_rgb_jpeg_dcmtk.dcm", _plant_jpeg),
        "jpeg_app14.dcm": ("SC_rgb_jpeg_app14_dcmd.dcm", _plant_jpeg),
        "jpeg_ls.dcm": ("MR_small_jpeg_ls_lossless.dcm", _plant_jpeg),
        "j2k.dcm": ("MR_small_jp2klossless.dcm", _plant_j2k),
        "j2k_lossy.dcm": ("JPEG2000.dcm", _plant_j2k),
        "jls_lossy.dcm": ("SC_rgb_jls_lossy_line.dcm", _plant_jpeg),
        "jpeg_30_frames.dcm": ("examples_ybr_color.dcm", _plant_jpeg),  # every frame planted
    }
    for name, (src, plant) in cases.items():
        _planted_file(_testfile(src), d / name, plant)
    ds = pydicom.dcmread(_testfile("MR_small.dcm"))  # the preamble holds the text
    ds.preamble = PLANT.ljust(128, b" ")
    ds.PatientName, ds.PatientID = "SMITH^JOHN", "12345"
    _new_sop(ds)
    ds.save_as(d / "preamble.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(_testfile("image_dfl.dcm"))  # deflated, text in a header element
    ds.ImageComments = PLANT.decode()
    ds.PatientName, ds.PatientID = "SMITH^JOHN", "12345"
    _new_sop(ds)
    ds.save_as(d / "deflated.dcm", enforce_file_format=True)
    assert pydicom.dcmread(d / "deflated.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    return d


def _pixels(path) -> np.ndarray:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(pydicom.dcmread(path).pixel_array)


def test_planted_identifiers_do_not_survive_and_pixels_are_identical(planted, tmp_path):
    raw = {p.name: p.read_bytes() for p in planted.iterdir()}
    assert all(PLANT in b or p == "deflated.dcm" for p, b in raw.items())  # planted where the test says
    out = tmp_path / "out"
    summary = deidentify(planted, out, secret="s", allow_burned_in=True)
    assert summary["written"] == len(raw) and not summary["errors"], summary["errors"]
    outputs = sorted(p for p in out.rglob("*.dcm"))
    assert len(outputs) == len(raw)
    for p in outputs:  # the independent grep: raw bytes, and inflated where deflated
        data = p.read_bytes()
        assert data[:128] == b"\0" * 128
        views = [data, data.decode("latin-1").encode("utf-16-le")]
        for tok in TOKENS:
            assert not any(tok in v or tok.decode().encode("utf-16-le") in v for v in views), (p, tok)
    import pydicom

    by_sop = {}
    for p in outputs:
        by_sop[str(pydicom.dcmread(p).SOPInstanceUID)] = p
    ctx = deid_mod._Context(b"s")
    for name in raw:
        src_ds = pydicom.dcmread(planted / name)
        out_path = by_sop[ctx.uid(str(src_ds.SOPInstanceUID))]
        np.testing.assert_array_equal(_pixels(planted / name), _pixels(out_path))


def test_app14_adobe_is_kept(planted, tmp_path):
    import pydicom
    from pydicom.encaps import generate_frames

    from medsight.data.readers.codestream import strip_jpeg

    ds = pydicom.dcmread(planted / "jpeg_app14.dcm")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    out = strip_jpeg(frame)
    assert b"\xff\xeeAdobe" not in out and b"Adobe" in out and PLANT not in out  # cut to its 12 defined bytes
    assert b"\xff\xfe" not in out[:out.index(b"\xff\xda")]


def test_verifier_reads_codestream_segments_and_deflated_outputs(planted, tmp_path):
    """find_leak sees text in a JPEG COM and in a deflated data set, where a raw byte search would not."""
    hit = deid_mod.find_leak(planted / "jpeg_ls.dcm", "x.dcm", {"SMITH^JOHN MRN": "free text"}, set())
    assert hit is not None
    import pydicom

    ds = pydicom.dcmread(planted / "deflated.dcm")
    ds.PatientName = "ANON"
    ds.PatientID = "ANON"  # only the ImageComments text is left, deflated
    path = tmp_path / "dfl.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert b"SMITH" not in path.read_bytes()
    assert deid_mod.find_leak(path, "dfl.dcm", {"SMITH": "person name"}, set()) == ("SMITH", "person name", False)


def _fuzz(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 12)):
        op = rng.random()
        i = rng.randrange(len(b))
        if op < 0.5:
            b[i] = rng.randrange(256)
        elif op < 0.7:
            del b[i:i + rng.randint(1, 64)]
        elif op < 0.85:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        else:
            j = rng.randrange(len(b))
            b[i:i + 4] = b[j:j + 4]
    return bytes(b)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    from tests.data.conftest import make_dicom as make_dicom_file

    d = tmp_path_factory.mktemp("fuzz")
    (d / "clean").mkdir()
    for k in range(20):
        make_dicom_file(d / "clean" / f"c{k:02d}.dcm", (np.arange(64, dtype=np.uint16).reshape(8, 8) * (k + 1)),
                        modality="CT", extra={"PatientName": f"CLEANNAME^P{k:02d}", "PatientID": f"CLEANID{k:02d}",
                                              "BurnedInAnnotation": "NO"})
    rng = random.Random(1234)
    bases = [Path(_testfile(n)).read_bytes() for n in ("MR_small.dcm", "CT_small.dcm", "SC_rgb_rle.dcm",
                                                       "MR_small_jpeg_ls_lossless.dcm", "image_dfl.dcm")]
    (d / "fuzz").mkdir()
    for k in range(200):
        (d / "fuzz" / f"f{k:03d}.dcm").write_bytes(_fuzz(bases[k % len(bases)], rng))
    return d


def test_fuzzed_folder_is_handled_per_file(fuzzed, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(medsight_cmd("deid", str(fuzzed), str(out), "--allow-burned-in"), capture_output=True,
                       text=True, env=env(), timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    held = [line.strip()[len("error: "):] for line in r.stdout.splitlines() if line.strip().startswith("error: ")]
    assert held, r.stdout[-2000:]
    for line in held:
        path, reason = line.split(": ", 1)
        assert path.startswith("fuzz/") and (fuzzed / path).is_file() and reason, line
        assert "medsight-deid" not in reason
    import pydicom

    outs = list(out.rglob("*.dcm"))
    written_clean = set()
    for p in outs:
        data = p.read_bytes()
        assert b"CLEANNAME" not in data and b"CLEANID" not in data
        ds = pydicom.dcmread(p)
        v = int(ds.pixel_array.reshape(-1)[1]) if ds.get("Rows") == 8 and ds.get("Columns") == 8 else None
        if v is not None:
            written_clean.add(v)
    assert written_clean >= {k + 1 for k in range(20)}  # every clean file written (pixel value 1 x (k+1))
    assert len(outs) + len(held) <= 220


def test_outputs_and_mapping_are_private_under_a_permissive_umask(fuzzed, tmp_path):
    old = os.umask(0)
    try:
        out, mp = tmp_path / "o", tmp_path / "m" / "map.csv"
        summary = deidentify(fuzzed / "clean", out, mapping_csv=mp, secret="s")
    finally:
        os.umask(old)
    assert summary["written"] == 20
    assert mp.stat().st_mode & 0o777 == 0o600
    for p in out.rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p
    assert out.stat().st_mode & 0o777 == 0o700


def test_per_file_function_is_order_free(fuzzed, tmp_path):
    """deidentify_file: the same secret gives the same output path whichever file comes first, in any process."""
    files = sorted((fuzzed / "clean").glob("*.dcm"))[:3]
    a = [deid_mod.deidentify_file(f, tmp_path / "a", secret="k")["output"] for f in files]
    b = [deid_mod.deidentify_file(f, tmp_path / "b", secret="k")["output"] for f in reversed(files)]
    assert a == list(reversed(b)) and all(a)
    with pytest.raises(deid_mod.DataError, match=r"^cannot de-identify f\.dcm: "):
        bad = tmp_path / "f.dcm"
        bad.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
        deid_mod.deidentify_file(bad, tmp_path / "c", secret="k")


def test_run_wide_hit_names_the_input_it_came_from(tmp_path):
    """B keeps (keep_private) a private value equal to A's patient ID: B's own values do not include it, the
    run-wide check does; B is held back and the reason names A's input path, never the value."""
    from tests.data.conftest import make_dicom

    import pydicom

    src = tmp_path / "in"
    src.mkdir()
    px = np.arange(64, dtype=np.uint16).reshape(8, 8)
    make_dicom(src / "a.dcm", px, extra={"PatientID": "PATIENTXYZ123", "PatientName": "ALPHA^ONE"})
    b = make_dicom(src / "b.dcm", px + 1, extra={"PatientID": "OTHER777", "PatientName": "BETA^TWO"})
    ds = pydicom.dcmread(b)
    ds.private_block(0x0011, "ACME", create=True).add_new(0x01, "LO", "PATIENTXYZ123")
    ds.save_as(b, enforce_file_format=True)
    summary = deidentify(src, tmp_path / "out", secret="s", keep_private=True, allow_burned_in=True)
    assert summary["written"] == 1
    assert summary["errors"] == [{"path": "b.dcm", "error": "verifier: a patient identifier of a.dcm survived in its "
                                                            "output; not written"}]
    assert not any(b"PATIENTXYZ123" in p.read_bytes() for p in (tmp_path / "out").rglob("*.dcm"))


@pytest.mark.slow
def test_thousand_fuzzed_files_plus_twenty_clean(tmp_path):
    from tests.data.conftest import make_dicom

    d = tmp_path / "in"
    (d / "clean").mkdir(parents=True)
    for k in range(20):
        make_dicom(d / "clean" / f"c{k:02d}.dcm", np.full((8, 8), k + 1, np.uint16), modality="CT",
                   extra={"PatientName": f"CLEANNAME^P{k:02d}", "PatientID": f"CLEANID{k:02d}", "BurnedInAnnotation": "NO"})
    rng = random.Random(99)
    bases = [Path(_testfile(n)).read_bytes() for n in ("MR_small.dcm", "CT_small.dcm", "SC_rgb_rle.dcm",
                                                       "MR_small_jpeg_ls_lossless.dcm", "image_dfl.dcm",
                                                       "MR_small_jp2klossless.dcm")]
    (d / "fuzz").mkdir()
    for k in range(1000):
        (d / "fuzz" / f"f{k:04d}.dcm").write_bytes(_fuzz(bases[k % len(bases)], rng))
    summary = deidentify(d, tmp_path / "out", secret="s", allow_burned_in=True)
    assert summary["errors"] and all((d / e["path"]).is_file() and e["error"] for e in summary["errors"])
    import pydicom

    values = set()
    for p in (tmp_path / "out").rglob("*.dcm"):
        data = p.read_bytes()
        assert b"CLEANNAME" not in data and b"CLEANID" not in data
        ds = pydicom.dcmread(p)
        if ds.get("Rows") == 8 and ds.get("Columns") == 8:
            values.add(int(ds.pixel_array[0, 0]))
    assert values >= set(range(1, 21))
