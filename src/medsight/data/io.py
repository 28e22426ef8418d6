"""Compatibility facade: the readers live in :mod:`medsight.data.readers` (one registry, one dispatch).

Kept so code written against ``medsight.data.io`` keeps working; new code imports from ``medsight.data.readers``
(or its modules: ``budget``, ``windowing``, ``dicom``, ``codestream``, ``isolated``).
"""

from __future__ import annotations

from medsight.data.readers import (DEFAULT_BUDGET, FILE_WINDOW, MAX_2D_SOURCE_PIXELS, MAX_ELEMENTS, TOOL_BUDGET, WINDOWS,
                                   DecodeBudget, apply_window, budget_for, file_format, is_readable_file,
                                   is_readable_name, read_image, read_image_bytes, readable_suffixes, resolve_window,
                                   sniff_format, walk_readable)
from medsight.data.readers.codestream import j2k_frame_size, jpeg_frame_size, rle_check
from medsight.data.readers.dicom import PRIVATE_KEYS, list_dicom_series, read_dicom_series
from medsight.data.readers.isolated import decode_isolated
from medsight.data.readers.windowing import WindowArg

__all__ = [  # noqa: F822 (READABLE_SUFFIXES is served live by __getattr__)
    "DEFAULT_BUDGET", "FILE_WINDOW", "MAX_2D_SOURCE_PIXELS", "MAX_ELEMENTS", "PRIVATE_KEYS", "READABLE_SUFFIXES",
    "TOOL_BUDGET", "WINDOWS", "DecodeBudget", "WindowArg", "apply_window", "budget_for", "decode_isolated",
    "file_format", "is_readable_file", "is_readable_name", "j2k_frame_size", "jpeg_frame_size", "list_dicom_series",
    "read_dicom_series", "read_image", "read_image_bytes", "resolve_window", "rle_check", "sniff_format",
    "walk_readable",
]


def __getattr__(name: str):
    if name == "READABLE_SUFFIXES":  # every registered reader's suffixes, as of now
        return readable_suffixes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
