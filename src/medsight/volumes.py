"""3D volumes from NIfTI files listed in a CSV manifest -> :class:`medsight.data.sources.Dataset`.

Manifest columns: ``path`` (absolute, or relative to the CSV's folder), ``label`` (integer class index or class
name) and ``split`` (``train`` / ``val`` / ``test``). Each volume goes through the same
:func:`medsight.preprocess.apply_recipe` that prediction uses (intensity normalisation + resize), so the recipe
stored in the bundle reproduces training preprocessing exactly.

Interim reader: nibabel directly. At merge, :func:`read_nifti` is replaced by ``medsight.data.io.read_image``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from medsight.data.sources import SPLITS, Dataset, Split
from medsight.errors import DataError, optional_import

MANIFEST_COLUMNS = ("path", "label", "split")


def read_nifti(path: str | Path) -> np.ndarray:
    """A NIfTI file -> float32 array, channels first: (1, X, Y, Z) for 3D, (C, X, Y, Z) for a 4D file."""
    nib = optional_import("nibabel")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"NIfTI file {p} not found")
    try:
        arr = np.asarray(nib.load(str(p)).get_fdata(dtype=np.float32))
    except Exception as e:
        raise DataError(f"cannot read NIfTI file {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if arr.ndim == 3:
        return arr[None]
    if arr.ndim == 4:
        return np.ascontiguousarray(np.moveaxis(arr, -1, 0))
    raise DataError(f"NIfTI file {p} has {arr.ndim} dimensions; expected a 3D volume (or 4D with channels last)")


def write_nifti_manifest(images: np.ndarray, labels: Sequence, splits: Sequence[str], out_dir: str | Path, *,
                         spacing: Sequence[float] = (1.0, 1.0, 1.0), name: str = "manifest.csv") -> Path:
    """Write volumes ``images`` ((N, D, H, W) or (N, 1, D, H, W)) as ``out_dir/vol_XXXXX.nii.gz`` plus a CSV
    manifest (relative paths); returns the CSV path. Useful for tests, demos and exporting a MedMNIST3D set."""
    nib = optional_import("nibabel")
    images = np.asarray(images)
    if images.ndim == 5 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 4:
        raise DataError(f"write_nifti_manifest needs volumes of shape (N, D, H, W), got {images.shape}")
    if not len(images) == len(labels) == len(splits):
        raise DataError(f"{len(images)} volumes, {len(labels)} labels and {len(splits)} splits must match")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*map(float, spacing), 1.0])
    rows = []
    for i, (vol, lab, split) in enumerate(zip(images, labels, splits)):
        fn = f"vol_{i:05d}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(vol), affine), str(out / fn))
        rows.append({"path": fn, "label": int(np.asarray(lab).reshape(-1)[0]), "split": split})
    csv_path = out / name
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    return csv_path


def load_nifti_manifest(csv_path: str | Path, *, size: Sequence[int] | int | None = None,
                        intensity: dict | None = None, classes: Sequence[str] | None = None,
                        task: str | None = None, name: str | None = None) -> Dataset:
    """Read every volume of a ``path,label,split`` manifest into a 3D :class:`Dataset` (float32 in [0, 1]).

    ``size``: target (D, H, W) (default: the first volume's shape); ``intensity``: a preprocessing intensity
    spec (default ``{"mode": "percentile", "low": 0.5, "high": 99.5}`` per volume; ``{"mode": "range", "min": 0,
    "max": 255}`` for 8-bit exports, ``{"mode": "window", ...}`` for CT). ``classes``: class names, with labels
    given as indices or names (default: the sorted distinct labels). ``task``: default binary for 2 classes,
    else multiclass."""
    from medsight.preprocess import INTENSITY_MODES, apply_recipe

    p = Path(csv_path)
    if not p.is_file():
        raise DataError(f"manifest {p} not found")
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read manifest {p}: {type(e).__name__}: {e}") from e
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise DataError(f"manifest {p} lacks column(s) {', '.join(missing)}; it needs {', '.join(MANIFEST_COLUMNS)} "
                        f"(found {', '.join(header) or 'none'})")
    if not rows:
        raise DataError(f"manifest {p} has no rows")
    for i, r in enumerate(rows, start=2):
        if r["split"] not in SPLITS:
            raise DataError(f"manifest {p} line {i}: split {r['split']!r} is not one of {', '.join(SPLITS)}")
        if not (r["path"] or "").strip():
            raise DataError(f"manifest {p} line {i}: empty path")
    intensity = dict(intensity or {"mode": "percentile", "low": 0.5, "high": 99.5})
    if intensity.get("mode") not in INTENSITY_MODES:
        raise DataError(f"intensity mode {intensity.get('mode')!r} is not one of {', '.join(INTENSITY_MODES)}")

    # labels -> indices
    raw_labels = [r["label"].strip() for r in rows]
    if classes is None:
        try:
            ints = sorted({int(v) for v in raw_labels})
            classes = [str(v) for v in range(max(ints) + 1)] if ints and ints[0] >= 0 else None
        except ValueError:
            ints = None
        if classes is None:
            classes = sorted(set(raw_labels))
    classes = [str(c) for c in classes]
    index = {c: k for k, c in enumerate(classes)}
    y_all = []
    for i, v in enumerate(raw_labels, start=2):
        if v in index:
            y_all.append(index[v])
        elif v.lstrip("-").isdigit() and 0 <= int(v) < len(classes):
            y_all.append(int(v))
        else:
            raise DataError(f"manifest {p} line {i}: label {v!r} is not a class index 0..{len(classes) - 1} "
                            f"or one of {', '.join(classes)}")
    if len(classes) < 2:
        raise DataError(f"manifest {p} has a single class {classes}; classification needs at least 2")
    task = task or ("binary" if len(classes) == 2 else "multiclass")

    first = read_nifti(_resolve(p, rows[0]["path"]))
    target = tuple(first.shape[1:]) if size is None else ((int(size),) * 3 if isinstance(size, int)
                                                           else tuple(int(s) for s in size))
    if len(target) != 3:
        raise DataError(f"volume size must have 3 sides, got {target}")
    channels = first.shape[0]
    recipe = {"spatial_dims": 3, "channels": int(channels), "size": list(target), "intensity": intensity,
              "source": {"manifest": str(p)}}
    per_split: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SPLITS}
    for i, (r, y) in enumerate(zip(rows, y_all)):
        fp = _resolve(p, r["path"])
        vol = first if i == 0 else read_nifti(fp)
        x = apply_recipe(vol, recipe, name=str(fp))
        imgs, labs, ids = per_split[r["split"]]
        imgs.append(x)
        labs.append(y)
        ids.append(r["path"])
    splits = {}
    for s, (imgs, labs, ids) in per_split.items():
        if imgs:
            splits[s] = Split(images=np.stack(imgs).astype(np.float32), labels=np.asarray(labs, dtype=np.int64),
                              ids=ids)
    if "train" not in splits:
        raise DataError(f"manifest {p} has no rows with split 'train'")
    return Dataset(name=name or p.stem, task=task, classes=classes, spatial_dims=3, splits=splits, recipe=recipe)


def _resolve(manifest: Path, path: str) -> Path:
    q = Path(path.strip()).expanduser()
    return q if q.is_absolute() else manifest.parent / q
