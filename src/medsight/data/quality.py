"""Data quality control: unreadable files, exact / near duplicates (within and across splits),
class balance, size / spacing / intensity outliers and missing labels.

``run_qc`` accepts records (from :mod:`medsight.data.folders`), a folder or CSV manifest path, or a
MedMNIST-style ``{split: (images, labels)}`` dict, and returns a JSON-serialisable report.
``render_qc`` turns the report into a rich Table for the CLI.

A folder that is not a class-per-folder tree (a flat or nested dump of unlabelled files, e.g. DICOM straight from a
PACS export) is checked as a *raw* folder: every file below it, no labels expected; DICOM files are also summarised
per series (counts of SeriesInstanceUIDs, never the UIDs) and for identifying header values (how many files carry a
PatientName, PatientID, dates..., never the values). A leakage finding (duplicates across splits) can be accepted
with ``allow_leakage``: the report then records it (counts) and stays ``ok``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from medsight import progress
from medsight.data.splits import image_hash
from medsight.errors import DataError

log = logging.getLogger(__name__)


def _label_str(label) -> str | None:
    if label is None:
        return None
    if isinstance(label, (list, tuple, np.ndarray)):
        vals = np.asarray(label).ravel().tolist()
        if len(vals) == 1:
            return str(int(vals[0])) if float(vals[0]).is_integer() else str(vals[0])
        return ",".join(str(int(v)) if float(v).is_integer() else str(v) for v in vals)
    return str(label)


def _render_8bit(arr: np.ndarray) -> np.ndarray:
    """A 2D uint8 rendering of a (C,H,W) or (C,D,H,W) array: middle slice, luminance, 1-99 percentile."""
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 4:
        a = a[:, a.shape[1] // 2]
    if a.ndim == 3:
        a = a.mean(axis=0) if a.shape[0] > 1 else a[0]
    lo, hi = np.percentile(a, [1, 99]) if a.size else (0.0, 0.0)
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _phash(arr: np.ndarray, hash_size: int) -> int:
    import imagehash
    from PIL import Image

    h = imagehash.phash(Image.fromarray(_render_8bit(arr)), hash_size=hash_size)
    bits = h.hash.ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def _near_pairs(hashes: list[int | None], threshold: int, nbits: int) -> list[tuple[int, int, int]]:
    """Pairs with Hamming distance <= threshold, via band bucketing (pigeonhole) then exact check."""
    if threshold < 0:
        return []
    n_bands = threshold + 1
    width = max(1, nbits // n_bands)
    pairs: set[tuple[int, int]] = set()
    for b in range(n_bands):
        shift = b * width
        w = width if b < n_bands - 1 else nbits - shift
        mask = (1 << w) - 1
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, h in enumerate(hashes):
            if h is not None:
                buckets[(h >> shift) & mask].append(i)
        for members in buckets.values():
            if len(members) < 2:
                continue
            if len(members) > 2000:  # pathological bucket (e.g. blank images): compare neighbours only
                members = members[:2000]
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    pairs.add((members[x], members[y]))
    out = []
    for i, j in sorted(pairs):
        d = bin(hashes[i] ^ hashes[j]).count("1")
        if d <= threshold:
            out.append((i, j, d))
    return out


def _robust_z(values: np.ndarray) -> np.ndarray:
    med = np.median(values)
    mad = np.median(np.abs(values - med))
    if mad == 0:
        mad = np.mean(np.abs(values - med)) * 1.2533 if np.any(values != med) else 0.0
    if mad == 0:
        return np.zeros_like(values, dtype=np.float64)
    return 0.6745 * (values - med) / mad


LAYOUTS = ("auto", "classes", "raw")


def _looks_raw(root: Path) -> bool:
    """Whether a folder is a raw (unlabelled) dump rather than a class tree: it has files at its top level (a class
    tree holds only folders there; a dump often carries a DICOMDIR or notes), or no sub-folder holds images within
    two levels (class/file or class/series/file), as in patient/study/series/file."""
    from medsight.data.folders import SPLIT_NAMES, _is_image_file

    entries = [e for e in root.iterdir() if not e.name.startswith(".")]
    if any(e.is_file() for e in entries):
        return True
    dirs = [e for e in entries if e.is_dir()]
    if not dirs:
        return True
    if all(d.name.lower() in SPLIT_NAMES for d in dirs):
        return False

    def has_images(d: Path) -> bool:
        return any(f.is_file() and _is_image_file(f) for f in d.iterdir() if not f.name.startswith("."))

    return not any(has_images(d) or any(has_images(sub) for sub in d.iterdir() if sub.is_dir()) for d in dirs)


def scan_raw_folder(root: str | os.PathLike) -> list[dict]:
    """Records for every file below ``root`` (no labels, no splits); files that are not of an image type carry
    ``"skip": True`` (counted, not read)."""
    from medsight.data.folders import _is_image_file

    r = Path(root)
    records = []
    for f in sorted(r.rglob("*")):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(r).parts):
            continue
        rec = {"path": str(f), "label": None, "split": None, "patient_id": None}
        if not _is_image_file(f):
            rec["skip"] = True
        records.append(rec)
    if not records:
        raise DataError(f"qc: {r} holds no files")
    return records


def _items_from_source(source, layout: str = "auto") -> tuple[list[dict], Iterator | None, str]:
    """Normalise the input to records; for arrays dicts also return the in-memory images."""
    if isinstance(source, dict):
        records, arrays = [], []
        for split, pair in source.items():
            try:
                images, labels = pair
            except (TypeError, ValueError) as e:
                raise DataError(f"qc: arrays dict values must be (images, labels) pairs; got {type(pair).__name__} for {split!r}") from e
            images = np.asarray(images)
            if labels is not None and len(labels) != len(images):
                raise DataError(f"qc: split {split!r} has {len(images)} images but {len(labels)} labels")
            for i in range(len(images)):
                records.append({"path": f"{split}[{i}]", "split": split, "label": None if labels is None else labels[i]})
                arrays.append(images[i])
        return records, arrays, "arrays"
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        from medsight.data.folders import read_manifest, scan_class_folders

        if p.is_dir():
            if layout == "raw":
                return scan_raw_folder(p), None, "raw folder"
            if layout == "auto" and _looks_raw(p):
                return scan_raw_folder(p), None, "raw folder"
            return scan_class_folders(p), None, "folder"
        if p.suffix.lower() in (".csv", ".tsv"):
            return read_manifest(p), None, "manifest"
        if p.suffix.lower() == ".npz":
            from medsight.data.sources import check_npz

            check_npz(p)
            try:
                with np.load(p, allow_pickle=False) as z:
                    d = {s: (z[f"{s}_images"], z[f"{s}_labels"] if f"{s}_labels" in z else None) for s in ("train", "val", "test") if f"{s}_images" in z}
            except Exception as e:
                raise DataError(f"cannot read {p}: {e}") from e
            if not d:
                raise DataError(f"cannot read {p}: no '<split>_images' arrays (MedMNIST layout) inside")
            return _items_from_source(d)
        raise DataError(f"qc: {p} is not a folder, a .csv manifest or a MedMNIST .npz")
    if isinstance(source, list):
        return source, None, "records"
    raise DataError(f"qc: expected records, a path or a {{split: (images, labels)}} dict; got {type(source).__name__}")


def _arrays_as_chw(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] not in (1, 3):
        return np.moveaxis(a[..., :3], -1, 0)  # MedMNIST colour: (H, W, 3)
    if a.ndim == 3:
        return a[None]  # (D, H, W) volume
    return a


def file_facts(path, hash_size: int = 8) -> dict:
    """What QC keeps of one file, JSON-serialisable and free of identifying values: ``{"file", "error"}`` when it
    cannot be read, else also :func:`array_facts`. :func:`run_qc` aggregates these into its report."""
    from medsight.data.readers import TOOL_BUDGET, read_image

    try:
        arr, meta = read_image(path, budget=TOOL_BUDGET)  # the budget deid uses; bombs refused before decoding
    except DataError as e:
        return {"file": str(path), "error": str(e)}
    except Exception as e:  # defensive: QC must report, never crash
        return {"file": str(path), "error": f"{type(e).__name__}: {e}"}
    return {"file": str(path), "error": None, **array_facts(arr, meta, hash_size)}


def array_facts(arr: np.ndarray, meta: dict, hash_size: int = 8) -> dict:
    """Content hash, perceptual hash, shape, spacing, median; for DICOM the modality, a digest of the series UID
    (never the UID) and the names of the identifying headers present (never their values)."""
    import hashlib

    from medsight.data.readers.dicom import PRIVATE_KEYS

    dicom = None
    if meta.get("format") == "dicom":
        private = meta.get("private") or {}
        uid = private.get("SeriesInstanceUID")
        dicom = {"series": hashlib.sha256(str(uid).encode()).hexdigest()[:16] if uid else None,
                 "modality": str(meta.get("modality") or "?"),
                 "phi": [k for k in PRIVATE_KEYS if k not in ("StudyInstanceUID", "SeriesInstanceUID") and private.get(k)]}
    try:
        ph = _phash(arr, hash_size)
    except Exception:  # pragma: no cover - degenerate arrays
        ph = None
    sp = meta.get("spacing")
    return {"hash": image_hash(arr), "phash": ph, "shape": [int(s) for s in arr.shape],
            "spacing": [float(s) for s in sp] if sp else None, "median": float(np.median(arr)), "dicom": dicom}


def run_qc(
    source,
    *,
    near_dup_threshold: int = 4,
    hash_size: int = 8,
    outlier_z: float = 3.5,
    max_examples: int | None = 20,
    layout: str = "auto",
    allow_leakage: bool = False,
    facts: Callable[[list[dict]], Sequence[dict]] | None = None,
) -> dict:
    """Run every check and return a JSON-serialisable report (see docs/data.md for the keys).

    ``layout`` (folders): ``auto`` (a class tree when it looks like one, else raw), ``classes`` or ``raw``.
    ``allow_leakage``: duplicates across splits are recorded under ``leakage_accepted`` (counts) instead of
    failing the report. ``facts``: a function giving :func:`file_facts` for the file records, in order (e.g.
    computed on a cluster, :mod:`medsight.cluster`); by default each file is read here."""
    from medsight.data.readers.dicom import PRIVATE_KEYS
    from medsight.errors import choices_message

    if layout not in LAYOUTS:
        raise DataError(choices_message("qc layout", layout, LAYOUTS))
    records, arrays, kind = _items_from_source(source, layout)
    skipped = [r for r in records if r.get("skip")]
    records = [r for r in records if not r.get("skip")]
    raw = kind == "raw folder"
    n = len(records)
    series: dict[str, int] = defaultdict(int)
    series_of: list[str | None] = [None] * n
    modalities: Counter = Counter()
    n_dicom = 0
    phi = Counter()
    phi_any = 0
    unreadable: list[dict] = []
    exact: dict[str, list[int]] = defaultdict(list)
    phashes: list[int | None] = [None] * n
    shapes: list[tuple | None] = [None] * n
    spacings: list[tuple | None] = [None] * n
    medians = np.full(n, np.nan)
    given = facts(records) if facts is not None and arrays is None else None
    for i, rec in enumerate(progress.track(records, "QC: reading images") if given is None else records):
        if given is not None:
            f = given[i]
        elif arrays is not None:
            try:
                f = {"error": None, **array_facts(_arrays_as_chw(arrays[i]).astype(np.float32), {"spacing": None},
                                                  hash_size)}
            except Exception as e:  # defensive: QC must report, never crash
                f = {"error": f"{type(e).__name__}: {e}"}
        else:
            f = file_facts(rec["path"], hash_size)
        if f["error"] is not None:
            unreadable.append({"index": i, "path": str(rec.get("path")), "split": rec.get("split"), "error": f["error"]})
            continue
        d = f.get("dicom")
        if d is not None:
            n_dicom += 1
            series_of[i] = d["series"]
            series[d["series"] or ""] += 1
            modalities[d["modality"]] += 1
            phi.update(d["phi"])
            phi_any += bool(d["phi"])
        exact[f["hash"]].append(i)
        phashes[i] = f["phash"]
        shapes[i] = tuple(f["shape"])
        spacings[i] = tuple(f["spacing"]) if f["spacing"] else None
        medians[i] = f["median"]

    def item(i: int) -> dict:
        return {"index": i, "path": str(records[i].get("path")), "split": records[i].get("split")}

    exact_groups = []
    exact_pairs = set()
    for h, idx in exact.items():
        if len(idx) > 1:
            splits = {records[i].get("split") for i in idx}
            exact_groups.append({"hash": h[:12], "items": [item(i) for i in idx], "cross_split": len(splits) > 1})
            exact_pairs.update((a, b) for a in idx for b in idx if a < b)
    near = []
    near_within_series = 0
    for i, j, d in _near_pairs(phashes, near_dup_threshold, hash_size * hash_size):
        if (i, j) in exact_pairs:
            continue
        si, sj = records[i].get("split"), records[j].get("split")
        same_series = series_of[i] is not None and series_of[i] == series_of[j]
        if same_series:  # neighbouring slices of one series look alike: expected, not a duplicate
            near_within_series += 1
            continue
        near.append({"a": item(i), "b": item(j), "distance": d, "cross_split": si != sj})

    # class balance and missing labels
    labels = [_label_str(r.get("label")) for r in records]
    overall = Counter(l for l in labels if l is not None)
    per_split: dict[str, dict[str, int]] = defaultdict(dict)
    for r, l in zip(records, labels):
        if l is not None:
            s = str(r.get("split"))
            per_split[s][l] = per_split[s].get(l, 0) + 1
    missing = [] if raw else [item(i) for i, l in enumerate(labels) if l is None]
    counts = list(overall.values())
    ratio = float(max(counts) / min(counts)) if counts else None
    missing_classes = {s: sorted(set(overall) - set(c)) for s, c in per_split.items() if set(overall) - set(c)}

    # outliers
    ok = [i for i in range(n) if shapes[i] is not None]
    shape_counts = Counter(shapes[i] for i in ok)
    common_shape = shape_counts.most_common(1)[0][0] if shape_counts else None
    shape_mismatch = [dict(item(i), shape=list(shapes[i])) for i in ok if shapes[i] != common_shape]
    intensity_out = []
    if len(ok) >= 5:
        z = _robust_z(medians[ok])
        for i, zi in zip(ok, z):
            if abs(zi) > outlier_z:
                intensity_out.append(dict(item(i), median=float(medians[i]), z=round(float(zi), 2)))
    spacing_out = []
    sp_ok = [i for i in ok if spacings[i] is not None]
    if len(sp_ok) >= 5:
        dims = Counter(len(spacings[i]) for i in sp_ok).most_common(1)[0][0]
        sp_ok = [i for i in sp_ok if len(spacings[i]) == dims]
        mat = np.array([spacings[i] for i in sp_ok], dtype=np.float64)
        zs = np.stack([_robust_z(mat[:, k]) for k in range(mat.shape[1])], axis=1)
        for row, i in enumerate(sp_ok):
            if np.abs(zs[row]).max() > outlier_z:
                spacing_out.append(dict(item(i), spacing=list(spacings[i]), z=round(float(np.abs(zs[row]).max()), 2)))

    cross_exact = sum(1 for g in exact_groups if g["cross_split"])
    cross_near = sum(1 for p in near if p["cross_split"])
    dicom = None
    if n_dicom:
        sizes = sorted(v for k, v in series.items() if k)
        dicom = {
            "files": n_dicom,
            "series": len(sizes),
            "files_per_series": ({"min": sizes[0], "median": float(np.median(sizes)), "max": sizes[-1]}
                                 if sizes else None),
            "files_without_series_uid": series.get("", 0),
            "modalities": dict(sorted(modalities.items())),
            "near_duplicate_pairs_within_series": near_within_series,
            "phi": {"files_with_any": phi_any, "files_with": {k: phi[k] for k in PRIVATE_KEYS if phi.get(k)}},
        }
    report: dict[str, Any] = {
        "source": kind,
        "n_records": n,
        "n_readable": n - len(unreadable),
        "unreadable": unreadable[:max_examples] if max_examples else unreadable,
        "n_unreadable": len(unreadable),
        "exact_duplicates": exact_groups,
        "near_duplicates": near,
        "class_balance": {"overall": dict(sorted(overall.items())), "per_split": {k: dict(sorted(v.items())) for k, v in sorted(per_split.items())}, "imbalance_ratio": ratio, "classes_missing_from_split": missing_classes},
        "missing_labels": missing[:max_examples] if max_examples else missing,
        "n_missing_labels": len(missing),
        "outliers": {
            "common_shape": list(common_shape) if common_shape else None,
            "shape_mismatch": shape_mismatch[:max_examples],
            "n_shape_mismatch": len(shape_mismatch),
            "intensity": intensity_out[:max_examples],
            "spacing": spacing_out[:max_examples],
        },
        "summary": {
            "unreadable": len(unreadable),
            "exact_duplicate_groups": len(exact_groups),
            "exact_duplicates_across_splits": cross_exact,
            "near_duplicate_pairs": len(near),
            "near_duplicates_across_splits": cross_near,
            "missing_labels": len(missing),
            "shape_mismatch": len(shape_mismatch),
            "intensity_outliers": len(intensity_out),
            "spacing_outliers": len(spacing_out),
        },
        "settings": {"near_dup_threshold": near_dup_threshold, "hash_size": hash_size, "outlier_z": outlier_z},
    }
    report["labelled"] = not raw
    report["n_skipped"] = len(skipped)
    report["skipped"] = [{"path": r["path"], "reason": "not an image file type"} for r in skipped[:max_examples]]
    report["summary"]["skipped"] = len(skipped)
    report["dicom"] = dicom
    leak = bool(cross_exact or cross_near)
    report["leakage_accepted"] = ({"exact_duplicate_groups_across_splits": cross_exact,
                                   "near_duplicate_pairs_across_splits": cross_near}
                                  if leak and allow_leakage else None)
    report["ok"] = not (len(unreadable) or (leak and not allow_leakage) or (len(missing) and not raw))
    return report


def render_qc(report: dict):
    """A rich Table summarising a :func:`run_qc` report (one row per check)."""
    from rich.table import Table

    s = report["summary"]
    cb = report["class_balance"]
    t = Table(title=f"Data QC: {report['n_records']} files checked ({report['source']})")
    t.add_column("Check")
    t.add_column("Result", justify="right")
    t.add_column("Details")

    def flag(n: int, bad: bool = True) -> str:
        return f"[red]{n}[/red]" if n and bad else f"[yellow]{n}[/yellow]" if n else "[green]0[/green]"

    first = report["unreadable"][0]["error"] if report["unreadable"] else ""
    t.add_row("Unreadable files", flag(s["unreadable"]), first)
    labelled = report.get("labelled", True)
    within = (report.get("dicom") or {}).get("near_duplicate_pairs_within_series")
    near_note = f"Hamming <= {report['settings']['near_dup_threshold']}"
    if within:
        near_note += f"; {within} more within one series (neighbouring slices, not counted)"
    t.add_row("Exact duplicate groups", flag(s["exact_duplicate_groups"], False),
              f"{s['exact_duplicates_across_splits']} across splits" if labelled else "")
    t.add_row("Near duplicate pairs", flag(s["near_duplicate_pairs"], False),
              f"{s['near_duplicates_across_splits']} across splits ({near_note})" if labelled else near_note)
    bal = ", ".join(f"{k}: {v}" for k, v in list(cb["overall"].items())[:10])
    ratio = cb["imbalance_ratio"]
    t.add_row("Class balance", f"{ratio:.2f}x" if ratio else "-", bal)
    if report.get("labelled", True):
        t.add_row("Missing labels", flag(s["missing_labels"]), "")
    else:
        t.add_row("Labels", "-", "raw folder: none expected")
    if s.get("skipped"):
        t.add_row("Skipped files", flag(s["skipped"], False), "not an image file type")
    if report.get("leakage_accepted"):
        la = report["leakage_accepted"]
        t.add_row("Leakage accepted", "[yellow]yes[/yellow]",
                  f"{la['exact_duplicate_groups_across_splits']} exact groups, "
                  f"{la['near_duplicate_pairs_across_splits']} near pairs across splits (--allow-leakage)")
    dc = report.get("dicom")
    if dc:
        fps = dc["files_per_series"]
        per = f", {fps['min']}-{fps['max']} files per series (median {fps['median']:g})" if fps else ""
        mods = ", ".join(f"{k} {v}" for k, v in dc["modalities"].items())
        t.add_row("DICOM series", str(dc["series"]), f"{dc['files']} DICOM files{per}; "
                  f"{dc['files_without_series_uid']} without SeriesInstanceUID; modality {mods}")
        ph = dc["phi"]
        which = ", ".join(f"{k} {v}" for k, v in ph["files_with"].items()) or "none"
        t.add_row("Identifying headers", flag(ph["files_with_any"], False),
                  f"files carrying: {which} (counts only; de-identify with `medsight deid`)")
    t.add_row("Shape mismatch", flag(s["shape_mismatch"], False), f"common shape {report['outliers']['common_shape']}")
    t.add_row("Intensity outliers", flag(s["intensity_outliers"], False), f"robust z > {report['settings']['outlier_z']}")
    t.add_row("Spacing outliers", flag(s["spacing_outliers"], False), "")
    return t
