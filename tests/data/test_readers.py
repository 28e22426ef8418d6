"""The reader registry: a toy format registered in a test is seen by every entry point without another edit
(file, bytes, folder scan, `predict`, the REST upload, `qc`, `deid`), and the bombs cost `deid`, `qc` and
`predict` little memory and time."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medsight.data import readers
from medsight.data.readers import (
    Reader,
    fail,
    finish,
    register_reader,
    unregister_reader,
)
from medsight.errors import DataError

TOY_MAGIC = b"TOYIMG\x00\x01"


class ToyReader(Reader):
    """A made-up format: 8 magic bytes, rows and columns (uint16 LE), then rows x columns uint8 pixels."""

    name = "toy"
    suffixes = (".toy",)

    def sniff(self, head: bytes) -> str | None:
        return "toy" if head.startswith(TOY_MAGIC) else None

    def read(self, source, name, fmt, *, window, budget):
        data = source.read_bytes() if isinstance(source, Path) else bytes(source)
        if len(data) < 12:
            raise fail(name, "truncated toy header")
        rows, cols = struct.unpack("<HH", data[8:12])
        budget.check(name, rows * cols)  # before decoding
        px = np.frombuffer(data[12:12 + rows * cols], np.uint8)
        if px.size != rows * cols:
            raise fail(name, f"toy pixel data truncated ({px.size} of {rows * cols} bytes)")
        meta = {"format": "toy", "modality": "OT", "photometric": "MONOCHROME2", "bits": 8, "spacing": (1.0, 1.0),
                "orientation": None, "value_range": (0.0, 255.0), "window": None}
        return finish(px.reshape(1, rows, cols), meta, name)


def toy_bytes(rows=28, cols=28, seed=0) -> bytes:
    px = np.random.default_rng(seed).integers(0, 256, (rows, cols), dtype=np.uint8)
    return TOY_MAGIC + struct.pack("<HH", rows, cols) + px.tobytes()


@pytest.fixture
def toy():
    register_reader(ToyReader())
    try:
        yield
    finally:
        unregister_reader("toy")


def test_registry_order_and_replace():
    names = [r.name for r in readers.readers()]
    assert names[:3] == ["dicom", "pillow", "nifti"]
    register_reader(ToyReader(), before="dicom")
    try:
        assert readers.readers()[0].name == "toy"
        register_reader(ToyReader())  # same name: replaced in place
        assert [r.name for r in readers.readers()].count("toy") == 1
    finally:
        unregister_reader("toy")
    with pytest.raises(ValueError):
        register_reader(ToyReader(), before="nope")


def test_unknown_without_the_toy_reader(tmp_path):
    from medsight.errors import DataError

    p = tmp_path / "a.toy"
    p.write_bytes(toy_bytes())
    with pytest.raises(DataError, match=r"a\.toy: unrecognised file format"):
        readers.read_image(p)


def test_file_bytes_sniff_and_walks_see_the_toy_reader(toy, tmp_path):
    data = toy_bytes()
    (tmp_path / "a.toy").write_bytes(data)
    (tmp_path / "noext").write_bytes(data)  # found by content alone
    (tmp_path / "notes.txt").write_text("hello")
    arr, meta = readers.read_image(tmp_path / "a.toy")
    assert arr.shape == (1, 28, 28) and meta["format"] == "toy"
    arr2, _ = readers.read_image_bytes(data, "upload")  # the name is no help here: content decides
    np.testing.assert_array_equal(arr, arr2)
    assert readers.sniff_format(data[:600], "x") == "toy" and readers.file_format(tmp_path / "noext") == "toy"
    assert [p.name for p in readers.walk_readable(tmp_path)] == ["a.toy", "noext"]
    from medsight.data import io as legacy  # the facade is the same dispatch

    assert ".toy" in legacy.READABLE_SUFFIXES and legacy.read_image(tmp_path / "noext")[1]["format"] == "toy"
    with pytest.raises(DataError, match="above the limit"):
        readers.read_image_bytes(toy_bytes(100, 100), "big.toy", max_elements=50)


def test_folder_scan_qc_and_deid_see_the_toy_reader(toy, tmp_path):
    from medsight.data.deid import deidentify
    from medsight.data.folders import scan_class_folders
    from medsight.data.quality import run_qc

    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            (root / cls / f"s{k}.toy").write_bytes(toy_bytes(seed=k + (10 if cls == "b" else 0)))
        (root / cls / "IM0").write_bytes(toy_bytes(seed=99 if cls == "a" else 98))  # suffix-less
    recs = scan_class_folders(root)
    assert len(recs) == 8 and {r["label"] for r in recs} == {"a", "b"}
    report = run_qc(root)
    assert report["summary"]["unreadable"] == 0
    assert report["outliers"]["common_shape"] == [1, 28, 28]
    summary = deidentify(root, tmp_path / "out")
    assert sorted(summary["skipped"]) == sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert summary["written"] == 0 and not summary["errors"]  # not DICOM: skipped, as every non-DICOM file


@pytest.mark.realdata
def test_predict_and_the_service_see_the_toy_reader(toy, served_bundle, tmp_path):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from medsight.cli import app
    from medsight.serve import create_app

    f = tmp_path / "scan.toy"
    f.write_bytes(toy_bytes())
    out = tmp_path / "p.csv"
    r = CliRunner().invoke(app, ["predict", str(served_bundle), str(f), "--out", str(out), "--workers", "0"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 and rows[0]["error"] == "" and 0.0 <= float(rows[0]["p_" + rows[0]["positive_class"]]) <= 1.0
    client = TestClient(create_app(served_bundle, backend="torch"))
    resp = client.post("/v1/predict", files={"file": ("upload.bin", toy_bytes(), "application/octet-stream")})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    p_cli = float(rows[0]["p_" + rows[0]["positive_class"]])
    probs = body.get("probabilities") or {}
    assert any(abs(float(v) - p_cli) < 1e-4 for v in probs.values()), (body, rows[0])


_BOMB_RUN = r"""
import json, resource, sys, time
kind, path = sys.argv[1], sys.argv[2]
t = time.perf_counter()
err = None
try:
    if kind == "qc":
        from medsight.data.quality import run_qc
        rep = run_qc(path, layout="raw")
        err = rep["unreadable"][0]["error"] if rep["unreadable"] else None
    elif kind == "deid":
        from medsight.data.deid import deidentify
        s = deidentify(path, sys.argv[3], secret="s", allow_burned_in=True)
        err = s["errors"][0]["error"] if s["errors"] else ("skipped" if s["skipped"] else None)
    else:
        from medsight.data.readers import budget_for, read_image
        read_image(path + "/" + sys.argv[3], budget=budget_for((1, 28, 28)))
except Exception as e:
    err = str(e)
print(json.dumps({"seconds": time.perf_counter() - t, "err": err,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

def deflated_honest_gib() -> bytes:
    """The reviewer's kind: an honest header (32768 x 32768, 8 bit) and 1 GiB of zero pixels, ~1 MB deflated."""
    from tests.data.test_bombs import _explicit_le, _image_ds, _part10, _zeros_deflate

    ds = _image_ds(32768, 32768, pixels=False)
    body = _explicit_le(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 1 << 30)
    return _part10(_zeros_deflate(1024, body, -15), "1.2.840.10008.1.2.1.99")


_BOMB_NAMES = ["deflate_tail.dcm", "deflate_pixels.dcm", "deflate_honest_gib.dcm", "j2k_lying.dcm", "jpeg_lying.dcm",
               "huge_dims.nii.gz"]


@pytest.mark.slow
@pytest.mark.parametrize("name", _BOMB_NAMES)
def test_deid_qc_and_predict_refuse_each_bomb_in_little_memory(name, tmp_path):
    """Fresh interpreter per command and bomb: peak RSS (getrusage) under 1 GiB, a few seconds, refused."""
    from tests._subproc import env
    from tests.data.test_bombs import BOMBS

    d = tmp_path / "in"
    d.mkdir()
    (d / name).write_bytes(deflated_honest_gib() if name == "deflate_honest_gib.dcm" else BOMBS[name][0]())
    for kind, extra in (("qc", []), ("deid", [str(tmp_path / f"out-{name}")]), ("predict", [name])):
        r = subprocess.run([sys.executable, "-c", _BOMB_RUN, kind, str(d), *extra], capture_output=True, text=True,
                           env=env(), timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["err"], (kind, name, got)  # refused (deid: held back, or skipped when not DICOM)
        assert got["peak_mib"] < 1024, (kind, name, got)
        assert got["seconds"] < 10, (kind, name, got)


def test_a_folder_no_reader_reads_is_one_line_naming_it(tmp_path, monkeypatch):
    """A folder is an image only to a reader whose read_folder takes it (DICOM: one series); with none, the
    refusal names the folder."""
    from medsight.data.readers import registry
    from medsight.errors import DataError

    monkeypatch.setattr(registry, "readers", list)  # no registered reader reads folders
    folder = tmp_path / "scans"
    folder.mkdir()
    with pytest.raises(DataError, match=r"^cannot read .*scans: a folder, and no reader reads folders$"):
        registry.read(folder)
