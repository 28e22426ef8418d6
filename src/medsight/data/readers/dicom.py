"""DICOM: single files (native, deflated, JPEG / JPEG-LS / JPEG 2000 / RLE encapsulated) and series folders.

Deflated data sets are inflated through a capped stream; compressed pixel data are checked against the
codestream's own header (``codestream.py``) and decoded in the isolated decoder process (``isolated.py``).
"""

from __future__ import annotations

import io
import math
import os
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medsight.data.readers.base import Contained, Reader, fail, finish, inflate
from medsight.data.readers.budget import DEFAULT_BUDGET, DecodeBudget, resolve_budget
from medsight.data.readers.codestream import (
    J2K_TS,
    JPEG_TS,
    RLE_TS,
    j2k_frame_size,
    jpeg_frame_size,
    rle_check,
)
from medsight.data.readers.isolated import decode_isolated
from medsight.data.readers.windowing import FILE_WINDOW, apply_window, resolve_window
from medsight.errors import DataError

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Modalities whose values have no fixed range (HU, MR, PET, dose): normalise per image instead.
_UNBOUNDED_MODALITIES = {"CT", "MR", "PT", "NM", "RTDOSE"}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Deflated Explicit VR Little Endian.
DEFLATED_TS = "1.2.840.10008.1.2.1.99"


class DicomReader(Reader):
    name = "dicom"
    suffixes = DICOM_SUFFIXES

    def sniff(self, head: bytes) -> str | None:
        return "dicom" if len(head) >= 132 and head[128:132] == b"DICM" else None

    def guess(self, head: bytes, name: str) -> str | None:
        # DICOM without preamble: starts with a group 0002 or 0008 element (either byte order); else the suffix
        if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
            return "dicom"
        return super().guess(head, name)

    def read(self, source, name, fmt, *, window, budget):
        src = source if isinstance(source, Path) else io.BytesIO(bytes(source))
        return read_dicom(src, name, window=window, budget=budget)


def _pydicom():
    from medsight.errors import optional_import

    return optional_import("pydicom")


def dcmread(src, name, budget: DecodeBudget | None = None, **kw):
    """Parse a DICOM file (path or file object). Deflated datasets are inflated here through a capped
    stream (pydicom would inflate them without a limit)."""
    pydicom = _pydicom()
    budget = DEFAULT_BUDGET if budget is None else budget
    with Contained(name, "not a readable DICOM file"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _read_deflated(src, name, budget)
        if ds is None:
            ds = pydicom.dcmread(src, force=True, **kw)
        # touch the elements so lazy parse errors surface here
        _ = ds.get("SOPClassUID")
    return ds


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
        if str(meta.get("TransferSyntaxUID", "")) != DEFLATED_TS:
            fh.seek(start)
            return None
        compressed = fh.read()
    finally:
        if fh is not src:
            fh.close()
    cap = budget.byte_cap
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out, rest = inflate(d, compressed, min(cap, 1 << 18))
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
            raise fail(name, f"deflated Pixel Data declares {pixel_bytes} bytes, above the limit of {cap}")
        _check_header(hdr, name, budget)
        need = _expected_bytes(hdr)
        if need is not None and pixel_bytes > need + (need & 1) + 16:
            raise fail(name, f"deflated Pixel Data declares {pixel_bytes} bytes; Rows x Columns x frames x samples "
                             f"need {need} (decompression bomb guard)")
        cap = min(cap, head.tell() + 12 + pixel_bytes + (1 << 20))
    if not d.eof:
        out, rest = inflate(d, rest, cap + 1, out)
    if len(out) > cap:
        raise fail(name, f"deflated data set inflates beyond the limit of {cap} bytes (decompression bomb guard)")
    if not d.eof:
        raise fail(name, "deflated data set is truncated (no end of the deflate stream)")
    data = bytes(out)
    del out, head  # one copy of the inflated data set at a time
    ds = read_dataset(io.BytesIO(data), False, True)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # the data set is now plain explicit VR little endian
    ds.file_meta = meta
    return ds


def _has_pixels(ds) -> bool:
    return any(t in ds for t in _PIXEL_TAGS)


#: identifying header values kept (never logged) in ``meta["private"]``: qc counts which files carry them
PRIVATE_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "OtherPatientIDs", "StudyInstanceUID",
                "SeriesInstanceUID", "AccessionNumber", "StudyDate", "SeriesDate", "AcquisitionDate",
                "InstitutionName", "ReferringPhysicianName")


def private_ids(ds) -> dict:
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


def ensure_transfer_syntax(ds) -> None:
    pydicom = _pydicom()
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

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
            raise fail(name, f"DICOM pixel data without {key}")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 8)
    except (TypeError, ValueError, OverflowError) as e:
        raise fail(name, f"invalid image header values ({e})", e) from e
    if rows <= 0 or cols <= 0 or frames <= 0 or not 1 <= spp <= 4 or not 1 <= bits <= 64:
        raise fail(name, f"invalid image header values (Rows {rows}, Columns {cols}, Number of Frames {frames}, "
                          f"Samples per Pixel {spp}, Bits Allocated {bits})")
    return rows, cols, frames, spp, bits


def _check_header(ds, name, budget: DecodeBudget) -> tuple[int, int, int, int, int]:
    rows, cols, frames, spp, bits = _header_ints(ds, name)
    channels = max(spp, 3 if "PALETTE" in str(ds.get("PhotometricInterpretation", "")) else 1)
    budget.check(name, rows * cols * frames * channels, frames)
    return rows, cols, frames, spp, bits



def _check_codestreams(ds, name, tsuid: str, rows: int, cols: int, frames: int, spp: int, bits: int) -> None:
    from pydicom.encaps import generate_frames

    if tsuid not in JPEG_TS and tsuid not in J2K_TS and tsuid != RLE_TS:
        raise fail(name, f"compressed transfer syntax {tsuid} is not supported")
    count = 0
    try:
        for frame in generate_frames(ds.PixelData, number_of_frames=frames):
            count += 1
            if count > frames:
                break
            if tsuid == RLE_TS:
                rle_check(frame, spp * ((bits + 7) // 8))
                continue
            h, w, c = (jpeg_frame_size if tsuid in JPEG_TS else j2k_frame_size)(frame)
            if (h, w) != (rows, cols) or c > max(spp, 1):
                raise ValueError(f"frame {count}'s codestream says {h}x{w} with {c} components, the header says "
                                 f"Rows {rows}, Columns {cols}, Samples per Pixel {spp}")
    except ValueError as e:
        raise fail(name, f"compressed pixel data refused before decoding: {e}") from e
    except Exception as e:  # pydicom's item parser on malformed encapsulation
        raise fail(name, f"malformed encapsulated pixel data ({type(e).__name__}: {e})", e) from e
    if count != frames:
        raise fail(name, f"compressed pixel data holds {count if count <= frames else 'more'} frame(s), "
                          f"Number of Frames says {frames}")


def check_pixel_data(ds, name, budget: DecodeBudget | None = None) -> None:
    """Everything :func:`read_dicom` checks before decoding, without decoding: header sizes within ``budget``,
    native pixel data long enough, compressed frames whose codestream headers agree with the data set's.
    For tools that copy pixel data (``deid``). No pixel data: nothing to check."""
    if not _has_pixels(ds):
        return
    budget = DEFAULT_BUDGET if budget is None else budget
    rows, cols, frames, spp, bits = _check_header(ds, name, budget)
    ensure_transfer_syntax(ds)
    expected = _expected_bytes(ds)
    if expected is not None and "PixelData" in ds and len(ds.PixelData) < expected:
        raise fail(name, f"DICOM pixel data truncated (expected {expected} bytes, got {len(ds.PixelData)})")
    ts = ds.file_meta.TransferSyntaxUID
    if "PixelData" in ds and getattr(ts, "is_compressed", False):
        _check_codestreams(ds, name, str(ts), rows, cols, frames, spp, bits)


def _decode_pixels(ds, name, budget: DecodeBudget, dims: tuple[int, int, int, int, int]) -> np.ndarray:
    from pydicom import pixels as px

    tsuid = str(ds.file_meta.TransferSyntaxUID)
    compressed = "PixelData" in ds and getattr(ds.file_meta.TransferSyntaxUID, "is_compressed", False)
    if compressed:
        rows, cols, frames, spp, bits = dims
        _check_codestreams(ds, name, tsuid, rows, cols, frames, spp, bits)
        if budget.isolate:
            return decode_isolated(ds, name)
    with Contained(name, "cannot decode DICOM pixel data"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return px.pixel_array(ds)  # YBR -> RGB conversion on by default



# --- decoding

def _dicom_to_array(ds, name, *, window, budget: DecodeBudget) -> tuple[np.ndarray, dict]:
    """Decode one DICOM dataset (single or multi-frame) into (C,H,W) or (C,F,H,W)."""
    from pydicom import pixels as px

    if not _has_pixels(ds):
        sop = ds.get("SOPClassUID")
        sop_name = getattr(sop, "name", sop) if sop is not None else "unknown SOP class"
        raise fail(name, f"DICOM file has no pixel data ({sop_name})")
    dims = _check_header(ds, name, budget)
    rows, cols, frames, spp, _ = dims
    try:
        bits_stored = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    except (TypeError, ValueError) as e:
        raise fail(name, f"invalid image header values ({e})", e) from e
    expected = _expected_bytes(ds)
    if expected is not None:
        got = len(ds.PixelData)
        if got < expected:
            raise fail(name, f"DICOM pixel data truncated (expected {expected} bytes, got {got})")
    ensure_transfer_syntax(ds)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    arr = _decode_pixels(ds, name, budget, dims)
    arr = np.asarray(arr)
    if arr.size == 0:
        raise fail(name, "DICOM pixel data decoded to an empty array")

    modality = str(ds.get("Modality", "OT") or "OT").strip() or "OT"
    meta: dict[str, Any] = {
        "format": "dicom",
        "modality": modality,
        "photometric": "MONOCHROME2",
        "bits": bits_stored,
        "window": None,
        "orientation": None,
        "private": private_ids(ds),
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
        raise fail(name, f"cannot apply DICOM colour palette ({type(e).__name__}: {e})", e) from e

    if is_color:
        meta["photometric"] = "RGB"
        arr = arr.astype(np.float32)
        # (H,W,3) or (F,H,W,3) -> channel first
        arr = np.moveaxis(arr, -1, 0)
    else:
        try:
            mod = px.apply_modality_lut(arr, ds).astype(np.float32)
        except Exception as e:
            raise fail(name, f"cannot apply DICOM rescale / modality LUT ({type(e).__name__}: {e})", e) from e
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
                raise fail(name, "window='dicom' requested but the file has no VOI LUT or Window Center/Width")
            if "VOILUTSequence" in ds:
                try:
                    voi = px.apply_voi_lut(mod, ds, prefer_lut=True).astype(np.float32)
                    lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
                except Exception as e:
                    raise fail(name, f"cannot apply DICOM VOI LUT ({type(e).__name__}: {e})", e) from e
                mod = np.clip(voi / float(2**lut_bits - 1), 0.0, 1.0)
                meta["window"] = None
            else:
                c, w = _first_float(ds.WindowCenter), _first_float(ds.WindowWidth)
                if c is None or w is None or w <= 0:
                    raise fail(name, f"invalid Window Center/Width in file ({ds.WindowCenter!r}, {ds.WindowWidth!r})")
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
    return finish(arr, meta, name)


def _first_float(v) -> float | None:
    try:
        if isinstance(v, (list, tuple)) or hasattr(v, "__len__") and not isinstance(v, str):
            v = v[0]
        return float(v)
    except Exception:
        return None


def read_dicom(src, name, *, window, budget: DecodeBudget) -> tuple[np.ndarray, dict]:
    ds = dcmread(src, name, budget)
    with Contained(name, "invalid DICOM image"), warnings.catch_warnings():
        if len(ds) == 0 or ("SOPClassUID" not in ds and "Rows" not in ds and not _has_pixels(ds)):
            raise fail(name, "not a DICOM image (no SOP Class, no image attributes)")
        warnings.simplefilter("ignore")  # pydicom warns on invalid values; we refuse or read them
        return _dicom_to_array(ds, name, window=window, budget=budget)


def list_dicom_series(directory: str | os.PathLike) -> dict[str, list[Path]]:
    """Group the DICOM image files below ``directory`` by SeriesInstanceUID (non-DICOM files are skipped)."""
    d = Path(directory)
    _pydicom()  # a clear message when pydicom is missing
    groups: dict[str, list[Path]] = {}
    for f in sorted(d.rglob("*")):
        if not f.is_file() or f.name.startswith(".") or f.name.upper() == "DICOMDIR":
            continue
        try:
            with open(f, "rb") as fh:
                head = fh.read(600)
        except OSError:
            continue
        if DicomReader().sniff(head) is None and DicomReader().guess(head, f.name) is None:
            continue
        try:
            ds = dcmread(f, f, DEFAULT_BUDGET, stop_before_pixels=True)  # deflated files: capped inflation
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
    budget = resolve_budget(budget, max_elements)
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
        ds = dcmread(f, f, budget)
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
    return finish(vol, meta, d)
