"""Cross-dataset OOD matrix: does each packaged recipe's detector flag the other MedMNIST sets and synthetic
images, at few false alarms on its own test split?

For every recipe in ``src/medsight/recipes`` (epochs capped so a run stays near a minute on one CPU thread; the
detector's quality is measured, not the classifier's), one model is trained on the training split, and two
detectors are fitted from the SAME features in the same process:

- ``new``: the default combined detector (:func:`medsight.ood.fit_combined_detector`: feature Mahalanobis +
  input statistics + downsampled-pixel PPCA, fitted on train, thresholds calibrated on val to <= 3 % false
  alarms), saved to ``ood.npz`` and read back before scoring (the bundle format is what is measured);
- ``old``: features-only Mahalanobis, threshold at the 95th percentile of validation scores.

Other sets go through the model's own preprocessing recipe (:func:`medsight.data.preprocess.apply_recipe`, as
``medsight predict`` does): a 2D image shown to a 3D model, or a 3D volume shown to a 2D model, is refused by
shape before any model runs. The same set at another resolution is resized to the model's input and reported
apart (in distribution: it should be flagged about as often as the own test split).

    MEDSIGHT_DATA_DIR=/work/shared/data/medmnist OMP_NUM_THREADS=1 python benchmarks/ood_matrix.py
        [--recipes breastmnist pneumoniamnist] [--n-synthetic 50] [--out benchmarks/results/ood_matrix]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# recipe -> epochs used here (the recipe's own epochs are in its YAML); sized for ~60-90 s per run on one thread
EPOCHS = {"breastmnist": 20, "breastmnist_64": 15, "breastmnist_r18": 4, "pneumoniamnist": 12,
          "pneumoniamnist_r18": 1, "adrenalmnist3d": 8}
SETS = (("breastmnist", 28), ("breastmnist", 64), ("pneumoniamnist", 28), ("adrenalmnist3d", 28),
        ("adrenalmnist3d", 64))
SYNTHETIC = ("constant_0", "constant_1", "uniform_noise", "gaussian_noise", "checkerboard", "gradient")


def set_label(name: str, size: int) -> str:
    return name if size == 28 else f"{name}_{size}"


def synthetic(kind: str, n: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """``n`` synthetic model inputs (C, *S) in [0, 1]."""
    sp = shape[1:]
    if kind == "constant_0":
        return np.zeros((n, *shape), np.float32)
    if kind == "constant_1":
        return np.ones((n, *shape), np.float32)
    if kind == "uniform_noise":
        return rng.uniform(0, 1, (n, *shape)).astype(np.float32)
    if kind == "gaussian_noise":
        mu = rng.uniform(0.3, 0.7, (n,) + (1,) * len(shape))
        sd = rng.uniform(0.05, 0.25, (n,) + (1,) * len(shape))
        return np.clip(mu + sd * rng.standard_normal((n, *shape)), 0, 1).astype(np.float32)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in sp], indexing="ij")
    out = np.empty((n, *shape), np.float32)
    for i in range(n):
        if kind == "checkerboard":
            cell = int(rng.integers(2, max(3, min(sp) // 3)))
            lo, hi = sorted(rng.uniform(0, 1, 2))
            phase = rng.integers(0, cell, len(sp))
            parity = sum(((g + p) // cell).astype(int) for g, p in zip(grids, phase)) % 2
            img = np.where(parity == 1, hi, lo)
        elif kind == "gradient":  # a smooth "natural-like" image: a ramp in a random direction plus soft blobs
            d = rng.standard_normal(len(sp))
            img = sum(di * g / s for di, g, s in zip(d, grids, sp))
            for _ in range(int(rng.integers(1, 4))):
                centre = [rng.uniform(0, s) for s in sp]
                width = rng.uniform(0.1, 0.4) * min(sp)
                img = img + rng.uniform(-1, 1) * np.exp(-sum((g - m) ** 2 for g, m in zip(grids, centre))
                                                         / (2 * width ** 2))
            img = (img - img.min()) / max(float(np.ptp(img)), 1e-9)
        else:
            raise ValueError(kind)
        out[i] = np.broadcast_to(img, shape)
    return out


def to_model_input(images: np.ndarray, recipe: dict) -> np.ndarray:
    """Stored images (uint8, (N, C, *S)) -> model inputs through the model's recipe (DataError when refused)."""
    from medsight.data.preprocess import apply_recipe

    return np.stack([apply_recipe(img.astype(np.float32), {}, recipe, name="image") for img in images])


def rate(flags) -> float:
    return round(float(np.mean(flags)), 4)


def run_recipe(recipe: str, epochs: int, root: str, n_syn: int, workdir: Path) -> dict:
    import torch

    from medsight.config import load_config
    from medsight.data.sources import load_medmnist
    from medsight.errors import DataError
    from medsight.ood import (fit_combined_detector, last_linear, load_ood,
                              logits_and_features, mahalanobis_from_features, mahalanobis_state, ood_flags,
                              save_ood, score_from_outputs, component_scores)
    from ood_baselines import fit_ood_threshold  # tests/: the features-only baseline's threshold
    from medsight.train import fit

    cfg = load_config(None, {"train.epochs": epochs, "train.threads": 1, "train.device": "cpu", "train.seed": 0,
                             "train.n_boot": 0}, recipe=recipe)
    data = load_medmnist(cfg.data.name, cfg.data.size, root=root, download_missing=False)
    t0, c0 = time.perf_counter(), time.process_time()
    model = fit(cfg, data).model.eval()
    train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.set_num_threads(1)
    layer = last_linear(model)[0]

    def feats(x):
        return logits_and_features(model, x, layer=layer)[1].numpy()

    t0, c0 = time.perf_counter(), time.process_time()
    tr, va, te = (data.splits[s] for s in ("train", "val", "test"))
    f_tr, f_va = feats(tr.images), feats(va.images)
    new = fit_combined_detector(f_tr, tr.labels, tr.images, f_va, va.images, layer=layer)
    new = load_ood(save_ood(workdir / f"{recipe}-ood.npz", new))  # score with what a bundle carries
    old = mahalanobis_state(f_tr, tr.labels)
    old["threshold"] = fit_ood_threshold(mahalanobis_from_features(f_va, old), 0.95)
    fit_s = time.perf_counter() - t0

    def score(x) -> dict:
        f = feats(x)
        s_new = score_from_outputs(None, f, new, x=x)
        comps = component_scores(f, x, new)
        return {"new": rate(ood_flags(s_new, new["threshold"])),
                "old": rate(ood_flags(mahalanobis_from_features(f, old), old["threshold"])),
                "components": {k: rate(v > new["thresholds"][k]) for k, v in comps.items()}, "n": len(x)}

    row: dict = {"recipe": recipe, "data": set_label(cfg.data.name, cfg.data.size), "epochs": epochs,
                 "model": cfg.model.name, "train_seconds": round(train_s, 1),
                 "train_cpu_seconds": round(train_cpu, 1), "quantile": new["quantile"],
                 "thresholds": new["thresholds"], "old_threshold": old["threshold"],
                 "val_false_alarm": score(va.images), "test_false_alarm": score(te.images),
                 "same_set_resized": {}, "other_sets": {}, "synthetic": {}}
    shape = tuple(int(v) for v in new["input_shape"])
    for name, size in SETS:
        label = set_label(name, size)
        if label == row["data"]:
            continue
        try:
            other = load_medmnist(name, size, root=root, download_missing=False).splits["test"].images
        except DataError as e:
            row["other_sets"][label] = {"missing": str(e)}
            continue
        try:
            x = to_model_input(other, data.recipe)
        except DataError as e:
            row["other_sets"][label] = {"refused": str(e).split(": ", 1)[-1]}
            continue
        (row["same_set_resized"] if name == cfg.data.name else row["other_sets"])[label] = score(x)
    # probes across dimensionality: an axial mid-slice of each adrenal volume for 2D models, 28 consecutive
    # chest X-rays stacked into one volume for 3D models
    if data.spatial_dims == 2:
        vol = load_medmnist("adrenalmnist3d", 28, root=root, download_missing=False).splits["test"].images
        row["other_sets"]["adrenalmnist3d_midslice"] = score(to_model_input(vol[:, :, vol.shape[2] // 2], data.recipe))
    else:
        xr = load_medmnist("pneumoniamnist", 28, root=root, download_missing=False).splits["test"].images
        d = shape[1]
        stacks = np.stack([xr[i * d:(i + 1) * d, 0] for i in range(len(xr) // d)])[:, None]
        row["other_sets"]["pneumoniamnist_stacked"] = score(to_model_input(stacks, data.recipe))
    rng = np.random.default_rng(0)
    for kind in SYNTHETIC:
        row["synthetic"][kind] = score(synthetic(kind, n_syn, shape, rng))
    row["score_seconds"] = round(time.perf_counter() - t0, 1)
    row["score_cpu_seconds"] = round(time.process_time() - c0, 1)
    row["detector_fit_seconds"] = round(fit_s, 1)
    return row


def cell(d: dict) -> str:
    if "refused" in d:
        return "refused (shape)"
    if "missing" in d:
        return "missing"
    return f"{100 * d['new']:.0f} ({100 * d['old']:.0f})"


def table(rows: list[dict]) -> str:
    others = sorted({k for r in rows for k in r["other_sets"]})
    same = sorted({k for r in rows for k in r["same_set_resized"]})
    lines = ["| recipe (data, epochs) | own test false alarms | val false alarms | "
             + " | ".join(others) + " | " + " | ".join(SYNTHETIC) + " | same set resized |",
             "|---" * (3 + len(others) + len(SYNTHETIC) + 1) + "|"]
    for r in rows:
        cells = [f"{r['recipe']} ({r['data']}, {r['epochs']} ep)", cell(r["test_false_alarm"]),
                 cell(r["val_false_alarm"])]
        cells += [cell(r["other_sets"][k]) if k in r["other_sets"] else "-" for k in others]
        cells += [cell(r["synthetic"][k]) for k in SYNTHETIC]
        cells.append(", ".join(f"{k}: {cell(r['same_set_resized'][k])}" for k in same if k in r["same_set_resized"])
                     or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from medsight.config import list_recipes
    from medsight.utils import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=None, help="default: every packaged recipe")
    ap.add_argument("--n-synthetic", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ood_matrix"))
    args = ap.parse_args()
    root = os.environ.get("MEDSIGHT_DATA_DIR")
    if not root:
        sys.exit("set MEDSIGHT_DATA_DIR to the folder holding the MedMNIST .npz files")
    recipes = args.recipes or list_recipes()
    rows = []
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        for rec in recipes:
            rows.append(run_recipe(rec, EPOCHS.get(rec, 5), root, args.n_synthetic, Path(tmp)))
            r = rows[-1]
            print(f"{rec}: trained {r['train_seconds']} s ({r['train_cpu_seconds']} s CPU), detectors + scoring "
                  f"{r['score_seconds']} s ({r['score_cpu_seconds']} s CPU), "
                  f"test false alarms new {r['test_false_alarm']['new']:.3f} / old {r['test_false_alarm']['old']:.3f}",
                  flush=True)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    def worst(key: str) -> tuple[float, float]:
        fa = max(r["test_false_alarm"][key] for r in rows)
        det = min(v[key] for r in rows for v in [*r["other_sets"].values(), *r["synthetic"].values()] if key in v)
        return fa, det

    (fa_new, det_new), (fa_old, det_old) = worst("new"), worst("old")
    md = ("# OOD detection matrix\n\n"
          "Percent of images flagged by the **new** combined detector (the old features-only Mahalanobis in "
          "brackets, fitted from the same features in the same process). `own test false alarms`: the recipe's "
          "own test split (target <= 5 %); `val`: its validation split (where the thresholds were calibrated); "
          "the other columns are detection rates (target >= 95 %).\n\n"
          f"Summary: worst own-test false-alarm rate {100 * fa_new:.1f} % new, {100 * fa_old:.1f} % old; "
          f"lowest detection rate over all other sets and synthetic kinds {100 * det_new:.1f} % new, "
          f"{100 * det_old:.1f} % old.\n\n"
          "- `refused (shape)`: the model's preprocessing recipe refuses the input before any model runs (a 2D "
          "image for the 3D model, a 3D volume for a 2D model: `cannot preprocess ...: it is a 3D volume ... but "
          "the recipe expects 2D images`). The probes across dimensionality instead: `adrenalmnist3d_midslice` "
          "(the middle slice of each adrenal volume as a 2D image) and `pneumoniamnist_stacked` (28 consecutive "
          "chest X-rays stacked into one volume).\n"
          "- Synthetic inputs (model input space, [0, 1]): constant 0, constant 1, uniform noise, Gaussian noise "
          "(random mean and spread), checkerboards (random cell size, phase and levels), smooth gradients with "
          "soft blobs.\n"
          "- `same set resized`: the recipe's own dataset at the other MedMNIST resolution, resized by the "
          "recipe. Not counted as OOD, and not always in distribution for the input statistics: BreastMNIST 28 px "
          "upsampled to 64 px is blurrier than the native 64 px images, and AdrenalMNIST3D volumes are binary "
          "masks that trilinear resizing from 64^3 turns into non-binary volumes never seen in training; the "
          "intensity component flags those (the features alone do not).\n\n"
          f"Epochs are capped for time (one CPU thread; the recipes' own epochs: see their YAML), "
          f"{args.n_synthetic} synthetic images per kind; total {total:.0f} s wall, {total_cpu:.0f} s CPU (a shared "
          f"2-core machine).\n"
          f"Command: `MEDSIGHT_DATA_DIR=... OMP_NUM_THREADS=1 python benchmarks/ood_matrix.py`\n\n"
          + table(rows) + "\n")
    print(md)
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".md"), md)
    atomic_write_text(out.with_suffix(".json"), json.dumps({"total_seconds": round(total, 1),
                                                            "total_cpu_seconds": round(total_cpu, 1), "rows": rows},
                                                           indent=1) + "\n")


if __name__ == "__main__":
    main()
