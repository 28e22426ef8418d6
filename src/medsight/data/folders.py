"""Samples from user data: class-per-folder trees and CSV manifests, plus the deterministic preprocessing recipe.

A *record* is a plain dict describing one sample::

    {"path": "/abs/file.dcm", "label": "pneumonia" | ["0", ...] | None, "split": "train" | "val" | "test" | None,
     "patient_id": "..." | None, "clinical": {...}}

Multi-label manifests store ``label`` as a list of 0/1 ints and ``label_names`` with the column names.

Preprocessing (channels, intensity, resize) is one function, :func:`preprocess_array`, driven by a
JSON-serialisable *recipe* from :func:`make_recipe`; training (:func:`load_records`) and inference
(:func:`load_one`) both go through it so they cannot drift apart.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from medsight.data.io import DICOM_SUFFIXES, IMAGE_SUFFIXES, FILE_WINDOW, apply_window, read_image, read_image_bytes, resolve_window
from medsight.errors import DataError, choices_message

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test", "testing": "test"}
INTENSITY_MODES = ("auto", "minmax", "percentile", "none")
RECIPE_VERSION = 1


def _is_image_file(p: Path) -> bool:
    name = p.name.lower()
    if name.startswith(".") or name in ("dicomdir", "thumbs.db", "desktop.ini"):
        return False
    if name.endswith((".nii", ".nii.gz")):
        return True
    suffix = p.suffix.lower()
    return suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES and suffix != "" or (suffix == "" and _looks_dicom(p))


def _looks_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _class_samples(class_dir: Path) -> list[Path]:
    """Files directly in the class folder are samples; a sub-folder holding only DICOM files is one series sample."""
    out: list[Path] = []
    for entry in sorted(class_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and _is_image_file(entry):
            out.append(entry)
        elif entry.is_dir():
            files = [f for f in entry.iterdir() if f.is_file() and not f.name.startswith(".")]
            subdirs = [f for f in entry.iterdir() if f.is_dir()]
            dicoms = [f for f in files if f.suffix.lower() in (".dcm", ".dicom", ".ima") or (f.suffix == "" and _looks_dicom(f))]
            if not subdirs and len(dicoms) >= 2 and len(dicoms) == len([f for f in files if _is_image_file(f)]):
                out.append(entry)  # a DICOM series folder is one volume sample
            else:
                out.extend(_class_samples(entry))
    return out


def scan_class_folders(root: str | os.PathLike) -> list[dict]:
    """Records from ``root/<class>/**/file`` or ``root/<split>/<class>/**/file`` (split in train/val/test).

    A folder below a class folder that holds only DICOM files becomes one record (a series / volume).
    """
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"cannot scan {r}: not a folder")
    top = sorted(d for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not top:
        raise DataError(f"cannot scan {r}: expected one sub-folder per class (or train/val/test folders), found none")
    split_mode = all(d.name.lower() in SPLIT_NAMES for d in top)
    records: list[dict] = []
    groups = [(SPLIT_NAMES[d.name.lower()], d) for d in top] if split_mode else [(None, r)]
    for split, base in groups:
        for class_dir in sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for f in _class_samples(class_dir):
                records.append({"path": str(f), "label": class_dir.name, "split": split, "patient_id": None})
    if not records:
        raise DataError(f"cannot scan {r}: no image files found (looked for {', '.join(sorted(IMAGE_SUFFIXES | {'.dcm', '.nii', '.nii.gz'}))})")
    return records


def _as_list(cols) -> list[str] | None:
    if cols is None:
        return None
    if isinstance(cols, str):
        return [c.strip() for c in cols.split(",") if c.strip()]
    return list(cols)


def _parse_value(v: str) -> Any:
    v = v.strip()
    if v == "":
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def read_manifest(
    csv_path: str | os.PathLike,
    *,
    path_col: str = "path",
    label_cols: str | Iterable[str] | None = None,
    patient_col: str | None = None,
    split_col: str | None = None,
    clinical_cols: str | Iterable[str] | None = None,
) -> list[dict]:
    """Records from a CSV manifest; relative paths resolve against the CSV's folder.

    ``label_cols`` defaults to ``['label']``; several label columns make a multi-label task whose
    values must be 0/1 (``label`` is then a list of ints and ``label_names`` the column names).
    """
    p = Path(csv_path)
    if not p.is_file():
        raise DataError(f"cannot read manifest {p}: file not found")
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            sample = fh.read(4096)
            fh.seek(0)
            try:
                dialect = csv.Sniffer().sniff(sample, delimiters=",;\t")
            except csv.Error:
                dialect = csv.excel
            reader = csv.DictReader(fh, dialect=dialect)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v if isinstance(v, str) else "") for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read manifest {p}: {e}") from e
    if not columns:
        raise DataError(f"cannot read manifest {p}: empty file or no header row")
    labels = _as_list(label_cols) or (["label"] if "label" in columns else None)
    if labels is None:
        raise DataError(f"manifest {p} has no 'label' column; pass label_cols (columns present: {', '.join(columns)})")
    clinical = _as_list(clinical_cols) or []
    wanted = [path_col, *labels, *clinical] + [c for c in (patient_col, split_col) if c]
    for col in wanted:
        if col not in columns:
            raise DataError(f"manifest {p} has no column {col!r}; columns present: {', '.join(columns)}")
    multi = len(labels) > 1
    base = p.parent
    records = []
    for i, row in enumerate(rows, start=2):  # line numbers as a spreadsheet shows them
        raw_path = row.get(path_col, "").strip()
        if not raw_path:
            raise DataError(f"manifest {p} line {i}: empty {path_col!r}")
        fp = Path(raw_path).expanduser()
        if not fp.is_absolute():
            fp = base / fp
        rec: dict[str, Any] = {"path": str(fp), "patient_id": None, "split": None}
        if multi:
            vec = []
            for c in labels:
                v = row.get(c, "").strip()
                if v in ("", "nan", "NA"):
                    vec = None
                    break
                try:
                    f = float(v)
                except ValueError:
                    f = -1.0
                if f not in (0.0, 1.0):
                    raise DataError(f"manifest {p} line {i}: label column {c!r} must be 0 or 1 for multi-label, got {v!r}")
                vec.append(int(f))
            rec["label"] = vec
            rec["label_names"] = list(labels)
        else:
            v = row.get(labels[0], "").strip()
            rec["label"] = v if v not in ("", "nan", "NA") else None
        if patient_col:
            pid = row.get(patient_col, "").strip()
            rec["patient_id"] = pid or None
        if split_col:
            s = row.get(split_col, "").strip().lower()
            if s:
                if s not in SPLIT_NAMES:
                    raise DataError(f"manifest {p} line {i}: {choices_message('split', s, SPLIT_NAMES)}")
                rec["split"] = SPLIT_NAMES[s]
        if clinical:
            rec["clinical"] = {c: _parse_value(row.get(c, "")) for c in clinical}
        records.append(rec)
    if not records:
        raise DataError(f"manifest {p} has a header but no rows")
    return records


# ----------------------------------------------------------------------------- preprocessing recipe


def make_recipe(
    *,
    size: Iterable[int],
    spatial_dims: int | None = None,
    channels: int = 1,
    intensity: str = "auto",
    window: str | tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> dict:
    """A JSON-serialisable preprocessing recipe (saved in the model bundle, replayed at inference)."""
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
        "resize": "area" if dims == 2 else "trilinear",
    }


def _normalise(arr: np.ndarray, meta: dict, intensity: str, percentiles) -> np.ndarray:
    if intensity not in INTENSITY_MODES:
        raise DataError(choices_message("intensity mode", intensity, INTENSITY_MODES))
    if meta.get("window") is not None or intensity == "none":
        return np.clip(arr, 0.0, 1.0)
    vr = meta.get("value_range")
    if intensity == "auto" and vr is not None and vr[1] > vr[0]:
        lo, hi = float(vr[0]), float(vr[1])
    elif intensity == "minmax":
        lo, hi = float(arr.min()), float(arr.max())
    else:  # percentile, or auto without a known range
        lo, hi = (float(v) for v in np.percentile(arr, list(percentiles)))
    if hi <= lo:
        return np.zeros_like(arr, dtype=np.float32)
    out = (arr.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def _convert_channels(arr: np.ndarray, channels: int | None, name: object) -> np.ndarray:
    c = arr.shape[0]
    if channels is None or c == channels:
        return arr
    if c == 1 and channels == 3:
        return np.repeat(arr, 3, axis=0)
    if c == 3 and channels == 1:
        w = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape((3,) + (1,) * (arr.ndim - 1))
        return (arr * w).sum(axis=0, keepdims=True)
    raise DataError(f"cannot convert {name}: it has {c} channels, the recipe expects {channels}")


def _resize(arr: np.ndarray, size: list[int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if list(arr.shape[1:]) == list(size):
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr))[None]
    if len(size) == 3:
        out = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    elif all(s <= a for s, a in zip(size, arr.shape[1:])):
        out = F.interpolate(t, size=size, mode="area")
    else:
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out[0].numpy()


def preprocess_array(
    array: np.ndarray,
    meta: dict,
    *,
    size: Iterable[int],
    channels: int | None = None,
    intensity: str = "auto",
    window: str | tuple[float, float] | list | None = None,
    percentiles: Iterable[float] = (0.5, 99.5),
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
    arr = _normalise(arr, meta, intensity, tuple(percentiles))
    arr = _resize(arr, size)
    arr = _convert_channels(arr, channels, name)
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
            name=name,
        )
    except KeyError as e:
        raise DataError(f"invalid preprocessing recipe: missing key {e.args[0]!r}") from e


def load_one(source: str | os.PathLike | bytes, recipe: dict, *, name: str | None = None) -> tuple[np.ndarray, dict]:
    """Read one file (path, or bytes + ``name``) and apply a recipe: what predict / serve call."""
    window = recipe.get("window")
    read_window = tuple(window) if isinstance(window, list) else window
    if isinstance(source, (bytes, bytearray)):
        arr, meta = read_image_bytes(source, name or "upload", window=read_window)
    else:
        arr, meta = read_image(source, window=read_window)
    return apply_recipe(arr, meta, recipe, name=name or source), meta


def load_records(
    records: list[dict],
    *,
    size: Iterable[int],
    spatial_dims: int | None = None,
    window: str | tuple[float, float] | None = None,
    intensity: str = "auto",
    channels: int | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    on_error: str = "raise",
):
    """Read and preprocess every record into ``images`` float32 ``(N, C, *size)`` in [0, 1].

    Channels default to 1, or 3 when any image is colour. Returns ``(images, metas)``; with
    ``on_error='collect'`` unreadable files are dropped and ``(images, metas, errors)`` is returned
    where ``errors`` is a list of ``{"path", "error"}``. ``metas[i]["recipe"]`` is the recipe used.
    """
    if on_error not in ("raise", "collect"):
        raise DataError(choices_message("on_error", on_error, ["raise", "collect"]))
    size = [int(s) for s in size]
    dims = spatial_dims or len(size)
    if len(size) != dims:
        raise DataError(f"invalid size {size} for spatial_dims={dims}")
    if intensity not in INTENSITY_MODES:
        raise DataError(choices_message("intensity mode", intensity, INTENSITY_MODES))
    w = resolve_window(window)
    arrays, metas, errors = [], [], []
    for rec in records:
        path = rec["path"]
        try:
            arr, meta = read_image(path, window=w)
            arr = preprocess_array(arr, meta, size=size, channels=None, intensity=intensity, window=w, percentiles=percentiles, name=path)
        except DataError as e:
            errors.append({"path": str(path), "error": str(e)})
            continue
        meta["path"] = str(path)
        arrays.append(arr)
        metas.append(meta)
    if errors and on_error == "raise":
        first = "; ".join(e["error"] for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DataError(f"{len(errors)} of {len(records)} files could not be loaded: {first}{more}")
    if channels is None:
        chans = {a.shape[0] for a in arrays}
        channels = 3 if 3 in chans else 1
    arrays = [_convert_channels(a, channels, m["path"]) for a, m in zip(arrays, metas)]
    images = np.stack(arrays).astype(np.float32) if arrays else np.zeros((0, channels, *size), np.float32)
    recipe = make_recipe(size=size, spatial_dims=dims, channels=channels, intensity=intensity, window=w, percentiles=percentiles)
    for m in metas:
        m["recipe"] = recipe
    if on_error == "collect":
        return images, metas, errors
    return images, metas
