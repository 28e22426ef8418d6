"""Data quality control: unreadable files, exact / near duplicates (within and across splits),
class balance, size / spacing / intensity outliers and missing labels.

``run_qc`` accepts records (from :mod:`medsight.data.folders`), a folder or CSV manifest path, or a
MedMNIST-style ``{split: (images, labels)}`` dict, and returns a JSON-serialisable report.
``render_qc`` turns the report into a rich Table for the CLI.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

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


def _items_from_source(source) -> tuple[list[dict], Iterator | None, str]:
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
            return scan_class_folders(p), None, "folder"
        if p.suffix.lower() in (".csv", ".tsv"):
            return read_manifest(p), None, "manifest"
        if p.suffix.lower() == ".npz":
            try:
                with np.load(p) as z:
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


def run_qc(
    source,
    *,
    near_dup_threshold: int = 4,
    hash_size: int = 8,
    outlier_z: float = 3.5,
    max_examples: int = 20,
) -> dict:
    """Run every check and return a JSON-serialisable report (see docs/data.md for the keys)."""
    from medsight.data.io import read_image

    records, arrays, kind = _items_from_source(source)
    n = len(records)
    unreadable: list[dict] = []
    exact: dict[str, list[int]] = defaultdict(list)
    phashes: list[int | None] = [None] * n
    shapes: list[tuple | None] = [None] * n
    spacings: list[tuple | None] = [None] * n
    medians = np.full(n, np.nan)
    for i, rec in enumerate(progress.track(records, "QC: reading images")):
        try:
            if arrays is not None:
                arr = _arrays_as_chw(arrays[i]).astype(np.float32)
                meta = {"spacing": None}
            else:
                arr, meta = read_image(rec["path"])
        except DataError as e:
            unreadable.append({"index": i, "path": str(rec.get("path")), "split": rec.get("split"), "error": str(e)})
            continue
        except Exception as e:  # defensive: QC must report, never crash
            unreadable.append({"index": i, "path": str(rec.get("path")), "split": rec.get("split"), "error": f"{type(e).__name__}: {e}"})
            continue
        exact[image_hash(arr)].append(i)
        try:
            phashes[i] = _phash(arr, hash_size)
        except Exception:  # pragma: no cover - degenerate arrays
            phashes[i] = None
        shapes[i] = tuple(int(s) for s in arr.shape)
        sp = meta.get("spacing")
        spacings[i] = tuple(float(s) for s in sp) if sp else None
        medians[i] = float(np.median(arr))

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
    for i, j, d in _near_pairs(phashes, near_dup_threshold, hash_size * hash_size):
        if (i, j) in exact_pairs:
            continue
        si, sj = records[i].get("split"), records[j].get("split")
        near.append({"a": item(i), "b": item(j), "distance": d, "cross_split": si != sj})

    # class balance and missing labels
    labels = [_label_str(r.get("label")) for r in records]
    overall = Counter(l for l in labels if l is not None)
    per_split: dict[str, dict[str, int]] = defaultdict(dict)
    for r, l in zip(records, labels):
        if l is not None:
            s = str(r.get("split"))
            per_split[s][l] = per_split[s].get(l, 0) + 1
    missing = [item(i) for i, l in enumerate(labels) if l is None]
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
    report["ok"] = not (len(unreadable) or cross_exact or cross_near or len(missing))
    return report


def render_qc(report: dict):
    """A rich Table summarising a :func:`run_qc` report (one row per check)."""
    from rich.table import Table

    s = report["summary"]
    cb = report["class_balance"]
    t = Table(title=f"Data QC: {report['n_records']} records ({report['source']})")
    t.add_column("Check")
    t.add_column("Result", justify="right")
    t.add_column("Details")

    def flag(n: int, bad: bool = True) -> str:
        return f"[red]{n}[/red]" if n and bad else f"[yellow]{n}[/yellow]" if n else "[green]0[/green]"

    first = report["unreadable"][0]["error"] if report["unreadable"] else ""
    t.add_row("Unreadable files", flag(s["unreadable"]), first)
    t.add_row("Exact duplicate groups", flag(s["exact_duplicate_groups"], False), f"{s['exact_duplicates_across_splits']} across splits")
    t.add_row("Near duplicate pairs", flag(s["near_duplicate_pairs"], False), f"{s['near_duplicates_across_splits']} across splits (Hamming <= {report['settings']['near_dup_threshold']})")
    bal = ", ".join(f"{k}: {v}" for k, v in list(cb["overall"].items())[:10])
    ratio = cb["imbalance_ratio"]
    t.add_row("Class balance", f"{ratio:.2f}x" if ratio else "-", bal)
    t.add_row("Missing labels", flag(s["missing_labels"]), "")
    t.add_row("Shape mismatch", flag(s["shape_mismatch"], False), f"common shape {report['outliers']['common_shape']}")
    t.add_row("Intensity outliers", flag(s["intensity_outliers"], False), f"robust z > {report['settings']['outlier_z']}")
    t.add_row("Spacing outliers", flag(s["spacing_outliers"], False), "")
    return t
