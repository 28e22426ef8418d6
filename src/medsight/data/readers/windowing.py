"""CT windows: named windows, the argument parser and the linear window itself."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medsight.errors import DataError, choices_message

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

WindowArg = "str | tuple[float, float] | None"


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
