"""Read one scan (DICOM file or series folder, NIfTI, PNG/JPEG/TIFF/BMP) into a float32 channel-first array.

Formats end here: everything downstream sees ``(array, meta)`` where ``array`` is float32,
``(C, H, W)`` for 2D images and ``(C, D, H, W)`` for volumes, and ``meta`` is a plain dict::

    format       'dicom' | 'dicom-series' | 'nifti' | 'png' | 'jpeg' | 'tiff' | 'bmp' | 'gif' | 'webp'
    modality     DICOM Modality ('CT', 'MR', 'CR', ...) or 'OT' for photos / NIfTI
    spacing      tuple of floats, one per spatial axis in array order (mm for DICOM/NIfTI; 1.0 when unknown)
    orientation  'RAS' for NIfTI (after canonicalisation), 'LPS' for DICOM series, None otherwise
    photometric  'MONOCHROME2' (after MONOCHROME1 inversion) or 'RGB'
    shape        array shape
    bits         stored bits per sample of the source
    value_range  (lo, hi) the source's nominal value range, for normalisation; None when unbounded
                 (CT in HU, floats); (0.0, 1.0) after windowing
    window       (center, width) that was applied, or None
    private      dict of identifying values (patient/study ids); never log or print it

Every failure raises :class:`medsight.errors.DataError` with one line naming the file and the reason.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import DataError, choices_message

log = logging.getLogger(__name__)

#: Largest number of array elements a single image may decode to (decompression-bomb guard).
MAX_ELEMENTS = 2**28

#: Named CT windows: (center, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "soft_tissue": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
    "liver": (60.0, 160.0),
}
#: Special window name: use the VOI LUT / Window Center-Width stored in the DICOM file.
FILE_WINDOW = "dicom"

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = {".dcm", ".dicom", ".ima", ""}

#: Modalities whose values have no fixed range (HU, MR, PET, dose): normalise per image instead.
_UNBOUNDED_MODALITIES = {"CT", "MR", "PT", "NM", "RTDOSE"}

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

WindowArg = "str | tuple[float, float] | None"


# ----------------------------------------------------------------------------- helpers


def _one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fail(name: object, reason: object, cause: BaseException | None = None) -> DataError:
    err = DataError(f"cannot read {name}: {_one_line(reason)}")
    if cause is not None:
        err.__cause__ = cause
    return err


def resolve_window(window: Any) -> tuple[float, float] | str | None:
    """Normalise a window argument: None, 'dicom' (use the file's VOI), a name, or (center, width)."""
    if window is None:
        return None
    if isinstance(window, str):
        key = window.strip().lower().replace("-", "_")
        if key in ("none", ""):
            return None
        if key in (FILE_WINDOW, "file", "auto_voi", "voi"):
            return FILE_WINDOW
        if key in WINDOWS:
            return WINDOWS[key]
        if "," in key:
            window = key.split(",")
        else:
            raise DataError(choices_message("window", window, [*WINDOWS, FILE_WINDOW, "'center,width'"]))
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError) as e:
        raise DataError(f"invalid window {window!r}; expected a name or (center, width)") from e
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise DataError(f"invalid window {window!r}; width must be > 0 and values finite")
    return (center, width)


def apply_window(arr: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window (DICOM PS3.3 C.11.2.1.2.1 style) scaled to [0, 1]."""
    lo = center - width / 2.0
    out = (arr.astype(np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


def sniff_format(head: bytes, name: str = "") -> str | None:
    """Guess the format from the first bytes (>= 352 recommended) and, as a fallback, the name."""
    low = str(name).lower()
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"GIF8"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if _is_nifti_header(head):
        return "nifti"
    # DICOM without preamble: starts with a group 0002 or 0008 element (either byte order)
    if head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08") and len(head) >= 8:
        return "dicom"
    if low.endswith(NIFTI_SUFFIXES):
        return "nifti"
    suffix = Path(low).suffix
    if suffix in (".dcm", ".dicom", ".ima"):
        return "dicom"
    return None


def _is_nifti_header(head: bytes) -> bool:
    if len(head) < 348:
        return False
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return True
        if size == 540 and head[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def _gunzip_head(data_or_path: bytes | Path, n: int = 600) -> bytes:
    try:
        if isinstance(data_or_path, (bytes, bytearray)):
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            return d.decompress(bytes(data_or_path[: 1 << 16]), n)
        with gzip.open(data_or_path, "rb") as fh:
            return fh.read(n)
    except (OSError, EOFError, zlib.error):
        return b""


def _gunzip_capped(data: bytes, cap: int) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data, cap + 1)
    if len(out) > cap:
        raise ValueError(f"decompressed size exceeds the limit of {cap} bytes (decompression bomb?)")
    if not d.eof:
        raise ValueError("gzip stream is truncated")
    return out


def _check_elements(n: int, max_elements: int | None) -> None:
    cap = MAX_ELEMENTS if max_elements is None else max_elements
    if n <= 0:
        raise ValueError("image is empty (0 pixels)")
    if n > cap:
        raise ValueError(f"image has {n} elements, above the limit of {cap} (decompression bomb guard)")


def _finish(arr: np.ndarray, meta: dict, name: object) -> tuple[np.ndarray, dict]:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size == 0:
        raise _fail(name, "image is empty")
    if not np.isfinite(arr).all():
        raise _fail(name, "pixel values contain NaN or infinity")
    meta["shape"] = tuple(int(s) for s in arr.shape)
    meta.setdefault("private", {})
    return arr, meta


# ----------------------------------------------------------------------------- public API


def read_image(
    path: str | os.PathLike,
    *,
    window: str | tuple[float, float] | None = None,
    series_uid: str | None = None,
    max_elements: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Read a scan into a float32 channel-first array and a metadata dict.

    ``path`` may be a file (DICOM, NIfTI, PNG/JPEG/TIFF/BMP/GIF/WebP) or a folder holding one DICOM
    series (pick one with ``series_uid`` when it holds several). ``window`` applies a CT window
    (a name in :data:`WINDOWS`, ``'dicom'`` for the file's own VOI LUT / window, or ``(center, width)``)
    and scales the result to [0, 1].
    """
    p = Path(path)
    win = resolve_window(window)
    if p.is_dir():
        return read_dicom_series(p, window=win, series_uid=series_uid, max_elements=max_elements)
    if not p.exists():
        raise DataError(f"cannot read {p}: file not found")
    try:
        with open(p, "rb") as fh:
            head = fh.read(600)
    except OSError as e:
        raise _fail(p, e.strerror or e) from e
    fmt = sniff_format(head, p.name)
    if fmt == "gzip":
        fmt = "nifti" if (_is_nifti_header(_gunzip_head(p)) or p.name.lower().endswith(".nii.gz")) else None
    if fmt is None and p.suffix.lower() in DICOM_SUFFIXES and len(head) > 0:
        fmt = "dicom"  # last resort: pydicom with force=True, refused cleanly when it is not DICOM
    if fmt is None:
        raise _fail(p, f"unrecognised file format (suffix {p.suffix or 'none'!r}, not DICOM/NIfTI/PNG/JPEG/TIFF/BMP)")
    if fmt == "dicom":
        return _read_dicom(p, p, window=win, max_elements=max_elements)
    if fmt == "nifti":
        return _read_nifti(p, p, window=win, max_elements=max_elements)
    return _read_pillow(p, p, fmt, window=win, max_elements=max_elements)


def read_image_bytes(
    data: bytes,
    name: str,
    *,
    window: str | tuple[float, float] | None = None,
    max_elements: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Like :func:`read_image` for an uploaded file's bytes; ``name`` is only a hint and for messages."""
    win = resolve_window(window)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"cannot read {name}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise DataError(f"cannot read {name}: empty upload (0 bytes)")
    fmt = sniff_format(data[:600], name)
    cap = (MAX_ELEMENTS if max_elements is None else max_elements) * 8 + 1_000_000
    if fmt == "gzip":
        if not _is_nifti_header(_gunzip_head(data)):
            raise DataError(f"cannot read {name}: gzip file that does not hold a NIfTI image")
        try:
            data = _gunzip_capped(data, cap)
        except (ValueError, zlib.error) as e:
            raise _fail(name, e, e) from e
        fmt = "nifti"
    if fmt is None:
        raise DataError(f"cannot read {name}: unrecognised format (not DICOM/NIfTI/PNG/JPEG/TIFF/BMP)")
    if fmt == "dicom":
        return _read_dicom(io.BytesIO(data), name, window=win, max_elements=max_elements)
    if fmt == "nifti":
        return _read_nifti(data, name, window=win, max_elements=max_elements)
    return _read_pillow(io.BytesIO(data), name, fmt, window=win, max_elements=max_elements)


# ----------------------------------------------------------------------------- DICOM


def _pydicom():
    from medsight.errors import optional_import

    return optional_import("pydicom")


def _dcmread(src, name, **kw):
    pydicom = _pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(src, force=True, **kw)
            # touch the elements so lazy parse errors surface here
            _ = ds.get("SOPClassUID")
    except Exception as e:  # pydicom raises many types on malformed input
        raise _fail(name, f"not a readable DICOM file ({type(e).__name__}: {e})", e) from e
    return ds


def _has_pixels(ds) -> bool:
    return any(t in ds for t in _PIXEL_TAGS)


#: identifying header values kept (never logged) in ``meta["private"]``: qc counts which files carry them
PRIVATE_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "OtherPatientIDs", "StudyInstanceUID",
                "SeriesInstanceUID", "AccessionNumber", "StudyDate", "SeriesDate", "AcquisitionDate",
                "InstitutionName", "ReferringPhysicianName")


def _private_ids(ds) -> dict:
    out = {}
    for key in PRIVATE_KEYS:
        v = ds.get(key)
        if v not in (None, ""):
            out[key] = str(v)
    return out


def _pixel_spacing(ds) -> tuple[float, float] | None:
    def grab(item):
        for key in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
            v = item.get(key)
            if v is not None and len(v) >= 2:
                try:
                    r, c = float(v[0]), float(v[1])
                except (TypeError, ValueError):
                    continue
                if r > 0 and c > 0 and math.isfinite(r) and math.isfinite(c):
                    return (r, c)
        return None

    got = grab(ds)
    if got:
        return got
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            got = grab(ds[seq][0].PixelMeasuresSequence[0])
        except Exception:
            got = None
        if got:
            return got
    return None


def _slice_step(ds) -> float | None:
    for item in [ds] + _functional_items(ds):
        for key in ("SpacingBetweenSlices", "SliceThickness"):
            try:
                v = float(item.get(key))
            except (TypeError, ValueError):
                continue
            if v > 0 and math.isfinite(v):
                return v
    return None


def _functional_items(ds) -> list:
    try:
        return [ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]]
    except Exception:
        return []


def _expected_bytes(ds) -> int | None:
    """Bytes of native (uncompressed) PixelData, or None when compressed / not computable."""
    if "PixelData" not in ds:
        return None
    tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsuid is not None and getattr(tsuid, "is_compressed", False):
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return None
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    n = rows * cols * frames
    if bits == 1:
        return (n * spp + 7) // 8
    if pi in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        return n * 2 * (bits // 8)
    return n * spp * (bits // 8)


def _ensure_transfer_syntax(ds) -> None:
    pydicom = _pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    fm = getattr(ds, "file_meta", None)
    if fm is None:
        ds.file_meta = fm = FileMetaDataset()
    if "TransferSyntaxUID" in fm:
        return
    enc = getattr(ds, "original_encoding", (True, True))
    implicit, little = enc if enc and enc[0] is not None else (True, True)
    if not little:
        fm.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        fm.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    del pydicom


def _dicom_to_array(ds, name, *, window, max_elements) -> tuple[np.ndarray, dict]:
    """Decode one DICOM dataset (single or multi-frame) into (C,H,W) or (C,F,H,W)."""
    from pydicom import pixels as px

    if not _has_pixels(ds):
        sop = ds.get("SOPClassUID")
        sop_name = getattr(sop, "name", sop) if sop is not None else "unknown SOP class"
        raise _fail(name, f"DICOM file has no pixel data ({sop_name})")
    for key in ("Rows", "Columns"):
        if key not in ds:
            raise _fail(name, f"DICOM pixel data without {key}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    except (TypeError, ValueError) as e:
        raise _fail(name, f"invalid image header values ({e})", e) from e
    try:
        _check_elements(rows * cols * frames * max(spp, 3 if "PALETTE" in str(ds.get("PhotometricInterpretation", "")) else 1), max_elements)
    except ValueError as e:
        raise _fail(name, e) from e
    expected = _expected_bytes(ds)
    if expected is not None:
        got = len(ds.PixelData)
        if got < expected:
            raise _fail(name, f"DICOM pixel data truncated (expected {expected} bytes, got {got})")
    _ensure_transfer_syntax(ds)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = px.pixel_array(ds)  # YBR -> RGB conversion on by default
    except Exception as e:
        raise _fail(name, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})", e) from e
    arr = np.asarray(arr)
    if arr.size == 0:
        raise _fail(name, "DICOM pixel data decoded to an empty array")

    modality = str(ds.get("Modality", "OT") or "OT").strip() or "OT"
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": modality,
        "photometric": "MONOCHROME2",
        "bits": bits_stored,
        "window": None,
        "orientation": None,
        "private": _private_ids(ds),
    }
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    is_color = spp > 1 or pi.startswith("PALETTE")
    try:
        if pi.startswith("PALETTE"):
            arr = px.apply_color_lut(arr, ds)
            try:
                lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            except Exception:
                lut_bits = 16 if arr.max() > 255 else 8
            value_range: tuple[float, float] | None = (0.0, float(2**lut_bits - 1))
        elif is_color:
            value_range = (0.0, float(2**bits_stored - 1))
        else:
            value_range = None
    except Exception as e:
        raise _fail(name, f"cannot apply DICOM colour palette ({type(e).__name__}: {e})", e) from e

    if is_color:
        meta["photometric"] = "RGB"
        arr = arr.astype(np.float32)
        # (H,W,3) or (F,H,W,3) -> channel first
        arr = np.moveaxis(arr, -1, 0)
    else:
        try:
            mod = px.apply_modality_lut(arr, ds).astype(np.float32)
        except Exception as e:
            raise _fail(name, f"cannot apply DICOM rescale / modality LUT ({type(e).__name__}: {e})", e) from e
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        rescaled = "ModalityLUTSequence" in ds or slope != 1 or intercept != 0
        lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            value_range = None
        elif modality in _UNBOUNDED_MODALITIES or signed or bits_stored > 16 or "ModalityLUTSequence" in ds:
            value_range = None  # HU, MR/PET intensities, signed data: no useful fixed range
        elif not rescaled:
            value_range = (float(lo), float(hi))
        else:
            a, b = lo * slope + intercept, hi * slope + intercept
            value_range = (float(min(a, b)), float(max(a, b)))
        if window == FILE_WINDOW:
            has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
            if not has_voi:
                raise _fail(name, "window='dicom' requested but the file has no VOI LUT or Window Center/Width")
            if "VOILUTSequence" in ds:
                try:
                    voi = px.apply_voi_lut(mod, ds, prefer_lut=True).astype(np.float32)
                    lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
                except Exception as e:
                    raise _fail(name, f"cannot apply DICOM VOI LUT ({type(e).__name__}: {e})", e) from e
                mod = np.clip(voi / float(2**lut_bits - 1), 0.0, 1.0)
                meta["window"] = None
            else:
                c, w = _first_float(ds.WindowCenter), _first_float(ds.WindowWidth)
                if c is None or w is None or w <= 0:
                    raise _fail(name, f"invalid Window Center/Width in file ({ds.WindowCenter!r}, {ds.WindowWidth!r})")
                mod = apply_window(mod, c, w)
                meta["window"] = (c, w)
            value_range = (0.0, 1.0)
        elif window is not None:
            c, w = window
            mod = apply_window(mod, c, w)
            meta["window"] = (float(c), float(w))
            value_range = (0.0, 1.0)
        if pi == "MONOCHROME1":
            if value_range is not None:
                mod = (value_range[0] + value_range[1]) - mod
            else:
                mod = (float(mod.min()) + float(mod.max())) - mod
        arr = mod[None]  # channel axis
    meta["value_range"] = value_range

    # spacing
    ps = _pixel_spacing(ds)
    spatial = arr.ndim - 1
    if spatial == 3:
        step = _slice_step(ds) or 1.0
        meta["spacing"] = (float(step), *(ps or (1.0, 1.0)))
    else:
        meta["spacing"] = tuple(float(v) for v in (ps or (1.0, 1.0)))
    meta["spacing_known"] = ps is not None
    return _finish(arr, meta, name)


def _first_float(v) -> float | None:
    try:
        if isinstance(v, (list, tuple)) or hasattr(v, "__len__") and not isinstance(v, str):
            v = v[0]
        return float(v)
    except Exception:
        return None


def _read_dicom(src, name, *, window, max_elements) -> tuple[np.ndarray, dict]:
    ds = _dcmread(src, name)
    if len(ds) == 0 or ("SOPClassUID" not in ds and "Rows" not in ds and not _has_pixels(ds)):
        raise _fail(name, "not a DICOM image (no SOP Class, no image attributes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on invalid values; we refuse or read them
        return _dicom_to_array(ds, name, window=window, max_elements=max_elements)


def list_dicom_series(directory: str | os.PathLike) -> dict[str, list[Path]]:
    """Group the DICOM image files below ``directory`` by SeriesInstanceUID (non-DICOM files are skipped)."""
    d = Path(directory)
    pydicom = _pydicom()
    groups: dict[str, list[Path]] = {}
    for f in sorted(d.rglob("*")):
        if not f.is_file() or f.name.startswith(".") or f.name.upper() == "DICOMDIR":
            continue
        try:
            with open(f, "rb") as fh:
                head = fh.read(600)
        except OSError:
            continue
        if sniff_format(head, f.name) != "dicom":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f, force=True, stop_before_pixels=True, specific_tags=None)
            uid = str(ds.get("SeriesInstanceUID", "") or "")
            if "Rows" not in ds:
                continue
        except Exception:
            continue
        groups.setdefault(uid or "<no SeriesInstanceUID>", []).append(f)
    return groups


def read_dicom_series(
    directory: str | os.PathLike,
    *,
    window: Any = None,
    series_uid: str | None = None,
    max_elements: int | None = None,
) -> tuple[np.ndarray, dict]:
    """Read a folder holding one DICOM series into a (C, D, H, W) volume sorted along the slice normal."""
    d = Path(directory)
    win = resolve_window(window) if not (isinstance(window, tuple) or window == FILE_WINDOW) else window
    groups = list_dicom_series(d)
    if not groups:
        raise DataError(f"cannot read {d}: folder holds no DICOM image files")
    if series_uid is not None:
        if series_uid not in groups:
            raise DataError(f"cannot read {d}: series {series_uid!r} not found; the folder holds {len(groups)} series: {', '.join(sorted(groups))}")
        files = groups[series_uid]
    elif len(groups) > 1:
        desc = "; ".join(f"{uid} ({len(fs)} files)" for uid, fs in sorted(groups.items()))
        raise DataError(f"cannot read {d}: folder holds {len(groups)} DICOM series, pass series_uid to pick one: {desc}")
    else:
        files = next(iter(groups.values()))

    slices = []
    for f in files:
        ds = _dcmread(f, f)
        slices.append((f, ds))
    # sort key: position projected on the slice normal, else InstanceNumber, else file name
    positions = []
    try:
        iop = np.array([float(v) for v in slices[0][1].ImageOrientationPatient], dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        for _, ds in slices:
            positions.append(float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
        sort_by = "position"
    except Exception:
        positions = []
        sort_by = "instance"
    if sort_by == "position":
        order = np.argsort(positions, kind="stable")
    else:
        try:
            inst = [int(ds.InstanceNumber) for _, ds in slices]
            order = np.argsort(inst, kind="stable")
        except Exception:
            order = np.arange(len(slices))
            sort_by = "filename"
    slices = [slices[i] for i in order]
    shape0 = (int(slices[0][1].get("Rows", 0)), int(slices[0][1].get("Columns", 0)))
    for f, ds in slices:
        shp = (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))
        if shp != shape0:
            raise DataError(f"cannot read {d}: slices differ in size ({shape0[0]}x{shape0[1]} vs {shp[0]}x{shp[1]} in {f.name})")
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise DataError(f"cannot read {d}: {f.name} is multi-frame; read multi-frame files one by one")
    cap = MAX_ELEMENTS if max_elements is None else max_elements
    if len(slices) * shape0[0] * shape0[1] > cap:
        raise DataError(f"cannot read {d}: series has {len(slices) * shape0[0] * shape0[1]} voxels, above the limit of {cap}")
    arrays, metas = [], []
    for f, ds in slices:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, m = _dicom_to_array(ds, f, window=win, max_elements=max_elements)
        arrays.append(a)
        metas.append(m)
    chans = {a.shape[0] for a in arrays}
    if len(chans) != 1:
        raise DataError(f"cannot read {d}: slices mix grayscale and colour")
    vol = np.stack(arrays, axis=1)  # (C, D, H, W)

    if sort_by == "position" and len(positions) > 1:
        pos = np.sort(np.asarray(positions))
        gaps = np.diff(pos)
        nz = gaps[gaps > 1e-6]
        step = float(np.median(nz)) if nz.size else (_slice_step(slices[0][1]) or 1.0)
        irregular = bool(nz.size and (np.abs(nz - step) > 0.1 * step + 1e-4).any()) or nz.size < gaps.size
    else:
        step = _slice_step(slices[0][1]) or 1.0
        irregular = False
    ranges = [m["value_range"] for m in metas]
    if any(r is None for r in ranges):
        vr = None
    else:
        vr = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    meta = dict(metas[0])
    meta.update(
        format="dicom-series",
        spacing=(round(step, 6), *metas[0]["spacing"][-2:]),
        orientation="LPS" if sort_by == "position" else None,
        value_range=vr,
        n_slices=len(slices),
        slice_order=sort_by,
        irregular_slice_spacing=irregular,
    )
    return _finish(vol, meta, d)


# ----------------------------------------------------------------------------- NIfTI


def _read_nifti(src, name, *, window, max_elements) -> tuple[np.ndarray, dict]:
    from medsight.errors import optional_import

    nib = optional_import("nibabel")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(src, (bytes, bytearray)):
                size = struct.unpack("<i", src[:4])[0]
                if size not in (348, 540):
                    size = struct.unpack(">i", src[:4])[0]
                cls = nib.Nifti2Image if size == 540 else nib.Nifti1Image
                img = cls.from_bytes(bytes(src))
            else:
                img = nib.load(str(src))
    except Exception as e:
        raise _fail(name, f"not a readable NIfTI file ({type(e).__name__}: {e})", e) from e
    shape = tuple(int(s) for s in img.shape)
    try:
        _check_elements(int(np.prod(shape)) if shape else 0, max_elements)
    except ValueError as e:
        raise _fail(name, e) from e
    if len(shape) not in (2, 3, 4) and not (len(shape) == 5 and shape[3] == 1):
        raise _fail(name, f"unsupported NIfTI shape {shape}; expected 2D, 3D or 4D")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            can = nib.as_closest_canonical(img) if len(shape) >= 3 else img
            data = np.asarray(can.get_fdata(dtype=np.float32))
            zooms = tuple(float(z) for z in can.header.get_zooms())
            axcodes = "".join(nib.aff2axcodes(can.affine)) if len(shape) >= 3 else None
    except Exception as e:
        raise _fail(name, f"cannot decode NIfTI data ({type(e).__name__}: {e})", e) from e
    if len(shape) == 5:
        data = data[:, :, :, 0, :]
        data = np.moveaxis(data, -1, 0)
    elif data.ndim == 4:
        data = np.moveaxis(data, -1, 0)  # time / vector components become channels
    else:
        data = data[None]
    spatial = data.ndim - 1
    spacing = tuple(z if z > 0 and math.isfinite(z) else 1.0 for z in (zooms[:spatial] + (1.0,) * spatial)[:spatial])
    dtype = img.get_data_dtype()
    slope = float(getattr(img.dataobj, "slope", 1.0) or 1.0)
    inter = float(getattr(img.dataobj, "inter", 0.0) or 0.0)
    scaled = slope != 1.0 or inter != 0.0
    value_range: tuple[float, float] | None = None
    if not scaled and dtype.kind == "u" and dtype.itemsize <= 2:
        value_range = (0.0, float(np.iinfo(dtype).max))
    meta: dict[str, Any] = {
        "format": "nifti",
        "modality": "OT",
        "photometric": "MONOCHROME2",
        "bits": int(dtype.itemsize * 8),
        "spacing": spacing,
        "orientation": axcodes,
        "value_range": value_range,
        "window": None,
        "private": {},
    }
    if window is not None:
        if window == FILE_WINDOW:
            raise _fail(name, "window='dicom' only applies to DICOM files")
        c, w = window
        data = apply_window(data, c, w)
        meta["window"] = (float(c), float(w))
        meta["value_range"] = (0.0, 1.0)
    return _finish(data, meta, name)


# ----------------------------------------------------------------------------- Pillow


def _read_pillow(src, name, fmt, *, window, max_elements) -> tuple[np.ndarray, dict]:
    from medsight.errors import optional_import

    Image = optional_import("PIL.Image", "pillow")
    ImageOps = optional_import("PIL.ImageOps", "pillow")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                w, h = img.size
                n_frames = int(getattr(img, "n_frames", 1) or 1)
                use_frames = n_frames if img.format == "TIFF" and n_frames > 1 else 1
                bands = len(img.getbands())
                _check_elements(w * h * max(bands, 1) * use_frames, max_elements)
                frames = []
                for i in range(use_frames):
                    img.seek(i)
                    img.load()
                    frames.append(_pil_frame(img, Image, ImageOps))
                pil_format = img.format
                info = dict(img.info)
    except DataError:
        raise
    except ValueError as e:
        raise _fail(name, e, e) from e
    except Exception as e:  # PIL.UnidentifiedImageError, OSError (truncated), DecompressionBomb*
        raise _fail(name, f"cannot decode {fmt.upper()} image ({type(e).__name__}: {e})", e) from e
    arrs = [f[0] for f in frames]
    photometric, value_range, bits = frames[0][1], frames[0][2], frames[0][3]
    if len({a.shape for a in arrs}) != 1:
        raise _fail(name, "TIFF pages differ in size")
    if use_frames > 1:
        arr = np.stack(arrs, axis=1)  # (C, D, H, W)
    else:
        arr = arrs[0]
    meta: dict[str, Any] = {
        "format": (pil_format or fmt).lower().replace("mpo", "jpeg"),
        "modality": "OT",
        "photometric": photometric,
        "bits": bits,
        "spacing": (1.0,) * (arr.ndim - 1),
        "orientation": None,
        "value_range": value_range,
        "window": None,
        "private": {},
    }
    dpi = info.get("dpi")
    if dpi and arr.ndim == 3:
        try:
            mm = [25.4 / float(v) for v in dpi[:2]]
            if all(math.isfinite(v) and v > 0 for v in mm):
                meta["spacing"] = (mm[1], mm[0])
        except (TypeError, ValueError, ZeroDivisionError):
            pass
    if window is not None and window != FILE_WINDOW and photometric != "RGB":
        c, w = window
        arr = apply_window(arr, c, w)
        meta["window"] = (float(c), float(w))
        meta["value_range"] = (0.0, 1.0)
    return _finish(arr, meta, name)


def _pil_frame(img, Image, ImageOps):
    """One Pillow frame -> ((C,H,W) float32, photometric, value_range, bits)."""
    if img.format in ("JPEG", "MPO"):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "P" or mode == "PA":
        pal = img.convert("RGB")
        a = np.asarray(pal)
        if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
            return a[..., 0][None].astype(np.float32), "MONOCHROME2", (0.0, 255.0), 8
        return np.moveaxis(a, -1, 0).astype(np.float32), "RGB", (0.0, 255.0), 8
    if mode == "1":
        return (np.asarray(img, dtype=np.uint8) * 255)[None].astype(np.float32), "MONOCHROME2", (0.0, 255.0), 1
    if mode in ("L", "LA"):
        a = np.asarray(img.convert("L") if mode == "LA" else img)
        return a[None].astype(np.float32), "MONOCHROME2", (0.0, 255.0), 8
    if mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32)
        return a[None], "MONOCHROME2", (0.0, 65535.0), 16
    if mode == "I":
        a = np.asarray(img)
        if a.size and a.min() >= 0 and a.max() <= 65535 and img.format == "PNG":
            return a[None].astype(np.float32), "MONOCHROME2", (0.0, 65535.0), 16
        return a[None].astype(np.float32), "MONOCHROME2", None, 32
    if mode == "F":
        return np.asarray(img, dtype=np.float32)[None], "MONOCHROME2", None, 32
    if mode in ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "La"):
        a = np.asarray(img if mode == "RGB" else img.convert("RGB"))
        return np.moveaxis(a, -1, 0).astype(np.float32), "RGB", (0.0, 255.0), 8
    if mode in ("I;16B", "I;16L", "I;16N"):
        a = np.asarray(img).astype(np.float32)
        return a[None], "MONOCHROME2", (0.0, 65535.0), 16
    a = np.asarray(img.convert("RGB"))
    return np.moveaxis(a, -1, 0).astype(np.float32), "RGB", (0.0, 255.0), 8
