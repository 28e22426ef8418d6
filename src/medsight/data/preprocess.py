"""The deterministic preprocessing recipe that travels in a bundle: raw reader output -> model input.

A recipe is a JSON-serialisable dict made by :func:`make_recipe`::

    {"version": 1, "spatial_dims": 2, "size": [28, 28], "channels": 1,
     "intensity": "auto" | "range" | "minmax" | "percentile" | "none",
     "range": [0, 255] (for "range"), "window": None | "dicom" | [center, width], "percentiles": [0.5, 99.5]}

``auto`` uses the reader's ``value_range`` (e.g. 0..255 for 8-bit PNG, 0..65535 for 16-bit) and per-image
percentiles where none is known (CT/MR); ``range`` is a fixed range (MedMNIST archives: 0..255), so a
MedMNIST image written as PNG or DICOM preprocesses to exactly what the model saw in training.

:func:`apply_recipe` is the only function that turns a read image into a model input; training on user files
(``data.folders.load_records``) and every inference path (predict, explain, serve) call it.
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

from medsight.data.readers import (FILE_WINDOW, DecodeBudget, apply_window, budget_for, read_image, read_image_bytes,
                                   resolve_window)
from medsight.errors import DataError, choices_message

INTENSITY_MODES = ("auto", "range", "minmax", "percentile", "none")
RECIPE_VERSION = 1


def make_recipe(
    *,
    size: Iterable[int],
    spatial_dims: int | None = None,
    channels: int = 1,
    intensity: str = "auto",
    window: str | tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    value_range: tuple[float, float] | None = None,
) -> dict:
    """A JSON-serialisable preprocessing recipe (saved in the model bundle, replayed at inference)."""
    if intensity == "range" and (value_range is None or float(value_range[1]) <= float(value_range[0])):
        raise DataError(f"intensity 'range' needs value_range=(low, high) with low < high, got {value_range}")
    size = [int(s) for s in size]
    dims = spatial_dims or len(size)
    if dims not in (2, 3) or len(size) != dims or any(s <= 0 for s in size):
        raise DataError(f"invalid size {size} for spatial_dims={dims}; expected {dims} positive integers")
    if intensity not in INTENSITY_MODES:
        raise DataError(choices_message("intensity mode", intensity, INTENSITY_MODES))
    if channels not in (1, 3):
        raise DataError(f"invalid channels {channels}; allowed: 1, 3")
    w = resolve_window(window)
    lo, hi = (float(v) for v in percentiles)
    if not 0 <= lo < hi <= 100:
        raise DataError(f"invalid percentiles {percentiles}; expected 0 <= low < high <= 100")
    return {
        "version": RECIPE_VERSION,
        "spatial_dims": dims,
        "size": size,
        "channels": int(channels),
        "intensity": intensity,
        "window": w if w is None or isinstance(w, str) else [float(w[0]), float(w[1])],
        "percentiles": [lo, hi],
        "range": None if value_range is None else [float(value_range[0]), float(value_range[1])],
        "resize": "area" if dims == 2 else "trilinear",
    }


def _normalise(arr: np.ndarray, meta: dict, intensity: str, percentiles, value_range=None) -> np.ndarray:
    if intensity not in INTENSITY_MODES:
        raise DataError(choices_message("intensity mode", intensity, INTENSITY_MODES))
    if meta.get("window") is not None or intensity == "none":
        return np.clip(arr, 0.0, 1.0)
    vr = meta.get("value_range")
    if intensity == "range":
        lo, hi = float(value_range[0]), float(value_range[1])
    elif intensity == "auto" and vr is not None and vr[1] > vr[0]:
        lo, hi = float(vr[0]), float(vr[1])
    elif intensity == "minmax":
        lo, hi = float(arr.min()), float(arr.max())
    else:  # percentile, or auto without a known range
        lo, hi = (float(v) for v in np.percentile(arr, list(percentiles)))
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    out = (arr.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def convert_channels(arr: np.ndarray, channels: int | None, name: object) -> np.ndarray:
    c = arr.shape[0]
    if channels is None or c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=0)
    if c == 3 and channels == 1:
        w = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape((3,) + (1,) * (arr.ndim - 1))
        return (arr * w).sum(axis=0, keepdims=True)
    raise DataError(f"cannot convert {name}: it has {c} channels, the recipe expects {channels}")


def resize(x, size: tuple[int, ...]):
    """Resize a (B, C, *spatial) float tensor batch; area for downsampling, (bi/tri)linear for upsampling.
    The one resampler: the recipe's resize step, the service's display image and heatmap use it."""
    import torch.nn.functional as F

    if tuple(x.shape[2:]) == tuple(size):
        return x
    down = all(s <= t for s, t in zip(size, x.shape[2:]))
    mode = "area" if down else ("bilinear" if len(size) == 2 else "trilinear")
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(x, size=tuple(size), mode=mode, **kw)


def _resize(arr: np.ndarray, size: list[int]) -> np.ndarray:
    import torch

    if list(arr.shape[1:]) == list(size):
        return arr
    return resize(torch.from_numpy(np.ascontiguousarray(arr))[None], tuple(size))[0].numpy()


def preprocess_array(
    array: np.ndarray,
    meta: dict,
    *,
    size: Iterable[int],
    channels: int | None = None,
    intensity: str = "auto",
    window: str | tuple[float, float] | list | None = None,
    percentiles: Iterable[float] = (0.5, 99.5),
    value_range: Iterable[float] | None = None,
    name: object = "image",
) -> np.ndarray:
    """Window/normalise to [0, 1], convert channels, resize: the one deterministic preprocessing step.

    ``array``/``meta`` are what :func:`medsight.data.io.read_image` returned. Returns float32
    ``(channels, *size)``.
    """
    size = [int(s) for s in size]
    arr = np.asarray(array, dtype=np.float32)
    dims = len(size)
    if arr.ndim == dims + 2 and dims == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]  # single-slice volume used as a 2D image
    if arr.ndim != dims + 1:
        kind = "a 3D volume" if arr.ndim == 4 else "a 2D image" if arr.ndim == 3 else f"an array of shape {arr.shape}"
        raise DataError(f"cannot preprocess {name}: it is {kind} (shape {tuple(arr.shape)}) but the recipe expects {dims}D images")
    meta = dict(meta)
    w = resolve_window(window)
    if w is not None and meta.get("window") is None:
        if w == FILE_WINDOW:
            raise DataError(f"cannot preprocess {name}: window 'dicom' must be applied when reading the file")
        if meta.get("photometric") != "RGB":
            arr = apply_window(arr, *w)
            meta["window"] = tuple(w)
    if not np.isfinite(arr).all():
        raise DataError(f"cannot preprocess {name}: it contains NaN or infinite values")
    arr = _normalise(arr, meta, intensity, tuple(percentiles), value_range)
    arr = _resize(arr, size)
    arr = convert_channels(arr, channels, name)
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


def apply_recipe(array: np.ndarray, meta: dict, recipe: dict, *, name: object = "image") -> np.ndarray:
    """:func:`preprocess_array` with the settings from a recipe dict."""
    try:
        return preprocess_array(
            array,
            meta,
            size=recipe["size"],
            channels=recipe.get("channels"),
            intensity=recipe.get("intensity", "auto"),
            window=recipe.get("window"),
            percentiles=recipe.get("percentiles", (0.5, 99.5)),
            value_range=recipe.get("range"),
            name=name,
        )
    except KeyError as e:
        raise DataError(f"invalid preprocessing recipe: missing key {e.args[0]!r}") from e


def load_one(source: str | os.PathLike | bytes, recipe: dict, *, name: str | None = None,
             budget: DecodeBudget | None = None, **reader_kw) -> tuple[np.ndarray, dict]:
    """Read one file (path, or bytes + ``name``) and apply a recipe: what predict, explain and serve call.

    The file is decoded within ``budget`` (default: ``budget_for(recipe)``, sized for the model's input), so
    predict, explain and the service refuse the same oversized or lying files before decoding them."""
    window = recipe.get("window")
    read_window = tuple(window) if isinstance(window, list) else window
    if budget is None:
        budget = budget_for(recipe)
    if isinstance(source, (bytes, bytearray)):
        arr, meta = read_image_bytes(source, name or "upload", window=read_window, budget=budget, **reader_kw)
    else:
        arr, meta = read_image(source, window=read_window, budget=budget, **reader_kw)
    return apply_recipe(arr, meta, recipe, name=name or source), meta
