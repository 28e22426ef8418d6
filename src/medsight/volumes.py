"""3D volumes: write a MedMNIST3D-style array out as NIfTI files with a ``path,label,split`` manifest.

Reading goes through the one user-data path (``medsight.data.sources.load_dataset`` ->
``data.folders.load_user_dataset`` -> ``data.io.read_image`` -> ``preprocess.apply_recipe``), so a volume
manifest trains, evaluates and predicts like any other manifest.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from medsight.errors import DataError, optional_import

MANIFEST_COLUMNS = ("path", "label", "split")


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
