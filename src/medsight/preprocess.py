"""The deterministic preprocessing recipe that travels in a bundle: raw reader output -> model input.

A recipe is a JSON-serialisable dict::

    {"spatial_dims": 2, "channels": 1, "size": [28, 28],
     "intensity": {"mode": "range", "min": 0, "max": 255}}        # fixed range -> [0, 1]
                  {"mode": "window", "center": 40, "width": 400}   # CT window -> [0, 1]
                  {"mode": "minmax"}                               # per image
                  {"mode": "percentile", "low": 0.5, "high": 99.5} # per image, robust

``apply_recipe`` is the only function that turns a read image into a model input; training on user files and
every inference path (predict, explain, serve) call it, so they cannot drift apart.
"""

from __future__ import annotations

import numpy as np
import torch

from medsight.errors import DataError, choices_message
from medsight.transforms import resize

INTENSITY_MODES = ("range", "window", "minmax", "percentile")
WINDOWS = {"lung": (-600.0, 1500.0), "bone": (400.0, 1800.0), "soft_tissue": (40.0, 400.0),
           "abdomen": (40.0, 400.0), "brain": (40.0, 80.0), "mediastinum": (50.0, 350.0)}


def parse_window(spec: str | tuple | list | None) -> tuple[float, float] | None:
    """'lung' | 'C,W' | (C, W) -> (center, width)."""
    if spec is None:
        return None
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        c, w = float(spec[0]), float(spec[1])
    elif isinstance(spec, str) and spec.lower() in WINDOWS:
        c, w = WINDOWS[spec.lower()]
    else:
        try:
            c, w = (float(v) for v in str(spec).split(","))
        except ValueError:
            raise DataError(f"window {spec!r} is not one of {', '.join(WINDOWS)} or 'center,width'") from None
    if w <= 0:
        raise DataError(f"window width must be > 0, got {w:g}")
    return c, w


def normalise_intensity(x: np.ndarray, intensity: dict) -> np.ndarray:
    mode = intensity.get("mode", "minmax")
    x = x.astype(np.float32, copy=False)
    if mode == "range":
        lo, hi = float(intensity["min"]), float(intensity["max"])
    elif mode == "window":
        c, w = float(intensity["center"]), float(intensity["width"])
        lo, hi = c - w / 2, c + w / 2
    elif mode == "minmax":
        lo, hi = float(x.min()), float(x.max())
    elif mode == "percentile":
        lo, hi = (float(v) for v in np.percentile(x, [intensity.get("low", 0.5), intensity.get("high", 99.5)]))
    else:
        raise DataError(choices_message("intensity mode", mode, INTENSITY_MODES))
    if hi <= lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def match_channels(x: np.ndarray, channels: int, name: str = "image") -> np.ndarray:
    c = x.shape[0]
    if c == channels:
        return x
    if channels == 1 and c in (3, 4):  # RGB(A) -> luminance (ITU-R BT.601)
        return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    if c == 1:
        return np.repeat(x, channels, axis=0)
    if c == 4 and channels == 3:
        return x[:3]
    raise DataError(f"{name} has {c} channels; the model expects {channels}")


def apply_recipe(array: np.ndarray, recipe: dict, *, name: str = "image") -> np.ndarray:
    """(C, *spatial) raw array from the reader -> float32 (channels, *size) in [0, 1]."""
    dims = int(recipe["spatial_dims"])
    x = np.asarray(array)
    if x.ndim == dims:  # no channel axis
        x = x[None]
    if x.ndim == dims + 2 and x.shape[1] == 1 and dims == 2:  # (C, 1, H, W): a one-slice volume
        x = x[:, 0]
    if dims == 2 and x.ndim == 4 and x.shape[0] == 1:  # (1, D, H, W) volume given to a 2D model: middle slice
        x = x[:, x.shape[1] // 2]
    if x.ndim != dims + 1:
        raise DataError(f"{name} has shape {tuple(np.shape(array))}; the model expects a {dims}D image "
                        f"(channels first, {dims} spatial axes)")
    if not np.isfinite(x).all():
        raise DataError(f"{name} contains NaN or infinite values")
    x = normalise_intensity(x, recipe["intensity"])
    x = match_channels(x, int(recipe["channels"]), name)
    size = tuple(int(s) for s in recipe["size"])
    t = resize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None], size)[0]
    return t.clamp_(0, 1).numpy()
