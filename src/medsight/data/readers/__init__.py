"""Readers behind one registry: "can this file be read, and as what?" is answered here and nowhere else.

Every entry point (a file, an upload's bytes, a folder walk, ``predict``, the service, ``qc``, ``deid``) goes
through :func:`read` / :func:`find_reader`, which ask the registered readers in order (content first, the name
only as a tie-break). Everything downstream sees ``(array, meta)``: float32, ``(C, H, W)`` for 2D images and
``(C, D, H, W)`` for volumes, and ``meta`` a plain dict::

    format       'dicom' | 'dicom-series' | 'nifti' | 'png' | 'jpeg' | 'tiff' | 'bmp' | 'gif' | 'webp' | <a reader's>
    modality     DICOM Modality ('CT', 'MR', 'CR', ...) or 'OT' for photos / NIfTI
    spacing      tuple of floats, one per spatial axis in array order (mm for DICOM/NIfTI; 1.0 when unknown)
    orientation  'RAS' for NIfTI (after canonicalisation), 'LPS' for DICOM series, None otherwise
    photometric  'MONOCHROME2' (after MONOCHROME1 inversion) or 'RGB'
    shape        array shape
    bits         stored bits per sample of the source
    value_range  (lo, hi) the source's nominal value range, for normalisation; None when unbounded
    window       (center, width) that was applied, or None
    private      dict of identifying values (patient/study ids); never log or print it

Adding a format = one new module here with a :class:`Reader` subclass + one :func:`register_reader` call below.

Modules: ``base`` (Reader, one-line failures, result contract), ``budget`` (DecodeBudget, budget_for),
``windowing`` (CT windows), ``registry`` (registration and the one dispatch), ``isolated`` (the decoder
process), ``codestream`` (JPEG / JPEG 2000 / RLE headers and text segments), ``dicom``, ``nifti``, ``pillow``.
"""

from __future__ import annotations

from medsight.data.readers.base import Reader, fail, finish
from medsight.data.readers.budget import (
                                          DEFAULT_BUDGET,
                                          MAX_2D_SOURCE_PIXELS,
                                          MAX_ELEMENTS,
                                          TOOL_BUDGET,
                                          DecodeBudget,
                                          budget_for,
                                          resolve_budget,
)
from medsight.data.readers.dicom import DicomReader
from medsight.data.readers.nifti import NiftiReader
from medsight.data.readers.pillow import PillowReader
from medsight.data.readers.registry import (
                                          HEAD,
                                          file_format,
                                          find_reader,
                                          is_readable_file,
                                          is_readable_name,
                                          read,
                                          read_image,
                                          read_image_bytes,
                                          readable_suffixes,
                                          readers,
                                          register_reader,
                                          sniff_format,
                                          unregister_reader,
                                          walk_readable,
)
from medsight.data.readers.windowing import (
                                          FILE_WINDOW,
                                          WINDOWS,
                                          apply_window,
                                          resolve_window,
)

# the order readers are asked in (content signatures first across all of them, then names)
register_reader(DicomReader())
register_reader(PillowReader())
register_reader(NiftiReader())

__all__ = [
    "DEFAULT_BUDGET", "FILE_WINDOW", "HEAD", "MAX_2D_SOURCE_PIXELS", "MAX_ELEMENTS", "TOOL_BUDGET", "WINDOWS",
    "DecodeBudget", "Reader", "apply_window", "budget_for", "fail", "file_format", "find_reader", "finish",
    "is_readable_file", "is_readable_name", "read", "read_image", "read_image_bytes", "readable_suffixes", "readers",
    "register_reader", "resolve_budget", "resolve_window", "sniff_format", "unregister_reader", "walk_readable",
]
