"""Fuzzing the readers end to end: mutated DICOM (RLE, JPEG, JPEG-LS, JPEG 2000, deflated, native) and PNG files
through `medsight predict` and `medsight qc`: no traceback, exactly one row per file, every refusal one line.

Mutations are byte flips (biased to the pixel data, where the decoders live) and truncations of pydicom's own
test files and of small PNGs, from a fixed seed. ~100 files run always; the 1,000-file run is `slow` (CI runs it).
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest

from _subproc import env, medsight_cmd

#: pydicom test files covering every decoder the readers use (small ones: the run must stay short)
SEEDS = [
    "MR_small_RLE.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm", "SC_rgb_rle_2frame.dcm", "rtdose_rle_1frame.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_08.dcm", "SC_rgb_jls_lossy_line.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm", "SC_rgb_small_odd_jpeg.dcm",
    "MR_small_jp2klossless.dcm", "JPEG2000.dcm", "693_J2KI.dcm",
    "image_dfl.dcm", "CT_small.dcm", "MR_small.dcm",
]


def _seed_files() -> dict[str, bytes]:
    import io

    import pydicom
    from PIL import Image

    root = Path(pydicom.__file__).parent / "data" / "test_files"
    seeds = {name: (root / name).read_bytes() for name in SEEDS}
    rng = np.random.default_rng(0)
    for mode, shape in (("L", (28, 28)), ("RGB", (32, 24, 3)), ("I;16", (40, 40))):
        a = rng.integers(0, 65535 if mode == "I;16" else 255, size=shape).astype(np.uint16 if mode == "I;16" else np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        seeds[f"seed_{mode.replace(';', '')}.png"] = buf.getvalue()
    return seeds


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    pixel = data.find(b"\xe0\x7f\x10\x00")  # DICOM Pixel Data tag; -1 for PNG
    if pixel < 0:
        pixel = data.find(b"IDAT")
    kind = rng.random()
    if kind < 0.2:  # truncation
        return bytes(b[: rng.randrange(1, len(b))])
    lo = pixel if (pixel > 0 and kind < 0.8) else 0  # mostly inside the pixel data, sometimes anywhere
    for _ in range(rng.choice((1, 2, 4, 8, 16, 64))):
        i = rng.randrange(lo, len(b))
        b[i] = rng.randrange(256) if rng.random() < 0.7 else b[i] ^ (1 << rng.randrange(8))
    return bytes(b)


def make_corpus(root: Path, n: int, seed: int = 1234) -> list[Path]:
    """``n`` mutated files under ``root/dicom`` and ``root/png`` (class folders, so `qc` can scan them)."""
    seeds = _seed_files()
    names = sorted(seeds)
    rng = random.Random(seed)
    out = []
    for k in range(n):
        name = names[k % len(names)]
        sub = root / ("png" if name.endswith(".png") else "dicom")
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"{k:05d}_{name}"
        p.write_bytes(_mutate(seeds[name], rng))
        out.append(p)
    return out


def _fuzz(served_bundle: Path, tmp_path: Path, n: int) -> None:
    files = make_corpus(tmp_path / "corpus", n)
    out = tmp_path / "preds.csv"
    r = subprocess.run(medsight_cmd("predict", str(served_bundle), str(tmp_path / "corpus"), "--out", str(out)),
                       capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode in (0, 1), r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout and "panicked" not in r.stderr, r.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert sorted(row["file"] for row in rows) == sorted(map(str, files))  # one row per file
    failed = [row for row in rows if row["error"]]
    for row in failed:
        assert row["error"].startswith("cannot ") and "\n" not in row["error"], row["error"]
    for row in rows:
        if not row["error"]:
            probs = [float(v) for k, v in row.items() if k.startswith("p_")]
            assert abs(sum(probs) - 1) < 1e-4
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == len(failed) and all(line.startswith("error: cannot ") for line in lines), r.stderr[-3000:]
    assert (r.returncode == 1) == bool(failed)
    assert 0 < len(failed) < len(files)  # the mutations hit both readable and unreadable cases

    report = tmp_path / "qc.json"
    q = subprocess.run(medsight_cmd("qc", str(tmp_path / "corpus"), "--json", str(report)),
                       capture_output=True, text=True, env=env(), timeout=600)
    assert q.returncode in (0, 1), q.stderr[-3000:]
    assert "Traceback" not in q.stderr + q.stdout and "panicked" not in q.stderr, q.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["n_records"] == len(files)
    # qc (default budget, no model) and predict (the 2D model's budget) may differ only for volumes/multi-frame
    assert rep["n_unreadable"] <= len(failed)


def test_fuzz_100_files_predict_and_qc(served_bundle, tmp_path):
    _fuzz(served_bundle, tmp_path, 100)


@pytest.mark.slow
def test_fuzz_1000_files_predict_and_qc(served_bundle, tmp_path):
    _fuzz(served_bundle, tmp_path, 1000)


def test_corpus_is_deterministic_and_covers_every_decoder(tmp_path):
    a = make_corpus(tmp_path / "a", 40)
    b = make_corpus(tmp_path / "b", 40)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert {p.name.split("_", 1)[1] for p in a} >= set(SEEDS)
