"""Fixtures for the data tests: real samples (fail when missing) and tiny synthetic files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _samples_candidates() -> list[Path]:
    env = os.environ.get("MEDSIGHT_DATA_DIR")
    if env:
        return [Path(env).expanduser().resolve().parent / "samples"]
    # default: ../shared/data relative to the repo root; a git worktree (e.g. /work/wt/<name>) sits one
    # level deeper than the main checkout, so look in the ancestors too
    return [p / "shared" / "data" / "samples" for p in [REPO_ROOT.parent, *REPO_ROOT.parent.parents]]


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """Real sample scans: $MEDSIGHT_DATA_DIR/../samples (fails, never skips, when missing)."""
    cands = _samples_candidates()
    for c in cands:
        if (c / "ct_dicom_series").is_dir():
            return c
    pytest.fail(
        "real sample data not found (looked in " + ", ".join(map(str, cands[:3])) + "); "
        "set MEDSIGHT_DATA_DIR to the medmnist folder whose sibling 'samples' holds ct_dicom_series/, nifti/ ..."
    )


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    modality: str = "CT",
    position: tuple[float, float, float] | None = None,
    instance: int = 1,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    study_uid: str = "1.2.826.0.1.3680043.8.498.2",
    pixel_spacing=(0.5, 0.7),
    window=None,
    extra: dict | None = None,
    signed: bool | None = None,
) -> Path:
    """Write a small uncompressed DICOM file with the given pixels ((H,W) gray or (H,W,3) RGB)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sop = generate_uid()
    fm.MediaStorageSOPInstanceUID = sop
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientID = "PID-12345"
    ds.PatientName = "Doe^Jane"
    ds.InstanceNumber = instance
    rgb = pixels.ndim == 3
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if (signed if signed is not None else pixels.dtype.kind == "i") else 0
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if position is not None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness = 2.5
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def dicom_factory(tmp_path):
    def factory(name="img.dcm", pixels=None, **kw):
        if pixels is None:
            pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 10).astype(np.uint16)
        return make_dicom(tmp_path / name, pixels, **kw)

    return factory


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    from PIL import Image

    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


@pytest.fixture
def make_dicom_file():
    """The :func:`make_dicom` builder itself (path, pixels, **header options)."""
    return make_dicom


@pytest.fixture
def save_png_file():
    return save_png
