"""Decompression bombs and lying headers: each refused with one line, fast, in little memory, before decoding.

The corpus is built here (nothing is downloaded): deflated DICOM that inflates to 4 GiB, JPEG / JPEG-LS /
JPEG 2000 / RLE DICOM whose codestream disagrees with Rows/Columns, ``.nii.gz`` with huge dims or a gzip
tail of 4 GiB of zeros, a PNG claiming 100000 x 100000 pixels, and multi-frame / 3D input for a 2D model.
Each goes through ``read_image_bytes`` with a model's budget in a fresh subprocess (time and peak RSS measured
there) and through ``medsight predict`` (exit status, one line per file, no traceback).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from medsight.data.io import DecodeBudget, budget_for, decode_isolated, read_image, read_image_bytes
from medsight.errors import DataError

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
from _subproc import env, medsight_cmd  # noqa: E402

GiB = 1 << 30
MODEL_2D = (1, 28, 28)  # the served test bundle's input


def _pydicom_file(name: str) -> bytes:
    import pydicom

    return (Path(pydicom.__file__).parent / "data" / "test_files" / name).read_bytes()


def _zeros_deflate(n_mib: int, prefix: bytes, wbits: int) -> bytes:
    """A deflate stream of ``prefix`` + ``n_mib`` MiB of zeros, built from one repeated full-flush block
    (so a 4 GiB payload costs milliseconds and ~4 MiB to build)."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(b"\0" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return head + block * n_mib + c.flush()


def _explicit_le(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _image_ds(rows=512, cols=512, *, pixels: bool = True):
    from pydicom.dataset import Dataset
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if pixels:
        ds.PixelData = np.zeros((rows, cols), np.uint16).tobytes()
    return ds


def _part10(ds_bytes: bytes, ts: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ts
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, fm)
    return b"\0" * 128 + b"DICM" + fp.getvalue() + ds_bytes


def deflated_trailing_bomb() -> bytes:
    """Honest 512x512 image, then a Data Set Trailing Padding element of 4 GiB of zeros: 4 MiB deflated."""
    body = _explicit_le(_image_ds()) + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, 4 * GiB - 2)
    return _part10(_zeros_deflate(4096, body, -15), "1.2.840.10008.1.2.1.99")


def deflated_pixel_bomb() -> bytes:
    """Pixel Data whose length field says 4 GiB (Rows/Columns 512): 4 MiB deflated."""
    body = _explicit_le(_image_ds(pixels=False)) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 4 * GiB - 2)
    return _part10(_zeros_deflate(4096, body, -15), "1.2.840.10008.1.2.1.99")


def _patch(data: bytes, at: int, fmt: str, *values) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, *values)
    return bytes(b)


def j2k_lying() -> bytes:
    """MR_small as JPEG 2000: header 64x64, codestream SIZ patched to 60000x60000."""
    raw = _pydicom_file("MR_small_jp2klossless.dcm")
    i = raw.index(b"\xff\x4f\xff\x51", raw.index(b"\xe0\x7f\x10\x00"))
    return _patch(raw, i + 8, ">2I", 60000, 60000)


def jpegls_lying() -> bytes:
    """MR_small as JPEG-LS: SOF55 patched to 60000x60000 (header 64x64)."""
    raw = _pydicom_file("MR_small_jpeg_ls_lossless.dcm")
    i = raw.index(b"\xff\xf7", raw.index(b"\xe0\x7f\x10\x00"))
    return _patch(raw, i + 5, ">2H", 60000, 60000)


def jpeg_lying() -> bytes:
    """An RGB baseline JPEG DICOM whose SOF says 60000x60000 (header 100x100)."""
    raw = _pydicom_file("SC_rgb_jpeg_dcmtk.dcm")
    i = raw.index(b"\xff\xc0", raw.index(b"\xe0\x7f\x10\x00"))
    return _patch(raw, i + 5, ">2H", 60000, 60000)


def rle_lying() -> bytes:
    """RLE with a segment table that disagrees with the header (15 segments for 3 samples x 8 bits),
    offsets pointing far outside the frame."""
    raw = _pydicom_file("SC_rgb_rle.dcm")
    px = raw.index(b"\xe0\x7f\x10\x00")
    frame = raw.index(b"\x03\x00\x00\x00\x40\x00\x00\x00", px)  # header: 3 segments, first at 64
    return _patch(raw, frame, "<16I", 15, *[64 + k * 0x7FFFFFF for k in range(15)])


def multiframe_dicom() -> bytes:
    """A valid 64-frame 16x16 image: fine for a volume model, refused before decoding for a 2D model."""
    ds = _image_ds(16, 16, pixels=False)
    ds.NumberOfFrames = 64
    ds.PixelData = np.zeros((64, 16, 16), np.uint16).tobytes()
    return _part10(_explicit_le(ds), "1.2.840.10008.1.2.1")


def _nifti1_header(dims: tuple[int, ...], datatype=4, bitpix=16) -> bytes:
    h = bytearray(348)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    struct.pack_into("<hh", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", h, 108, 352.0)
    h[344:348] = b"n+1\0"
    return bytes(h) + b"\0" * 4


def nifti_huge_dims() -> bytes:
    """.nii.gz whose header says 32000x32000 int16 (a few hundred bytes compressed)."""
    return gzip.compress(_nifti1_header((32000, 32000)) + b"\0" * 4096)


def nifti_zero_tail() -> bytes:
    """.nii.gz with an honest 64x64 header followed by 4 GiB of zeros in the gzip stream."""
    body = _nifti1_header((64, 64))
    deflate = _zeros_deflate(4096, body, 31)  # wbits 31: gzip container
    return deflate


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR says width x height RGB, with a tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def nifti_volume() -> bytes:
    """A valid 28x28x28 volume: refused before decoding for a 2D model."""
    return gzip.compress(_nifti1_header((28, 28, 28)) + b"\0" * (28 ** 3 * 2))


#: name -> (builder, expected words in the one-line refusal)
BOMBS = {
    "deflate_tail.dcm": (deflated_trailing_bomb, "inflates beyond the limit"),
    "deflate_pixels.dcm": (deflated_pixel_bomb, "declares"),
    "j2k_lying.dcm": (j2k_lying, "60000x60000"),
    "jpegls_lying.dcm": (jpegls_lying, "60000x60000"),
    "jpeg_lying.dcm": (jpeg_lying, "60000x60000"),
    "rle_lying.dcm": (rle_lying, "RLE header lists 15 segments"),
    "huge_dims.nii.gz": (nifti_huge_dims, "above the limit"),
    "zero_tail.nii.gz": (nifti_zero_tail, None),  # honest header: read within budget or refused, never inflated
    "huge.png": (lambda: png_claiming(100000, 100000), "decompression bomb"),  # Pillow's own limit, at open
    "big.png": (lambda: png_claiming(8000, 8000), "above the limit of 50331648"),  # the 2D model's budget
    "multiframe.dcm": (multiframe_dicom, "64 frames/slices; the model takes at most 1"),
    "volume.nii.gz": (nifti_volume, "28 frames/slices; the model takes at most 1"),
}


@pytest.fixture(scope="module")
def bomb_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bombs")
    for name, (build, _) in BOMBS.items():
        (d / name).write_bytes(build())
    return d


def test_corpus_is_small(bomb_dir):
    sizes = {f.name: f.stat().st_size for f in bomb_dir.iterdir()}
    assert max(sizes.values()) < 8 << 20, sizes  # the deflated 4 GiB payloads are ~4 MiB on disk


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bomb_refused_in_process(bomb_dir, name):
    data = (bomb_dir / name).read_bytes()
    budget = budget_for(MODEL_2D)
    expected = BOMBS[name][1]
    if expected is None:  # the zero tail is never inflated: the image reads as its honest 64x64 header says
        arr, _ = read_image_bytes(data, name, budget=budget)
        assert arr.shape == (1, 64, 64)
        return
    with pytest.raises(DataError) as e:
        read_image_bytes(data, name, budget=budget)
    msg = str(e.value)
    assert msg.startswith(f"cannot read {name}: ") and "\n" not in msg
    assert expected in msg, msg


_MEASURE = r"""
import json, sys, time
from pathlib import Path
from medsight.data.io import budget_for, read_image_bytes
from medsight.errors import DataError


def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])


d = Path(sys.argv[1])
budget = budget_for((1, 28, 28))
out = {}
for f in sorted(d.iterdir()):
    data = f.read_bytes()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    rss0 = status_kib("VmRSS")
    t = time.perf_counter()
    try:
        read_image_bytes(data, f.name, budget=budget)
        err = None
    except DataError as e:
        err = str(e)
    dt = time.perf_counter() - t
    out[f.name] = {"seconds": dt, "peak_extra_mib": (status_kib("VmHWM") - rss0) / 1024, "error": err}
print(json.dumps(out))
"""


def test_bombs_are_fast_and_small(bomb_dir):
    """Fresh interpreter, bombs read one after another: each < 5 s and its peak RSS (VmHWM, reset before each
    file) at most 1 GiB above the RSS before it."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(bomb_dir)], capture_output=True, text=True,
                       env=env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    report = "\n".join(f"{k:20s} {v['seconds']:.3f} s  +{v['peak_extra_mib']:.0f} MiB  {v['error']}" for k, v in got.items())
    print(report)
    for name, v in got.items():
        assert v["seconds"] < 5, report
        assert v["peak_extra_mib"] < 1024, report
        assert (v["error"] is None) == (BOMBS[name][1] is None), report


def test_predict_cli_refuses_each_bomb_on_one_line(served_bundle, bomb_dir, tmp_path):
    out = tmp_path / "preds.csv"
    r = subprocess.run(medsight_cmd("predict", str(served_bundle), str(bomb_dir), "--out", str(out)),
                       capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    import csv

    rows = list(csv.DictReader(out.open()))
    assert sorted(Path(row["file"]).name for row in rows) == sorted(BOMBS)
    refused = [row for row in rows if row["error"]]
    assert len(refused) == len(BOMBS) - 1  # all but the honest zero-tail NIfTI
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(refused), r.stderr
    assert f"{len(refused)} of {len(BOMBS)} files could not be used" in r.stdout


# ----------------------------------------------------------------------------- budgets and isolation


def test_budget_for_2d_and_3d():
    b2 = budget_for({"size": [28, 28], "channels": 1})
    assert b2.max_frames == 1 and b2.max_elements == 3 * 4096 * 4096
    assert budget_for((3, 640, 640)).max_elements == 64 * 3 * 640 * 640
    assert budget_for((1, 64, 64, 64)).max_frames > 1
    assert budget_for((3, 4096, 4096)).max_elements == 2**27  # never above the global cap


def test_budget_refuses_before_decoding_and_max_elements_still_works(tmp_path):
    with pytest.raises(DataError, match=r"x.dcm: image has 262144 elements, above the limit of 1000"):
        read_image_bytes(_part10(_explicit_le(_image_ds()), "1.2.840.10008.1.2.1"), "x.dcm",
                         budget=DecodeBudget(max_elements=1000))
    p = tmp_path / "mf.dcm"
    p.write_bytes(multiframe_dicom())
    arr, _ = read_image(p)  # the default budget reads volumes
    assert arr.shape == (1, 64, 16, 16)
    with pytest.raises(DataError, match="mf.dcm: a 3D volume or multi-frame image with 64 frames"):
        read_image(p, budget=budget_for(MODEL_2D))


def test_honest_compressed_files_still_decode_in_the_worker():
    for name in ("MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        arr, _ = read_image_bytes(_pydicom_file(name), name)
        ref, _ = read_image_bytes(_pydicom_file(name), name, budget=DecodeBudget(isolate=False))
        np.testing.assert_array_equal(arr, ref)


def test_worker_memory_limit_turns_into_a_data_error(monkeypatch):
    """A worker whose address space cannot hold the decode fails that file only, on one line."""
    import medsight.data.readers.isolated as mio
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_pydicom_file("MR_small_jp2klossless.dcm")))
    with mio._workers_lock:
        idle = list(mio._idle_workers)
        mio._idle_workers.clear()
    monkeypatch.setenv("MEDSIGHT_WORKER_MEMORY", str(1 << 16))  # 64 KiB above start-up: no room to decode
    try:
        with pytest.raises(DataError, match=r"^cannot read tight.dcm: ") as e:
            decode_isolated(ds, "tight.dcm")
        assert "\n" not in str(e.value)
    finally:
        mio._close_workers()
        with mio._workers_lock:
            mio._idle_workers.extend(idle)
    monkeypatch.delenv("MEDSIGHT_WORKER_MEMORY")
    assert decode_isolated(ds, "ok.dcm").shape == (64, 64)  # a fresh worker decodes again


def test_killed_worker_costs_one_file_then_recovers():
    import signal

    import medsight.data.readers.isolated as mio
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_pydicom_file("SC_rgb_rle.dcm")))
    decode_isolated(ds, "warm.dcm")
    with mio._workers_lock:
        workers = list(mio._idle_workers)
    assert workers
    # a worker that dies while decoding: simulate with SIGKILL during a (slowed) call
    orig = mio._Worker.call

    def call_then_die(self, req, timeout):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        return orig(self, req, timeout)

    mio._Worker.call = call_then_die
    try:
        with pytest.raises(DataError, match=r"^cannot read crash.dcm: the pixel decoder crashed on this file"):
            decode_isolated(ds, "crash.dcm")
    finally:
        mio._Worker.call = orig
    assert decode_isolated(ds, "after.dcm").shape == (100, 100, 3)


def test_panic_exception_is_contained():
    """BaseException subclasses from decoders (pyo3 PanicException) become DataError; KeyboardInterrupt does not."""
    from medsight.data.readers.base import Contained as _Contained

    class PanicException(BaseException):
        pass

    with pytest.raises(DataError, match=r"cannot read p.dcm: cannot decode \(PanicException: boom\)"):
        with _Contained("p.dcm", "cannot decode"):
            raise PanicException("boom")
    with pytest.raises(KeyboardInterrupt):
        with _Contained("p.dcm", "cannot decode"):
            raise KeyboardInterrupt
