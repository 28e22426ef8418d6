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

Every failure raises :class:`medsight.errors.DataError` with one line naming the file and the reason,
including faults inside the decoders (a Rust ``PanicException``, a crashed decoder process).

This module is the only owner of "can this file be read, and as what?"; other modules ask it:

    sniff_format(head, name)   first bytes (>= 600 recommended) + name -> 'dicom' | 'nifti' | 'nifti-gz' | 'png' |
                               'jpeg' | 'tiff' | 'bmp' | 'gif' | 'webp' | 'gzip' (a gzip stream not known to
                               hold NIfTI; refused by the readers) | None (not a format we read)
    file_format(path)          sniff_format on a file's first bytes
    is_readable_name(name)     the name alone says it is a format we read (suffix)
    is_readable_file(path)     a file to pick up when walking a folder (suffix, or sniffed content for
                               suffix-less DICOM); hidden files and DICOMDIR are skipped
    walk_readable(root)        every such file below a folder, sorted

Untrusted input is decoded within a :class:`DecodeBudget` fixed *before* decoding (``budget=`` on
:func:`read_image`, :func:`read_image_bytes` and ``preprocess.load_one``; :func:`budget_for` derives one
from a bundle's input shape, :data:`DEFAULT_BUDGET` otherwise). Sizes are checked from the file's own
headers before anything is inflated or decoded: Rows/Columns/frames, and for compressed DICOM the
codestream headers (JPEG SOF, JPEG-LS SOF55, JPEG 2000 SIZ, RLE segment table) must agree with them;
deflated DICOM and ``.nii.gz`` are inflated through a capped stream. Compressed DICOM pixel data is decoded
in a worker process with an address-space limit (:func:`decode_isolated`), so a decoder crash costs
only that file.
"""

from __future__ import annotations

import atexit
import gzip
import io
import logging
import math
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any

from dataclasses import dataclass, replace

import numpy as np

from medsight.errors import DataError, choices_message

log = logging.getLogger(__name__)

#: Largest number of array elements a single image may decode to (decompression-bomb guard): 2**27 is a
#: 512x512x512 volume (512 MiB as float32). The CLI, training and the service share it.
MAX_ELEMENTS = 2**27

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


# ----------------------------------------------------------------------------- decode budgets


@dataclass(frozen=True)
class DecodeBudget:
    """Limits fixed before a file is decoded.

    max_elements  decoded array elements (samples x rows x columns x frames)
    max_bytes     bytes any stream may inflate to (deflated DICOM, .nii.gz); default 8 per element + 1 MiB
    max_frames    frames / slices along the third spatial axis (1: the model takes 2D images only)
    isolate       decode compressed DICOM pixel data in a memory-limited worker process
    """

    max_elements: int = MAX_ELEMENTS
    max_bytes: int | None = None
    max_frames: int = 4096
    isolate: bool = True

    @property
    def byte_cap(self) -> int:
        return int(self.max_bytes) if self.max_bytes is not None else int(self.max_elements) * 8 + (1 << 20)

    def check(self, name: object, elements: int, frames: int = 1) -> None:
        """Refuse (DataError) a decode of ``elements`` elements in ``frames`` frames before it starts."""
        if frames > self.max_frames:
            what = "a 3D volume or multi-frame image" if self.max_frames == 1 else "an image"
            raise _fail(name, f"{what} with {frames} frames/slices; the model takes at most {self.max_frames}")
        if elements <= 0:
            raise _fail(name, "image is empty (0 pixels)")
        if elements > self.max_elements:
            raise _fail(name, f"image has {elements} elements, above the limit of {self.max_elements} "
                              "(decompression bomb guard)")


#: The budget when none is given (training on user files, `qc`, library calls).
DEFAULT_BUDGET = DecodeBudget()

#: A 2D model accepts sources up to this many pixels per channel (larger scans are downsampled anyway).
MAX_2D_SOURCE_PIXELS = 4096 * 4096


def budget_for(input_spec: dict | tuple | list) -> DecodeBudget:
    """The budget for a model's inputs: a bundle's ``meta['input']`` / a preprocessing recipe
    (``size``, ``channels``) or a shape ``(C, *size)``.

    2D models: at most one frame, and ``max(3 x 4096^2, 64 x model input elements)`` elements (an RGB
    4096x4096 photo fits; a 60000^2 codestream does not); 3D models: :data:`DEFAULT_BUDGET`.
    Never more than :data:`MAX_ELEMENTS`.
    """
    if isinstance(input_spec, dict):
        size = [int(v) for v in input_spec["size"]]
        channels = int(input_spec.get("channels") or 1)
    else:
        channels, *size = (int(v) for v in input_spec)
    if len(size) == 3:
        return DEFAULT_BUDGET
    model_elements = channels * int(np.prod(size))
    cap = min(MAX_ELEMENTS, max(3 * MAX_2D_SOURCE_PIXELS, 64 * model_elements))
    return DecodeBudget(max_elements=cap, max_frames=1)


def _budget(budget: DecodeBudget | None, max_elements: int | None) -> DecodeBudget:
    b = DEFAULT_BUDGET if budget is None else budget
    if not isinstance(b, DecodeBudget):
        raise TypeError(f"budget must be a DecodeBudget, got {type(b).__name__}")
    if max_elements is not None:
        b = replace(b, max_elements=int(max_elements))
    return b


class _Contained:
    """Turn whatever a decoder raises (incl. BaseException subclasses such as pyo3's PanicException,
    never KeyboardInterrupt / SystemExit) into one DataError naming the file."""

    def __init__(self, name: object, stage: str):
        self.name, self.stage = name, stage

    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        if e is None or isinstance(e, (DataError, KeyboardInterrupt, SystemExit, GeneratorExit)):
            return False
        raise _fail(self.name, f"{self.stage} ({type(e).__name__}: {e})", e) from e


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
    """The format from the first bytes (>= 600 recommended) and, as a fallback, the name (see the module doc)."""
    head = bytes(head[:_HEAD])
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
        return "nifti-gz" if (_is_nifti_header(_gunzip_head(head)) or low.endswith(".nii.gz")) else "gzip"
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


_HEAD = 600  # bytes read to sniff a file
#: name suffixes of the formats read here
READABLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm", ".dicom", ".ima",
                     ".nii", ".nii.gz")
_SKIP_NAMES = {"dicomdir", "thumbs.db", "desktop.ini"}


def is_readable_name(name: str | os.PathLike) -> bool:
    """The name alone says the file is in a format read here (suffix; hidden files and DICOMDIR excluded)."""
    n = Path(name).name.lower()
    return not n.startswith(".") and n not in _SKIP_NAMES and n.endswith(READABLE_SUFFIXES)


def file_format(path: str | os.PathLike) -> str | None:
    """:func:`sniff_format` of a file's first bytes and name; None when it cannot be opened."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD)
    except OSError:
        return None
    return sniff_format(head, Path(path).name)


def is_readable_file(path: str | os.PathLike) -> bool:
    """A file to pick up when walking a folder: a readable suffix, or (suffix-less DICOM and friends) content
    that sniffs as a format read here. Hidden files and DICOMDIR are skipped."""
    p = Path(path)
    n = p.name.lower()
    if n.startswith(".") or n in _SKIP_NAMES:
        return False
    if n.endswith(READABLE_SUFFIXES):
        return True
    return file_format(p) not in (None, "gzip")


def walk_readable(root: str | os.PathLike) -> list[Path]:
    """Every file below ``root`` (recursively, sorted) that :func:`is_readable_file` accepts."""
    return sorted(f for f in Path(root).rglob("*") if not any(part.startswith(".") for part in f.relative_to(root).parts)
                  and f.is_file() and is_readable_file(f))


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


def _inflate(d, data: bytes, limit: int, out: bytearray | None = None) -> tuple[bytearray, bytes]:
    """Feed ``data`` to the decompressor ``d`` until ``limit`` output bytes (never more) or the end of the stream;
    returns (output, the input not yet consumed)."""
    out = bytearray() if out is None else out
    buf = data
    while len(out) < limit:
        chunk = d.decompress(buf, min(1 << 22, limit - len(out)))
        out += chunk
        buf = d.unconsumed_tail
        if d.eof or (not chunk and not buf):
            break
    return out, buf


def _nifti_info(head: bytes) -> dict | None:
    """dims / bytes from a NIfTI-1 or -2 header, without trusting anything else in the file."""
    if not _is_nifti_header(head):
        return None
    for e in "<>":
        size = struct.unpack(e + "i", head[:4])[0]
        if size == 348:
            dim = struct.unpack(e + "8h", head[40:56])
            bitpix = struct.unpack(e + "h", head[72:74])[0]
            vox_offset = struct.unpack(e + "f", head[108:112])[0]
            break
        if size == 540:
            dim = struct.unpack(e + "8q", head[16:80])
            bitpix = struct.unpack(e + "h", head[14:16])[0]
            vox_offset = struct.unpack(e + "q", head[168:176])[0]
            break
    else:  # pragma: no cover - _is_nifti_header said yes
        return None
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(v < 1 for v in dim[1:ndim + 1]):
        raise ValueError(f"invalid NIfTI header dimensions {tuple(dim[:ndim + 1] if 0 <= ndim <= 7 else dim)}")
    if bitpix not in (1, 8, 16, 24, 32, 64, 128, 256) or not (0 <= vox_offset < 1 << 31) or not math.isfinite(vox_offset):
        raise ValueError(f"invalid NIfTI header (bitpix {bitpix}, vox_offset {vox_offset})")
    shape = tuple(int(v) for v in dim[1:ndim + 1])
    elements = math.prod(shape)
    return {"shape": shape, "elements": elements, "frames": shape[2] if ndim >= 3 else 1,
            "end": int(vox_offset) + (elements * bitpix + 7) // 8}


def _check_nifti_head(head: bytes, name: object, budget: DecodeBudget) -> dict:
    try:
        info = _nifti_info(head)
    except ValueError as e:
        raise _fail(name, e) from e
    if info is None:
        raise _fail(name, "not a NIfTI-1/2 header")
    budget.check(name, info["elements"], info["frames"])
    if info["end"] > budget.byte_cap:
        raise _fail(name, f"NIfTI data would be {info['end']} bytes, above the limit of {budget.byte_cap}")
    return info


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
    budget: DecodeBudget | None = None,
) -> tuple[np.ndarray, dict]:
    """Read a scan into a float32 channel-first array and a metadata dict.

    ``path`` may be a file (DICOM, NIfTI, PNG/JPEG/TIFF/BMP/GIF/WebP) or a folder holding one DICOM
    series (pick one with ``series_uid`` when it holds several). ``window`` applies a CT window
    (a name in :data:`WINDOWS`, ``'dicom'`` for the file's own VOI LUT / window, or ``(center, width)``)
    and scales the result to [0, 1]. ``budget`` (default :data:`DEFAULT_BUDGET`; ``max_elements``
    overrides its element cap) is enforced from the headers before decoding.
    """
    p = Path(path)
    win = resolve_window(window)
    bud = _budget(budget, max_elements)
    if p.is_dir():
        return read_dicom_series(p, window=win, series_uid=series_uid, budget=bud)
    if not p.exists():
        raise DataError(f"cannot read {p}: file not found")
    try:
        with open(p, "rb") as fh:
            head = fh.read(_HEAD)
    except OSError as e:
        raise _fail(p, e.strerror or e) from e
    fmt = sniff_format(head, p.name)
    if fmt == "gzip" and _is_nifti_header(_gunzip_head(p)):
        fmt = "nifti-gz"
    if fmt is None and p.suffix.lower() in DICOM_SUFFIXES and len(head) > 0:
        fmt = "dicom"  # last resort: pydicom with force=True, refused cleanly when it is not DICOM
    if fmt == "gzip":
        raise _fail(p, "gzip file that does not hold a NIfTI image")
    if fmt is None:
        raise _fail(p, f"unrecognised file format (suffix {p.suffix or 'none'!r}, not DICOM/NIfTI/PNG/JPEG/TIFF/BMP)")
    if fmt == "dicom":
        return _read_dicom(p, p, window=win, budget=bud)
    if fmt in ("nifti", "nifti-gz"):
        _check_nifti_head(_gunzip_head(p, 540) if fmt == "nifti-gz" else head, p, bud)
        return _read_nifti(p, p, window=win, budget=bud)
    return _read_pillow(p, p, fmt, window=win, budget=bud)


def read_image_bytes(
    data: bytes,
    name: str,
    *,
    window: str | tuple[float, float] | None = None,
    max_elements: int | None = None,
    budget: DecodeBudget | None = None,
) -> tuple[np.ndarray, dict]:
    """Like :func:`read_image` for an uploaded file's bytes; ``name`` is only a hint and for messages."""
    win = resolve_window(window)
    bud = _budget(budget, max_elements)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"cannot read {name}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise DataError(f"cannot read {name}: empty upload (0 bytes)")
    fmt = sniff_format(data[:_HEAD], name)
    if fmt == "gzip":
        raise DataError(f"cannot read {name}: gzip file that does not hold a NIfTI image")
    if fmt == "nifti-gz":
        info = _check_nifti_head(_gunzip_head(data, 540), name, bud)
        try:  # inflate exactly header + voxels: never more than the header (already within budget) says
            data = bytes(_inflate(zlib.decompressobj(16 + zlib.MAX_WBITS), data, info["end"])[0])
        except zlib.error as e:
            raise _fail(name, f"corrupt gzip stream ({e})", e) from e
        fmt = "nifti"
    elif fmt == "nifti":
        _check_nifti_head(data[:540], name, bud)
    if fmt is None:
        raise DataError(f"cannot read {name}: unrecognised format (not DICOM/NIfTI/PNG/JPEG/TIFF/BMP)")
    if fmt == "dicom":
        return _read_dicom(io.BytesIO(data), name, window=win, budget=bud)
    if fmt == "nifti":
        return _read_nifti(data, name, window=win, budget=bud)
    return _read_pillow(io.BytesIO(data), name, fmt, window=win, budget=bud)


# ----------------------------------------------------------------------------- DICOM


def _pydicom():
    from medsight.errors import optional_import

    return optional_import("pydicom")


def _dcmread(src, name, budget: DecodeBudget | None = None, **kw):
    """Parse a DICOM file (path or file object). Deflated datasets are inflated here through a capped
    stream (pydicom would inflate them without a limit)."""
    pydicom = _pydicom()
    budget = DEFAULT_BUDGET if budget is None else budget
    with _Contained(name, "not a readable DICOM file"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _read_deflated(src, name, budget)
        if ds is None:
            ds = pydicom.dcmread(src, force=True, **kw)
        # touch the elements so lazy parse errors surface here
        _ = ds.get("SOPClassUID")
    return ds


_DEFLATED = "1.2.840.10008.1.2.1.99"


def _read_deflated(src, name, budget: DecodeBudget):
    """The dataset of a Deflated Explicit VR Little Endian file, inflated within the budget; None for any
    other transfer syntax (the caller parses those with pydicom)."""
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import ExplicitVRLittleEndian

    fh = open(src, "rb") if isinstance(src, (str, os.PathLike)) else src
    try:
        start = fh.tell()
        try:
            read_preamble(fh, True)
            meta = _read_file_meta_info(fh)
        except Exception:
            fh.seek(start)
            return None
        if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED:
            fh.seek(start)
            return None
        compressed = fh.read()
    finally:
        if fh is not src:
            fh.close()
    cap = budget.byte_cap
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out, rest = _inflate(d, compressed, min(cap, 1 << 18))
    # the header (before Pixel Data) says how many bytes the dataset needs: allow that plus 1 MiB
    found: dict = {}

    def at_pixels(tag, vr, length):
        if tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
            found["length"] = length
            return True
        return False

    head = io.BytesIO(bytes(out))
    try:
        hdr = read_dataset(head, False, True, stop_when=at_pixels)
    except Exception:
        hdr = None
    if hdr is not None and "length" in found:
        pixel_bytes = found["length"]
        if pixel_bytes == 0xFFFFFFFF or pixel_bytes > cap:
            raise _fail(name, f"deflated Pixel Data declares {pixel_bytes} bytes, above the limit of {cap}")
        _check_header(hdr, name, budget)
        cap = min(cap, head.tell() + 12 + pixel_bytes + (1 << 20))
    if not d.eof:
        out, rest = _inflate(d, rest, cap + 1, out)
    if len(out) > cap:
        raise _fail(name, f"deflated data set inflates beyond the limit of {cap} bytes (decompression bomb guard)")
    if not d.eof:
        raise _fail(name, "deflated data set is truncated (no end of the deflate stream)")
    ds = read_dataset(io.BytesIO(bytes(out)), False, True)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # the data set is now plain explicit VR little endian
    ds.file_meta = meta
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


def _header_ints(ds, name) -> tuple[int, int, int, int, int]:
    """(rows, columns, frames, samples per pixel, bits allocated) from the header, validated."""
    for key in ("Rows", "Columns"):
        if key not in ds:
            raise _fail(name, f"DICOM pixel data without {key}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 8)
    except (TypeError, ValueError, OverflowError) as e:
        raise _fail(name, f"invalid image header values ({e})", e) from e
    if rows <= 0 or cols <= 0 or frames <= 0 or not 1 <= spp <= 4 or not 1 <= bits <= 64:
        raise _fail(name, f"invalid image header values (Rows {rows}, Columns {cols}, Number of Frames {frames}, "
                          f"Samples per Pixel {spp}, Bits Allocated {bits})")
    return rows, cols, frames, spp, bits


def _check_header(ds, name, budget: DecodeBudget) -> tuple[int, int, int, int, int]:
    rows, cols, frames, spp, bits = _header_ints(ds, name)
    channels = max(spp, 3 if "PALETTE" in str(ds.get("PhotometricInterpretation", "")) else 1)
    budget.check(name, rows * cols * frames * channels, frames)
    return rows, cols, frames, spp, bits


# --- compressed pixel data: the codestream's own header must agree with the data set's, before decoding

_JPEG_TS = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}  # JPEG baseline/extended/lossless, JPEG-LS
_J2K_TS = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
           "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}  # JPEG 2000, HTJ2K
_RLE_TS = "1.2.840.10008.1.2.5"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # 0xF7: JPEG-LS SOF55


def jpeg_frame_size(buf: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from a JPEG or JPEG-LS frame header (SOFn / SOF55). ValueError if absent."""
    if buf[:2] != b"\xff\xd8":
        raise ValueError("JPEG frame does not start with an SOI marker")
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            raise ValueError(f"malformed JPEG marker at byte {i}")
        m = buf[i + 1]
        if m == 0xFF:
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:
            i += 2
            continue
        if m == 0xD9:
            break
        seg = int.from_bytes(buf[i + 2:i + 4], "big")
        if seg < 2:
            raise ValueError(f"malformed JPEG segment length at byte {i}")
        if m in _SOF:
            if i + 10 > n or seg < 8:
                raise ValueError("truncated JPEG frame header")
            rows = int.from_bytes(buf[i + 5:i + 7], "big")
            cols = int.from_bytes(buf[i + 7:i + 9], "big")
            return rows, cols, buf[i + 9]
        if m == 0xDA:
            raise ValueError("JPEG scan before any frame header")
        i += 2 + seg
    raise ValueError("no JPEG frame header (SOF) found")


def j2k_frame_size(buf: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ segment (or a JP2 file's codestream)."""
    pos = 0
    if buf[:4] != b"\xff\x4f\xff\x51":
        if buf[4:8] != b"jP  ":
            raise ValueError("not a JPEG 2000 codestream (no SOC/SIZ markers)")
        pos = buf.find(b"\xff\x4f\xff\x51", 0, 1 << 16)
        if pos < 0:
            raise ValueError("JP2 file without a JPEG 2000 codestream")
    siz = buf[pos + 4:pos + 4 + 38]
    if len(siz) < 38:
        raise ValueError("truncated JPEG 2000 SIZ segment")
    x, y, x0, y0 = struct.unpack(">4I", siz[4:20])
    comps = int.from_bytes(siz[36:38], "big")
    if x <= x0 or y <= y0:
        raise ValueError(f"invalid JPEG 2000 image area ({x}x{y} from offset {x0},{y0})")
    return y - y0, x - x0, comps


def rle_check(buf: bytes, segments: int) -> None:
    """Validate a DICOM RLE frame's 64-byte header: segment count and increasing in-range offsets."""
    if len(buf) < 64:
        raise ValueError(f"RLE frame of {len(buf)} bytes has no 64-byte header")
    head = struct.unpack("<16I", buf[:64])
    n, offsets = head[0], head[1:]
    if n != segments:
        raise ValueError(f"RLE header lists {n} segments; Samples per Pixel x bytes per sample needs {segments}")
    offs = list(offsets[:n])
    if offs[0] != 64 or any(b <= a for a, b in zip(offs, offs[1:])) or offs[-1] >= len(buf) or any(offsets[n:]):
        raise ValueError(f"RLE segment offsets {offs} are not increasing within the {len(buf)}-byte frame")


def _check_codestreams(ds, name, tsuid: str, rows: int, cols: int, frames: int, spp: int, bits: int) -> None:
    from pydicom.encaps import generate_frames

    if tsuid not in _JPEG_TS and tsuid not in _J2K_TS and tsuid != _RLE_TS:
        raise _fail(name, f"compressed transfer syntax {tsuid} is not supported")
    count = 0
    try:
        for frame in generate_frames(ds.PixelData, number_of_frames=frames):
            count += 1
            if count > frames:
                break
            if tsuid == _RLE_TS:
                rle_check(frame, spp * ((bits + 7) // 8))
                continue
            h, w, c = (jpeg_frame_size if tsuid in _JPEG_TS else j2k_frame_size)(frame)
            if (h, w) != (rows, cols) or c > max(spp, 1):
                raise ValueError(f"frame {count}'s codestream says {h}x{w} with {c} components, the header says "
                                 f"Rows {rows}, Columns {cols}, Samples per Pixel {spp}")
    except ValueError as e:
        raise _fail(name, f"compressed pixel data refused before decoding: {e}") from e
    except Exception as e:  # pydicom's item parser on malformed encapsulation
        raise _fail(name, f"malformed encapsulated pixel data ({type(e).__name__}: {e})", e) from e
    if count != frames:
        raise _fail(name, f"compressed pixel data holds {count if count <= frames else 'more'} frame(s), "
                          f"Number of Frames says {frames}")


def _decode_pixels(ds, name, budget: DecodeBudget, dims: tuple[int, int, int, int, int]) -> np.ndarray:
    from pydicom import pixels as px

    tsuid = str(ds.file_meta.TransferSyntaxUID)
    compressed = "PixelData" in ds and getattr(ds.file_meta.TransferSyntaxUID, "is_compressed", False)
    if compressed:
        rows, cols, frames, spp, bits = dims
        _check_codestreams(ds, name, tsuid, rows, cols, frames, spp, bits)
        if budget.isolate:
            return decode_isolated(ds, name)
    with _Contained(name, "cannot decode DICOM pixel data"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return px.pixel_array(ds)  # YBR -> RGB conversion on by default


# --- decoding in a worker process

#: Address space a decoder worker may add to what it holds after start-up (RLIMIT_AS): a decoded array at the
#: default budget is at most 2**27 x 4 bytes, plus the decoder's own buffers and the pickled copy.
WORKER_MEMORY = 3 << 30
#: Seconds one isolated decode may take before its worker is killed.
DECODE_TIMEOUT_S = 120.0
#: Data set elements a pixel decoder needs (everything else stays in this process).
_PIXEL_MODULE = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                 "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames")
#: Decoder worker processes kept for reuse (at most this many decode at once).
MAX_WORKERS = 2
_idle_workers: list = []
_workers_lock = threading.Lock()
_workers_sem = threading.BoundedSemaphore(MAX_WORKERS)


def _vm_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 1 << 30


def _worker_main() -> None:  # pragma: no cover - runs in the worker process
    """Decoder worker: pixel decoders imported, address space capped, then length-prefixed pickled requests
    on stdin answered on stdout until stdin closes."""
    import pickle
    import resource
    import sys

    out, inp = sys.stdout.buffer, sys.stdin.buffer
    sys.stdout = sys.stderr  # nothing printed by a library can corrupt the replies
    import pydicom.pixels  # noqa: F401
    for mod in ("pylibjpeg", "openjpeg", "libjpeg", "rle"):
        try:
            __import__(mod)
        except ImportError:
            pass
    headroom = int(os.environ.get("MEDSIGHT_WORKER_MEMORY", WORKER_MEMORY))
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _vm_bytes() + headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    except (ValueError, OSError):
        pass
    while True:
        hdr = inp.read(8)
        if len(hdr) < 8:
            return
        req = pickle.loads(inp.read(int.from_bytes(hdr, "little")))
        res = _worker_decode(*req)
        try:
            data = pickle.dumps(res, protocol=5)
        except MemoryError:
            data = pickle.dumps(("error", "MemoryError", "decoded image does not fit the worker's memory limit"))
        out.write(len(data).to_bytes(8, "little"))
        out.write(data)
        out.flush()


def _worker_decode(ts: str, elements: dict, pixel_data: bytes):
    """Rebuild a minimal data set and decode it. Returns ('ok', array) or ('error', type name, message):
    no exception object (e.g. pyo3's PanicException) has to cross the process boundary."""
    try:
        from pydicom import pixels as px
        from pydicom.dataset import Dataset, FileMetaDataset

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
        for k, v in elements.items():
            setattr(ds, k, v)
        ds.add_new(0x7FE00010, "OB", pixel_data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ("ok", np.asarray(px.pixel_array(ds)))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - decoders raise anything, incl. pyo3 PanicException
        return ("error", type(e).__name__, _one_line(e))


class _WorkerGone(Exception):
    pass


class _Worker:
    """One decoder process (``python -c``: nothing of the caller's ``__main__`` is re-run in it)."""

    def __init__(self):
        import subprocess
        import sys

        pkg_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([pkg_root, *filter(None, [os.environ.get("PYTHONPATH")])]))
        self.pid_owner = os.getpid()
        self.proc = subprocess.Popen([sys.executable, "-c", "from medsight.data.io import _worker_main; _worker_main()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)

    def call(self, req, timeout: float):
        import pickle
        import select
        import time

        data = pickle.dumps(req, protocol=5)
        try:
            self.proc.stdin.write(len(data).to_bytes(8, "little"))
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise _WorkerGone() from e
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()

        def read(n: int) -> bytes:
            buf = bytearray()
            while len(buf) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
                chunk = os.read(fd, min(n - len(buf), 1 << 24))
                if not chunk:
                    raise _WorkerGone()
                buf += chunk
            return bytes(buf)

        n = int.from_bytes(read(8), "little")
        return pickle.loads(read(n))

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except Exception:  # noqa: BLE001
            self.kill()


def _close_workers() -> None:
    with _workers_lock:
        mine = [w for w in _idle_workers if w.pid_owner == os.getpid()]
        _idle_workers.clear()
    for w in mine:
        w.close()


atexit.register(_close_workers)


def _forget_workers_after_fork() -> None:
    """A forked child (e.g. a DataLoader worker) starts its own decoder workers; the parent's pipes stay the parent's."""
    global _workers_lock, _workers_sem
    _workers_lock = threading.Lock()
    _workers_sem = threading.BoundedSemaphore(MAX_WORKERS)
    _idle_workers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_after_fork)


def decode_isolated(ds, name: object = "image", *, timeout: float | None = None) -> np.ndarray:
    """Decode a DICOM data set's (compressed) pixel data in a worker process (started once, reused) whose
    address space is capped at start-up + :data:`WORKER_MEMORY`. A decoder exception, a memory error, a
    crash (segfault, abort) or a hang past ``timeout`` (default :data:`DECODE_TIMEOUT_S`) costs only this
    file: DataError naming it."""
    elements = {k: ds[k].value for k in _PIXEL_MODULE if k in ds}
    req = (str(ds.file_meta.TransferSyntaxUID), elements, bytes(ds.PixelData))
    limit = DECODE_TIMEOUT_S if timeout is None else float(timeout)
    with _workers_sem:
        with _workers_lock:
            worker = None
            while _idle_workers and worker is None:
                w = _idle_workers.pop()
                if w.pid_owner == os.getpid() and w.proc.poll() is None:
                    worker = w
        if worker is None:
            try:
                worker = _Worker()
            except OSError as e:
                raise _fail(name, f"cannot start the pixel decoder process ({e.strerror or e})") from e
        try:
            got = worker.call(req, limit)
        except TimeoutError:
            worker.kill()
            raise _fail(name, f"decoding pixel data took longer than {limit:g} s; the decoder was stopped") from None
        except (_WorkerGone, EOFError, OSError):
            worker.kill()
            code = worker.proc.returncode
            how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            raise _fail(name, f"the pixel decoder crashed on this file (worker process ended: {how})") from None
        with _workers_lock:
            _idle_workers.append(worker)
    if got[0] == "ok":
        return got[1]
    raise _fail(name, f"cannot decode DICOM pixel data ({got[1]}: {got[2]})")


def _dicom_to_array(ds, name, *, window, budget: DecodeBudget) -> tuple[np.ndarray, dict]:
    """Decode one DICOM dataset (single or multi-frame) into (C,H,W) or (C,F,H,W)."""
    from pydicom import pixels as px

    if not _has_pixels(ds):
        sop = ds.get("SOPClassUID")
        sop_name = getattr(sop, "name", sop) if sop is not None else "unknown SOP class"
        raise _fail(name, f"DICOM file has no pixel data ({sop_name})")
    dims = _check_header(ds, name, budget)
    rows, cols, frames, spp, _ = dims
    try:
        bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    except (TypeError, ValueError) as e:
        raise _fail(name, f"invalid image header values ({e})", e) from e
    expected = _expected_bytes(ds)
    if expected is not None:
        got = len(ds.PixelData)
        if got < expected:
            raise _fail(name, f"DICOM pixel data truncated (expected {expected} bytes, got {got})")
    _ensure_transfer_syntax(ds)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    arr = _decode_pixels(ds, name, budget, dims)
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


def _read_dicom(src, name, *, window, budget: DecodeBudget) -> tuple[np.ndarray, dict]:
    ds = _dcmread(src, name, budget)
    with _Contained(name, "invalid DICOM image"), warnings.catch_warnings():
        if len(ds) == 0 or ("SOPClassUID" not in ds and "Rows" not in ds and not _has_pixels(ds)):
            raise _fail(name, "not a DICOM image (no SOP Class, no image attributes)")
        warnings.simplefilter("ignore")  # pydicom warns on invalid values; we refuse or read them
        return _dicom_to_array(ds, name, window=window, budget=budget)


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
            ds = _dcmread(f, f, DEFAULT_BUDGET, stop_before_pixels=True)  # deflated files: capped inflation
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
    budget: DecodeBudget | None = None,
) -> tuple[np.ndarray, dict]:
    """Read a folder holding one DICOM series into a (C, D, H, W) volume sorted along the slice normal."""
    d = Path(directory)
    budget = _budget(budget, max_elements)
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

    if len(files) > budget.max_frames:
        budget.check(d, 1, len(files))
    slices = []
    for f in files:
        ds = _dcmread(f, f, budget)
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
    if len(slices) * shape0[0] * shape0[1] > budget.max_elements:
        raise DataError(f"cannot read {d}: series has {len(slices) * shape0[0] * shape0[1]} voxels, above the limit of {budget.max_elements}")
    arrays, metas = [], []
    for f, ds in slices:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, m = _dicom_to_array(ds, f, window=win, budget=budget)
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


def _read_nifti(src, name, *, window, budget: DecodeBudget) -> tuple[np.ndarray, dict]:
    from medsight.errors import optional_import

    nib = optional_import("nibabel")
    with _Contained(name, "not a readable NIfTI file"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(src, (bytes, bytearray)):
            size = struct.unpack("<i", src[:4])[0]
            if size not in (348, 540):
                size = struct.unpack(">i", src[:4])[0]
            cls = nib.Nifti2Image if size == 540 else nib.Nifti1Image
            img = cls.from_bytes(bytes(src))
        else:
            img = nib.load(str(src))
    shape = tuple(int(s) for s in img.shape)
    budget.check(name, math.prod(shape) if shape else 0, shape[2] if len(shape) >= 3 else 1)
    if len(shape) not in (2, 3, 4) and not (len(shape) == 5 and shape[3] == 1):
        raise _fail(name, f"unsupported NIfTI shape {shape}; expected 2D, 3D or 4D")
    with _Contained(name, "cannot decode NIfTI data"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        can = nib.as_closest_canonical(img) if len(shape) >= 3 else img
        data = np.asarray(can.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in can.header.get_zooms())
        axcodes = "".join(nib.aff2axcodes(can.affine)) if len(shape) >= 3 else None
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


def _read_pillow(src, name, fmt, *, window, budget: DecodeBudget) -> tuple[np.ndarray, dict]:
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
                budget.check(name, w * h * max(bands, 1) * use_frames, use_frames)  # before any pixel is decoded
                frames = []
                for i in range(use_frames):
                    img.seek(i)
                    img.load()
                    frames.append(_pil_frame(img, Image, ImageOps))
                pil_format = img.format
                info = dict(img.info)
    except (DataError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # PIL.UnidentifiedImageError, OSError (truncated), DecompressionBomb*, ...
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
