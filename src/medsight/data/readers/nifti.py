"""NIfTI-1 / NIfTI-2 (``.nii``, ``.nii.gz``) through nibabel, canonicalised to RAS."""

from __future__ import annotations

import gzip
import math
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from medsight.data.readers.base import Contained, Reader, fail, finish, inflate
from medsight.data.readers.budget import DecodeBudget
from medsight.data.readers.windowing import FILE_WINDOW, apply_window

_GZIP = b"\x1f\x8b"


class NiftiReader(Reader):
    name = "nifti"
    label = "NIfTI"
    suffixes = (".nii", ".nii.gz")

    def sniff(self, head: bytes) -> str | None:
        if head.startswith(_GZIP):
            return "nifti-gz" if is_nifti_header(gunzip_head(head)) else None
        return "nifti" if is_nifti_header(head) else None

    def guess(self, head: bytes, name: str) -> str | None:
        low = str(name).lower()
        if head.startswith(_GZIP):  # a gzip stream only NIfTI reads here: the name decides, else refused as 'gzip'
            return "nifti-gz" if low.endswith(".nii.gz") else "gzip"
        return "nifti" if low.endswith(".nii") else None

    def read(self, source, name, fmt, *, window, budget):
        if isinstance(source, Path):
            if fmt == "gzip" or (fmt == "nifti-gz" and not is_nifti_header(gunzip_head(source))):
                raise fail(name, "gzip file that does not hold a NIfTI image")
            with open(source, "rb") as fh:
                head = gunzip_head(source, 540) if fmt == "nifti-gz" else fh.read(540)
            check_nifti_head(head, name, budget)
            return _read_nifti(source, name, window=window, budget=budget)
        data = bytes(source)
        if fmt == "nifti-gz":
            info = check_nifti_head(gunzip_head(data, 540), name, budget)
            try:  # inflate exactly header + voxels: never more than the header (already within budget) says
                data = bytes(inflate(zlib.decompressobj(16 + zlib.MAX_WBITS), data, info["end"])[0])
            except zlib.error as e:
                raise fail(name, f"corrupt gzip stream ({e})", e) from e
        else:
            check_nifti_head(data[:540], name, budget)
        return _read_nifti(data, name, window=window, budget=budget)


def is_nifti_header(head: bytes) -> bool:
    if len(head) < 348:
        return False
    for endian in "<>":
        size = struct.unpack(endian + "i", head[:4])[0]
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return True
        if size == 540 and head[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def gunzip_head(data_or_path: bytes | Path, n: int = 600) -> bytes:
    try:
        if isinstance(data_or_path, (bytes, bytearray)):
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            return d.decompress(bytes(data_or_path[: 1 << 16]), n)
        with gzip.open(data_or_path, "rb") as fh:
            return fh.read(n)
    except (OSError, EOFError, zlib.error):
        return b""


def _nifti_info(head: bytes) -> dict | None:
    """dims / bytes from a NIfTI-1 or -2 header, without trusting anything else in the file."""
    if not is_nifti_header(head):
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


def check_nifti_head(head: bytes, name: object, budget: DecodeBudget) -> dict:
    try:
        info = _nifti_info(head)
    except ValueError as e:
        raise fail(name, e) from e
    if info is None:
        raise fail(name, "not a NIfTI-1/2 header")
    budget.check(name, info["elements"], info["frames"])
    if info["end"] > budget.byte_cap:
        raise fail(name, f"NIfTI data would be {info['end']} bytes, above the limit of {budget.byte_cap}")
    return info



def _read_nifti(src, name, *, window, budget: DecodeBudget) -> tuple[np.ndarray, dict]:
    from medsight.errors import optional_import

    nib = optional_import("nibabel")
    with Contained(name, "not a readable NIfTI file"), warnings.catch_warnings():
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
        raise fail(name, f"unsupported NIfTI shape {shape}; expected 2D, 3D or 4D")
    with Contained(name, "cannot decode NIfTI data"), warnings.catch_warnings():
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
            raise fail(name, "window='dicom' only applies to DICOM files")
        c, w = window
        data = apply_window(data, c, w)
        meta["window"] = (float(c), float(w))
        meta["value_range"] = (0.0, 1.0)
    return finish(data, meta, name)
