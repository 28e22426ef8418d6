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
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from medsight.data.readers import file_format, is_readable_file, read_image, readable_suffixes, resolve_window
from medsight.data.preprocess import INTENSITY_MODES, convert_channels, make_recipe, preprocess_array
from medsight.errors import DataError, choices_message

if TYPE_CHECKING:
    from medsight.config import DataConfig

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test", "testing": "test"}


def _is_image_file(p: Path) -> bool:
    return is_readable_file(p)  # the readers' registry answers "can this file be read"


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
            dicoms = [f for f in files if file_format(f) == "dicom"]
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
        raise DataError(f"cannot scan {r}: no image files found (looked for {', '.join(readable_suffixes())} and suffix-less DICOM)")
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


def decode_record(path, *, size, window, intensity: str, percentiles) -> tuple[np.ndarray, dict]:
    """One file through the reader and the recipe: float32 ``(C, *size)`` in [0, 1] (its own channel count) and
    the reader's meta. What :func:`load_records` and the dataset cache (:mod:`medsight.data.cache`) decode with."""
    arr, meta = read_image(path, window=window)
    arr = preprocess_array(arr, meta, size=size, channels=None, intensity=intensity, window=window,
                           percentiles=percentiles, name=path)
    return arr, meta


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
    from medsight import progress

    for rec in progress.track(records, "reading images"):
        path = rec["path"]
        try:
            arr, meta = decode_record(path, size=size, window=w, intensity=intensity, percentiles=percentiles)
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
    arrays = [convert_channels(a, channels, m["path"]) for a, m in zip(arrays, metas)]
    images = np.stack(arrays).astype(np.float32) if arrays else np.zeros((0, channels, *size), np.float32)
    recipe = make_recipe(size=size, spatial_dims=dims, channels=channels, intensity=intensity, window=w, percentiles=percentiles)
    for m in metas:
        m["recipe"] = recipe
    if on_error == "collect":
        return images, metas, errors
    return images, metas


# ----------------------------------------------------------------------------- records -> Dataset

PATIENT_COLUMNS = ("patient_id", "patientid", "patient", "subject_id", "subject")
SPLIT_COLUMNS = ("split", "set", "fold")


def _manifest_columns(csv_path: Path) -> list[str]:
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        first = fh.readline()
    try:
        dialect = csv.Sniffer().sniff(first, delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return [c.strip() for c in next(csv.reader([first], dialect=dialect), [])]


def records_from(path: str | os.PathLike, *, label_cols=None, clinical_cols=None) -> list[dict]:
    """Records from a class-per-folder tree or a CSV manifest (patient / split columns found by name)."""
    p = Path(path)
    if p.is_dir():
        return scan_class_folders(p)
    if p.suffix.lower() in (".csv", ".tsv", ".txt"):
        if not p.is_file():
            raise DataError(f"cannot read manifest {p}: file not found")
        cols = _manifest_columns(p)
        lower = {c.lower(): c for c in cols}
        patient = next((lower[c] for c in PATIENT_COLUMNS if c in lower), None)
        split = next((lower[c] for c in SPLIT_COLUMNS if c in lower), None)
        return read_manifest(p, label_cols=label_cols, patient_col=patient, split_col=split,
                             clinical_cols=clinical_cols)
    raise DataError(f"{p} is neither a folder of class sub-folders nor a CSV manifest")


def load_user_dataset(path: str | os.PathLike, data: DataConfig, *, seed: int = 0):
    """A class-per-folder tree or CSV manifest -> :class:`medsight.data.sources.Dataset`, with the settings of
    ``data`` (a :class:`medsight.config.DataConfig`; its ``name`` is not used: ``path`` is the resolved one).

    Splits come from the tree / manifest when given (all or none), else a stratified patient-level split
    (70/15/15, seeded); a leakage check refuses splits that share patients or identical images, unless
    ``allow_leakage``: then the finding (counts) is kept in ``Dataset.leakage``. Classes are in sorted order (the
    loader in :mod:`medsight.data.sources` then settles the positive class of a binary task).

    Files are decoded once into the dataset cache (:mod:`medsight.data.cache`, in ``cache_dir``); a second load of
    the same files with the same settings decodes nothing. Splits hold the cached arrays (uint8, or uint16 when
    8 bits would not be exact) in memory, or as :class:`~medsight.data.cache.DiskArray` rows read on demand when
    they exceed ``memory_budget_gb`` or ``stream`` is true. ``workers``: decoding processes (default: the cores,
    at most 8; 0 decodes in this process).
    """
    from medsight.data.dataset import Dataset, Split
    from medsight.data.splits import check_leakage, hashed_id, patient_split

    size, task, window, intensity = data.size, data.task, data.window, data.intensity
    label_cols, clinical_cols, allow_leakage = data.label_columns, data.clinical_columns, data.allow_leakage
    cache_dir, stream, memory_budget_gb, workers = data.cache_dir, data.stream, data.memory_budget_gb, data.workers
    src = Path(path)
    records = records_from(src, label_cols=label_cols, clinical_cols=clinical_cols)
    if not records:
        raise DataError(f"{src} holds no readable image files")
    missing = [r for r in records if r.get("label") is None]
    if missing:
        raise DataError(f"{src}: {len(missing)} sample(s) have no label, e.g. {missing[0]['path']}")
    given = [r.get("split") for r in records]
    if all(given):
        unknown = sorted({s for s in given if s not in ("train", "val", "test")})
        if unknown:
            raise DataError(f"{src}: unknown split name(s) {', '.join(unknown)}; allowed: train, val, test")
        where = "the manifest's split column" if src.is_file() else "the folder tree (train/val/test folders)"
        split_origin = f"given in {where}"
    elif any(given):
        raise DataError(f"{src}: some samples have a split and some do not; give all or none")
    else:
        records = patient_split(records, seed=seed)
        with_pid = sum(1 for r in records if r.get("patient_id"))
        split_origin = (f"made here: 70/15/15 stratified by class, seed {seed}, "
                        + (f"patient-level ({with_pid} of {len(records)} files carry a patient id)" if with_pid else
                           "one group per file (no patient ids given, so files of one patient may share splits)"))
    # 2D images or volumes: known from a cache entry of these files, else read one image to learn it
    dims = _cached_dims(records, size, window, intensity, cache_dir)
    if dims is None:
        first, _ = read_image(records[0]["path"], window=resolve_window(window))
        dims = 3 if first.ndim == 4 and first.shape[1] > 1 else 2
    images, metas, hashes, channels = _cached_images(records, size=[size] * dims, window=window,
                                                    intensity=intensity, cache_dir=cache_dir, stream=stream,
                                                    memory_budget_gb=memory_budget_gb, workers=workers)
    leakage = check_leakage(records, hashes=hashes, allow=allow_leakage)
    multilabel = isinstance(records[0]["label"], list)
    if multilabel:
        classes = list(records[0].get("label_names") or [str(i) for i in range(len(records[0]["label"]))])
        labels = np.asarray([r["label"] for r in records], dtype=np.float32)
    else:
        classes = sorted({str(r["label"]) for r in records}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index[str(r["label"])] for r in records], dtype=np.int64)
    if task is None:
        task = "multilabel" if multilabel else ("binary" if len(classes) == 2 else "multiclass")
    if not multilabel and len(classes) < 2:
        raise DataError(f"{src}: found only one class ({classes[0]}); a classifier needs at least two")
    clinical = None
    if clinical_cols:
        clinical = [r.get("clinical", {}) for r in records]
    splits = {}
    for s in ("train", "val", "test"):
        idx = [i for i, r in enumerate(records) if r["split"] == s]
        if not idx:
            continue
        splits[s] = Split(images=images(idx), labels=labels[idx],
                          ids=[os.path.relpath(records[i]["path"], src if src.is_dir() else src.parent) for i in idx],
                          clinical=None if clinical is None else [clinical[i] for i in idx],
                          patients=[hashed_id(records[i]["patient_id"]) if records[i].get("patient_id") else None
                                    for i in idx])
    if "train" not in splits or "val" not in splits:
        raise DataError(f"{src}: needs train and val samples (found splits: {', '.join(splits) or 'none'})")
    recipe = make_recipe(size=[size] * dims, spatial_dims=dims, channels=channels, intensity=intensity,
                         window=resolve_window(window), percentiles=(0.5, 99.5))
    recipe["source"] = {"kind": "folder" if src.is_dir() else "manifest"}
    return Dataset(name=src.stem if src.is_file() else src.name, task=task, classes=classes, spatial_dims=dims,
                   splits=splits, recipe=recipe, split_origin=split_origin,
                   native_size=native_size_summary(metas, [size] * dims),
                   leakage=leakage if leakage.get("findings") else None)


def _cache_settings(size, window, intensity) -> dict:
    """What a cached decode depends on besides the files (part of the cache key)."""
    w = resolve_window(window)
    return {"size": list(size), "window": w if w is None or isinstance(w, str) else [float(v) for v in w],
            "intensity": intensity, "percentiles": [0.5, 99.5]}


def _cached_dims(records, size: int, window, intensity, cache_dir) -> int | None:
    from medsight.data import cache

    d = cache.resolve_dir(cache_dir)
    for dims in (2, 3):
        if cache.open_entry(d, cache.folder_key(records, _cache_settings([size] * dims, window, intensity))):
            return dims
    return None


def _cached_images(records, *, size, window, intensity, cache_dir, stream, memory_budget_gb, workers):
    """Decode ``records`` through the dataset cache: ``(images(rows) -> array, metas, hashes, channels)``."""
    import functools

    from medsight.data import cache

    w = resolve_window(window)
    percentiles = (0.5, 99.5)
    settings = _cache_settings(size, window, intensity)
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if len(records) >= 256 else 0
    decode = functools.partial(decode_record, size=list(size), window=w, intensity=intensity, percentiles=percentiles)
    entry = cache.build_folder_entry(records, decode=decode, settings=settings, cache_dir=cache.resolve_dir(cache_dir),
                                     workers=workers)
    errors = entry["errors"]
    if errors:
        first = "; ".join(e["error"] for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DataError(f"{len(errors)} of {len(records)} files could not be loaded: {first}{more}")
    path = Path(entry["path"]) / "images.npy"
    on_disk = cache.choose_stream(entry["arrays"]["images.npy"]["bytes"], stream, memory_budget_gb)
    if on_disk:
        def images(rows):
            return cache.DiskArray(path, rows)
    else:
        whole = cache.load_array(path, stream=False)

        def images(rows):
            return whole[rows]
    hashes = json.loads((Path(entry["path"]) / "hashes.json").read_text())
    return images, [{"shape": s} for s in entry["shapes"]], hashes, int(entry["channels"])


def native_size_summary(metas: list[dict], size: list[int]) -> dict:
    """The files' own spatial sizes (from the reader's ``shape``) against the model input ``size``:
    ``{"median": [...], "min": [...], "max": [...], "input": size, "factor": median/input (largest axis),
    "resized": bool}``."""
    dims = len(size)
    shapes = []
    for m in metas:
        sh = m.get("shape")
        if sh:
            sp = [int(v) for v in sh[1:]]
            if len(sp) == dims + 1 and sp[0] == 1:
                sp = sp[1:]  # one-slice volume read as a 2D image
            if len(sp) == dims:
                shapes.append(sp)
    if not shapes:
        return {"median": None, "input": list(size), "factor": None, "resized": None}
    a = np.asarray(shapes)
    med = [int(v) for v in np.median(a, axis=0)]
    factor = max(m / s for m, s in zip(med, size))
    return {"median": med, "min": [int(v) for v in a.min(axis=0)], "max": [int(v) for v in a.max(axis=0)],
            "input": list(size), "factor": round(float(factor), 3), "resized": bool((a != np.asarray(size)).any())}
