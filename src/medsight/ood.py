"""Out-of-distribution (OOD) scores per prediction: is this image like the ones the model was trained on?

Every score is oriented the same way: **higher = more out-of-distribution**.

- ``"combined"``: three component scores, each fitted on the *training* split, each with its own
  threshold calibrated on the *validation* split; an image is flagged when ANY component exceeds its threshold:

  * ``features``: Mahalanobis distance of the penultimate features (the input of the model's last ``nn.Linear``)
    to the nearest class mean (class-conditional means, one tied covariance; Lee et al. 2018);
  * ``intensity``: Mahalanobis distance of cheap statistics of the model input (:func:`input_statistics`:
    intensity histogram, mean, std, quantiles, gradient energy per axis, gradient-magnitude histogram, mean
    intensity profile along each axis) to their training mean (one covariance shrunk towards its diagonal);
  * ``pixels``: probabilistic-PCA score of the input area-downsampled to a coarse grid (16 x 16 in 2D, 8 x 8 x 8
    in 3D): Mahalanobis distance inside the principal subspace + residual energy / noise variance.

  Features alone miss foreign images whose features land near a class mean (a chest X-ray or uniform noise
  shown to a breast-ultrasound model); the input components see what the image looks like, the feature
  component what the model makes of it. The per-component quantile is the lowest (most sensitive) one whose
  union of flags stays at or below ``false_alarm`` (default 3 %, counted conservatively as
  ``(flagged + 1) / (n + 1)``) on validation; the input components' thresholds pool out-of-fold training scores
  with validation (small validation sets give noisy tail quantiles). With fewer than ``1 / false_alarm - 1``
  validation images no quantile qualifies and the thresholds are the largest in-distribution scores. The
  reported ``ood_score`` is ``max_k score_k / threshold_k`` (flag: > 1). Input statistics are computed in numpy
  from the preprocessed model input, so the PyTorch and ONNX backends score identically
  (:func:`score_from_outputs` with ``x``).
  ``benchmarks/ood_matrix.py`` measures every packaged recipe against the other MedMNIST sets and synthetic
  images (``benchmarks/results/ood_matrix.md``).

The single-score detectors of earlier versions (features-only Mahalanobis, energy, MSP; file format
``medsight-ood/1``) are retired: an ``ood.npz`` in that format is refused in one line. The baselines the benchmarks
compare against live in ``tests/ood_baselines.py``.

A fitted detector (:func:`fit_ood_detector`, or :func:`fit_combined_detector` from arrays) is a dict of numpy
arrays and scalars; :func:`save_ood` / :func:`load_ood` store it as ``ood.npz`` in a bundle (no pickles; a
malformed file is refused with one line), and :func:`detector_to_json` / :func:`detector_from_json` convert it
to / from a ``bundle.json``-compatible dict of lists.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsight.errors import ConfigError, DataError, choices_message
from medsight.config import EVAL_BATCH_SIZE
from medsight.inference import last_linear, run_model

SCORES = ("combined",)
RETIRED_FORMAT = "medsight-ood/1"  # the single-score detectors of earlier versions: refused on load
FORMAT_COMBINED = "medsight-ood/2"  # the combined detector
COMPONENTS = ("features", "intensity", "pixels")


# --------------------------------------------------------------------------------------------- features
@torch.inference_mode()
def logits_and_features(model: nn.Module, images, *, batch_size: int = EVAL_BATCH_SIZE,
                        device: str | torch.device | None = None, layer: str | None = None, tab=None,
                        tta_flip=()) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over stored images (uint8 or float in [0, 1]) through :func:`medsight.inference.run_model`:
    (logits (N, K), penultimate features (N, D)), float32 on the CPU. Features are the input of ``layer``
    (default: the last ``nn.Linear``); ``tab`` and ``tta_flip`` as for every evaluation pass."""
    out = run_model(model, images, batch_size=batch_size, device=device, layer=layer, features=True, tab=tab,
                    tta_flip=tta_flip)
    if len(out.logits) == 0:
        raise DataError("no images to score")
    assert out.features is not None  # asked for with features=True
    return out.logits, out.features


class WithFeatures(nn.Module):
    """``forward(x) -> (logits, features)``: the model plus its penultimate features as a second output, for an
    ONNX export whose runtime must compute the Mahalanobis score without PyTorch hooks."""

    def __init__(self, model: nn.Module, layer: str | None = None):
        super().__init__()
        self.model = model
        self.layer = layer if layer is not None else last_linear(model)[0]
        modules = dict(model.named_modules())
        if self.layer not in modules:
            raise ConfigError(f"model has no layer {self.layer!r} for OOD features")
        self._tap = modules[self.layer]

    def forward(self, x: torch.Tensor, *extra: torch.Tensor):
        box: list[torch.Tensor] = []
        h = self._tap.register_forward_hook(lambda m, inp, out: box.append(inp[0].flatten(1)))
        try:
            logits = self.model(x, *extra)
        finally:
            h.remove()
        return logits, box[0]


# --------------------------------------------------------------------------------------------- Mahalanobis
def _class_labels(labels, n: int) -> np.ndarray:
    """(N,) class indices; ``None`` or multilabel (N, K) labels -> one class-agnostic class 0."""
    if labels is None or np.asarray(labels).ndim == 2 and np.asarray(labels).shape[1] > 1:
        return np.zeros(n, dtype=np.int64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(y) != n:
        raise DataError(f"Mahalanobis state: {n} images but {len(y)} labels")
    return y


def mahalanobis_state(features, labels=None, *, shrinkage: float = 1e-3) -> dict:
    """Class-conditional means and one shared covariance of (N, D) TRAINING features (arrays in, arrays out).

    Returns ``{"means" (K, D), "precision" (D, D), "classes" (K,)}``. The covariance is shrunk towards
    ``shrinkage * mean variance * I`` so it is invertible even with few samples."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise DataError(f"features must have shape (N, D), got {f.shape}")
    n, d = f.shape
    y = _class_labels(labels, n)
    if n < 2:
        raise DataError(f"Mahalanobis state needs at least 2 training images, got {n}")
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / max(1, n - len(classes))
    cov += np.eye(d) * (shrinkage * max(float(np.trace(cov)) / d, 1e-12))
    precision = np.linalg.pinv(cov, hermitian=True)
    return {"means": means.astype(np.float64), "precision": precision.astype(np.float64),
            "classes": classes.astype(np.int64)}


def mahalanobis_from_features(features, state: dict) -> np.ndarray:
    """Squared Mahalanobis distance of each feature row to its nearest class mean."""
    f = np.asarray(features, dtype=np.float64)
    means, prec = np.asarray(state["means"], dtype=np.float64), np.asarray(state["precision"], dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != means.shape[1]:
        raise DataError(f"features of shape {f.shape} do not match the fitted Mahalanobis state "
                        f"({means.shape[1]} features)")
    d = []
    for m in means:
        c = f - m
        d.append(np.einsum("nd,de,ne->n", c, prec, c))
    return np.min(np.stack(d, axis=1), axis=1)


# --------------------------------------------------------------------------------------------- input components
_BINS = 16  # intensity histogram bins over [0, 1]
_GRAD_EDGES = (0.0, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, np.inf)  # gradient-magnitude histogram bins
_PROFILE = 7  # cells of the mean intensity profile along each spatial axis
_QUANTILES = (0.05, 0.5, 0.95)
_CHUNK = 256  # images per chunk: bounded memory for 3D inputs


def _input_array(x) -> np.ndarray:
    """Model inputs (N, C, *S) as float32 in [0, 1]: uint8 divided by 255, float taken as normalised (as
    :func:`medsight.inference.to_float`)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    a = a.astype(np.float32) / np.float32(255) if a.dtype == np.uint8 else a.astype(np.float32, copy=False)
    if a.ndim not in (4, 5):
        raise DataError(f"model inputs must have shape (N, C, H, W) or (N, C, D, H, W), got {a.shape}")
    if a.shape[0] == 0:
        raise DataError("no images to score")
    return a


def n_input_statistics(spatial_dims: int) -> int:
    """Length of an :func:`input_statistics` row."""
    return _BINS + 2 + len(_QUANTILES) + spatial_dims + len(_GRAD_EDGES) - 1 + _PROFILE * spatial_dims


def _histograms(values: np.ndarray, edges) -> np.ndarray:
    """Row-wise histogram fractions of (n, P) values over increasing ``edges``."""
    n, p = values.shape
    idx = np.clip(np.searchsorted(np.asarray(edges[1:-1]), values, side="right"), 0, len(edges) - 2)
    k = len(edges) - 1
    return np.bincount((idx + k * np.arange(n)[:, None]).ravel(), minlength=n * k).reshape(n, k) / p


def _statistics_chunk(a: np.ndarray) -> np.ndarray:
    n, dims = a.shape[0], a.ndim - 2
    g = a.mean(axis=1, dtype=np.float64)  # channels -> grey, (n, *S)
    flat = g.reshape(n, -1)
    hist = _histograms(flat, np.linspace(0, 1, _BINS + 1))
    mean, std = flat.mean(axis=1), flat.std(axis=1)
    quant = np.quantile(flat, _QUANTILES, axis=1).T
    diffs = [np.diff(g, axis=ax) for ax in range(1, dims + 1)]
    grads = np.stack([np.abs(d).reshape(n, -1).mean(axis=1) for d in diffs], 1)
    crop = (slice(None),) + (slice(0, -1),) * dims
    mag = np.sqrt(sum(d[tuple(slice(None) if i == ax else c for i, c in enumerate(crop))] ** 2
                      for ax, d in enumerate(diffs, start=1))).reshape(n, -1)
    ghist = _histograms(mag, _GRAD_EDGES)
    profiles = []
    for ax in range(1, dims + 1):
        prof = g.mean(axis=tuple(i for i in range(1, dims + 1) if i != ax))  # (n, S_ax)
        profiles.append(prof @ _area_matrix(prof.shape[1], _PROFILE).T)
    return np.concatenate([np.sqrt(hist), mean[:, None], np.log(std + 1e-3)[:, None], quant,
                           np.log(grads + 1e-4), np.sqrt(ghist), *profiles], axis=1)


def input_statistics(x) -> np.ndarray:
    """Cheap statistics of model inputs (N, C, *S) in [0, 1] -> (N, F) float64: square-root intensity histogram
    (16 bins), mean, log std, 5/50/95 % quantiles, log mean absolute gradient per spatial axis, square-root
    gradient-magnitude histogram (7 bins) and the mean intensity profile along each spatial axis (7 cells).
    Numpy only, from the preprocessed input: the torch and ONNX backends agree."""
    a = _input_array(x)
    return np.concatenate([_statistics_chunk(a[i:i + _CHUNK]) for i in range(0, len(a), _CHUNK)])


def pixel_grid(spatial_shape) -> list[int]:
    """The coarse grid of the pixel component: 16 x 16 in 2D, 8 x 8 x 8 in 3D (never above the input size)."""
    side = 16 if len(spatial_shape) == 2 else 8
    return [min(side, int(s)) for s in spatial_shape]


@functools.lru_cache(maxsize=64)
def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) area-averaging weights (each output cell: the mean of the input cells it covers); cached,
    read-only."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        lo, hi = edges[o], edges[o + 1]
        for i in range(int(np.floor(lo)), int(np.ceil(hi))):
            m[o, i] = (min(hi, i + 1) - max(lo, i)) / (hi - lo)
    m.setflags(write=False)
    return m


def downsample(x, grid) -> np.ndarray:
    """Model inputs (N, C, *S) -> grey, area-downsampled to ``grid`` and flattened: (N, prod(grid)) float64."""
    a = _input_array(x)
    if len(grid) != a.ndim - 2:
        raise DataError(f"pixel grid {list(grid)} does not match inputs of shape {a.shape}")
    mats = [_area_matrix(int(s), int(g)) for s, g in zip(a.shape[2:], grid)]
    out = []
    for i in range(0, len(a), _CHUNK):
        g = a[i:i + _CHUNK].mean(axis=1, dtype=np.float64)
        for ax, m in enumerate(mats, start=1):
            g = np.moveaxis(np.tensordot(g, m.T, axes=([ax], [0])), -1, ax)
        out.append(g.reshape(len(g), -1))
    return np.concatenate(out)


def gaussian_state(x, *, shrinkage: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of (N, F) rows; the covariance is shrunk towards its diagonal (scale-free) and each
    variance floored at 1 % of the median variance, so a statistic constant in training cannot blow up."""
    s = np.asarray(x, dtype=np.float64)
    if s.ndim != 2 or len(s) < 2:
        raise DataError(f"need at least 2 training rows of statistics, got shape {s.shape}")
    mu = s.mean(axis=0)
    c = s - mu
    cov = c.T @ c / (len(s) - 1)
    var = np.diag(cov).copy()
    floor = max(0.01 * float(np.median(var)), 1e-12)
    np.fill_diagonal(cov, np.maximum(var, floor))
    cov = (1 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov))
    return mu, np.linalg.pinv(cov, hermitian=True)


def gaussian_score(x, mean, precision) -> np.ndarray:
    """Squared Mahalanobis distance of each row to one mean."""
    c = np.asarray(x, dtype=np.float64) - np.asarray(mean, dtype=np.float64)
    return np.einsum("nd,de,ne->n", c, np.asarray(precision, dtype=np.float64), c)


def ppca_state(pixels, *, variance: float = 0.95, max_components: int = 32) -> dict:
    """Probabilistic PCA of (N, P) downsampled TRAINING pixels: the principal components explaining
    ``variance`` of the variance (at most ``max_components`` and N // 4) and the mean discarded variance."""
    x = np.asarray(pixels, dtype=np.float64)
    n, p = x.shape
    if n < 4:
        raise DataError(f"the pixel OOD component needs at least 4 training images, got {n}")
    mu = x.mean(axis=0)
    _, sv, vt = np.linalg.svd(x - mu, full_matrices=False)
    ev = sv ** 2 / (n - 1)
    total = float(ev.sum())
    k = int(np.searchsorted(np.cumsum(ev) / max(total, 1e-300), variance)) + 1
    k = max(1, min(k, max_components, n // 4, len(ev) - 1, p - 1))
    noise = float(ev[k:].sum()) / (p - k)
    noise = max(noise, 1e-6 * total / p, 1e-12)
    return {"pix_mean": mu, "pix_components": vt[:k].copy(), "pix_var": np.maximum(ev[:k], noise),
            "pix_noise": noise}


def ppca_score(pixels, state: dict) -> np.ndarray:
    """Mahalanobis distance inside the principal subspace + residual energy / noise variance."""
    c = np.asarray(pixels, dtype=np.float64) - np.asarray(state["pix_mean"], dtype=np.float64)
    z = c @ np.asarray(state["pix_components"], dtype=np.float64).T
    inside = (z ** 2 / np.asarray(state["pix_var"], dtype=np.float64)).sum(axis=1)
    resid = np.maximum((c ** 2).sum(axis=1) - (z ** 2).sum(axis=1), 0.0)
    return inside + resid / float(state["pix_noise"])


# --------------------------------------------------------------------------------------------- combined detector
def component_scores(features, x, det: dict) -> dict[str, np.ndarray]:
    """Each component's score (higher = more OOD) from penultimate ``features`` (N, D) and model inputs ``x``
    (N, C, *S), the latter only needed by the input components."""
    comps = list(det["components"])
    out: dict[str, np.ndarray] = {}
    if "features" in comps:
        out["features"] = mahalanobis_from_features(features, det)
    if "intensity" in comps or "pixels" in comps:
        if x is None:
            raise ConfigError("this OOD detector also scores the model input: pass the preprocessed batch as x")
        a = _input_array(x)
        if list(a.shape[1:]) != [int(v) for v in det["input_shape"]]:
            raise DataError(f"model inputs of shape {tuple(a.shape[1:])} do not match the OOD detector's "
                            f"{tuple(det['input_shape'])}")
        if "intensity" in comps:
            out["intensity"] = gaussian_score(input_statistics(a), det["stat_mean"], det["stat_precision"])
        if "pixels" in comps:
            out["pixels"] = ppca_score(downsample(a, det["pix_grid"]), det)
    n = {len(v) for v in out.values()}
    if len(n) > 1:
        raise DataError(f"features and inputs hold different numbers of images ({sorted(n)})")
    return out


def combined_score(scores: dict, thresholds: dict) -> np.ndarray:
    """``max_k score_k / threshold_k``: above 1 when any component exceeds its own threshold."""
    return np.max(np.stack([np.asarray(scores[k], dtype=np.float64) / float(thresholds[k]) for k in thresholds],
                           axis=1), axis=1)


def calibrate_thresholds(val_scores: dict, false_alarm: float = 0.03, extra: dict | None = None
                         ) -> tuple[float, dict]:
    """One quantile ``q`` for all components: the lowest (most sensitive) whose thresholds flag, by any
    component, at most ``false_alarm`` of the VALIDATION images, counted conservatively as
    ``(flagged + 1) / (n + 1)`` (the split-conformal bound). ``extra``: more in-distribution scores per component
    (out-of-fold training scores of the input components) pooled with the validation scores to set that
    component's threshold at ``q``. A component with validation scores alone (the features: a Mahalanobis distance
    whose training scores are in-sample) is set at ``1 - (1 - q) / K`` for K components, because a threshold read
    off a few dozen validation images near their maximum is optimistic. Returns ``(q, {component: threshold})``."""
    if not 0 < false_alarm < 1:
        raise ConfigError(f"OOD false_alarm must be in (0, 1), got {false_alarm}")
    names = list(val_scores)
    if not names or any(np.asarray(val_scores[k]).size == 0 for k in names):
        raise DataError("calibrate_thresholds: no validation scores")
    s = np.stack([np.asarray(val_scores[k], dtype=np.float64).reshape(-1) for k in names], axis=1)
    pooled = [len((extra or {}).get(k, [])) > 0 for k in names]
    pools = [np.concatenate([s[:, j], np.asarray((extra or {}).get(k, []), dtype=np.float64).reshape(-1)])
             for j, k in enumerate(names)]
    if not all(np.isfinite(p).all() for p in pools):
        raise DataError("calibrate_thresholds: validation scores contain NaN or infinite values")
    n, k_comp = len(s), len(names)
    for q in np.arange(1 - false_alarm, 1.0, 0.0005).tolist() + [1.0]:
        t = np.maximum([np.quantile(p, q if pool else 1 - (1 - q) / k_comp) for p, pool in zip(pools, pooled)],
                       1e-12)
        if ((s > t).any(axis=1).sum() + 1) / (n + 1) <= false_alarm or q == 1.0:
            return float(q), {k: float(v) for k, v in zip(names, t)}
    raise AssertionError("unreachable")


def _input_states(stats, pixels, comps: list, grid) -> dict:
    st: dict = {}
    if "intensity" in comps:
        st["stat_mean"], st["stat_precision"] = gaussian_state(stats)
    if "pixels" in comps:
        st.update(ppca_state(pixels))
        st["pix_grid"] = list(grid)
    return st


def _input_component_scores(stats, pixels, st: dict) -> dict:
    out = {}
    if "stat_mean" in st:
        out["intensity"] = gaussian_score(stats, st["stat_mean"], st["stat_precision"])
    if "pix_mean" in st:
        out["pixels"] = ppca_score(pixels, st)
    return out


def out_of_fold_scores(stats, pixels, comps: list, grid, folds: int = 5) -> dict:
    """Input-component scores of every TRAINING image from states fitted on the other folds (unbiased
    in-distribution scores; the feature component has none: the network was fitted on all of train)."""
    n = len(stats if stats is not None else pixels)
    out: dict = {}
    if n < 4 * folds:
        return out
    for f in range(folds):
        held = np.arange(n) % folds == f
        sub = _input_states(None if stats is None else stats[~held], None if pixels is None else pixels[~held],
                            comps, grid)
        sc = _input_component_scores(None if stats is None else stats[held],
                                     None if pixels is None else pixels[held], sub)
        for k, v in sc.items():
            out.setdefault(k, np.zeros(n))[held] = v
    return out


def fit_combined_detector(train_features, train_labels, train_inputs, val_features, val_inputs, *,
                          false_alarm: float = 0.03, components=COMPONENTS, layer: str | None = None,
                          shrinkage: float = 1e-3) -> dict:
    """The combined detector from arrays: components fitted on TRAIN, thresholds calibrated on VAL.

    ``*_features``: penultimate features (N, D) (may be ``None`` without the ``features`` component);
    ``*_inputs``: model inputs (N, C, *S), uint8 or float in [0, 1]; ``train_labels`` as for
    :func:`mahalanobis_state`."""
    comps = list(components)
    if not comps or any(c not in COMPONENTS for c in comps) or len(set(comps)) != len(comps):
        raise ConfigError(f"OOD components must be distinct names from {', '.join(COMPONENTS)}, got {comps}")
    det: dict = {"format": FORMAT_COMBINED, "score": "combined", "components": comps,
                 "false_alarm": float(false_alarm), "layer": layer}
    if "features" in comps:
        det.update(mahalanobis_state(train_features, train_labels, shrinkage=shrinkage))
    oof: dict = {}
    if "intensity" in comps or "pixels" in comps:
        tx = _input_array(train_inputs)
        det["input_shape"] = [int(v) for v in tx.shape[1:]]
        grid = pixel_grid(tx.shape[2:])
        stats = input_statistics(tx) if "intensity" in comps else None
        pixels = downsample(tx, grid) if "pixels" in comps else None
        del tx
        det.update(_input_states(stats, pixels, comps, grid))
        oof = out_of_fold_scores(stats, pixels, comps, grid)
    q, thr = calibrate_thresholds(component_scores(val_features, val_inputs, det), false_alarm, extra=oof)
    det.update({"quantile": q, "thresholds": thr, "threshold": 1.0})
    return det


# --------------------------------------------------------------------------------------------- one entry point
def score_from_outputs(logits, features, detector: dict, x=None) -> np.ndarray:
    """The detector's score from outputs already computed (e.g. by ONNX Runtime with a features output) and
    ``x``, the preprocessed model input batch (N, C, *S). ``logits`` are not used by the combined detector."""
    return combined_score(component_scores(features, x, detector), detector["thresholds"])


def ood_flags(scores, threshold: float) -> np.ndarray:
    """Boolean array: ``score > threshold``."""
    if threshold is None or not math.isfinite(float(threshold)):
        raise ConfigError(f"OOD threshold must be a finite number, got {threshold!r}")
    return np.asarray(scores, dtype=np.float64) > float(threshold)


def fit_ood_detector(model: nn.Module, train_images, train_labels, val_images, *, false_alarm: float = 0.03,
                     task: str | None = None, batch_size: int = EVAL_BATCH_SIZE,
                     device: str | torch.device | None = None, train_tab=None, val_tab=None,
                     tta_flip=()) -> dict:
    """Everything a predictor needs: the combined detector's components (fitted on TRAIN) and their thresholds
    (the quantile that flags at most ``false_alarm`` of VAL). ``*_tab`` (encoded clinical rows) and ``tta_flip``
    make the features those the model serves with. Use with :func:`detect`. Save with :func:`save_ood`
    (``ood.npz``) or :func:`detector_to_json`."""
    layer, _ = last_linear(model)
    _, ftr = logits_and_features(model, train_images, batch_size=batch_size, device=device, layer=layer,
                                 tab=train_tab, tta_flip=tta_flip)
    _, fva = logits_and_features(model, val_images, batch_size=batch_size, device=device, layer=layer,
                                 tab=val_tab, tta_flip=tta_flip)
    det = fit_combined_detector(ftr.numpy(), train_labels, train_images, fva.numpy(), val_images,
                                false_alarm=false_alarm, layer=layer)
    det["task"] = task
    return det


def detect(model: nn.Module, images, detector: dict, *, batch_size: int = EVAL_BATCH_SIZE,
           device: str | torch.device | None = None) -> dict:
    """``{"ood_score": (N,), "ood_flag": (N,) bool, "logits": (N, K) tensor, "components": {name: (N,) score}}``
    from one forward pass."""
    logits, feats = logits_and_features(model, images, batch_size=batch_size, device=device,
                                        layer=detector.get("layer"))
    comps = component_scores(feats.numpy(), images, detector)
    s = combined_score(comps, detector["thresholds"])
    return {"ood_score": s, "ood_flag": ood_flags(s, detector["threshold"]), "logits": logits, "components": comps}


# --------------------------------------------------------------------------------------------- persistence
_ARRAYS = ("means", "precision", "classes", "stat_mean", "stat_precision", "pix_mean", "pix_components", "pix_var")


def detector_to_json(det: dict) -> dict:
    """A ``bundle.json``-compatible copy (numpy arrays -> nested lists)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in det.items()}


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_detector(det: dict) -> str | None:
    """What is wrong with a detector read from a file (None: nothing)."""
    if not _finite_number(det.get("threshold")):
        return f"threshold must be a finite number, got {det.get('threshold')!r}"
    comps = det.get("components")
    if not isinstance(comps, list) or not comps or any(c not in COMPONENTS for c in comps):
        return f"components must be a non-empty list of {', '.join(COMPONENTS)}, got {comps!r}"
    if "features" in comps:
        m, p, c = det.get("means"), det.get("precision"), det.get("classes")
        if m is None or p is None or c is None:
            return "the features component needs 'means', 'precision' and 'classes'"
        if m.ndim != 2 or p.shape != (m.shape[1], m.shape[1]) or c.shape != (m.shape[0],):
            return f"means {m.shape}, precision {p.shape} and classes {c.shape} do not fit together"
    thr = det.get("thresholds")
    if not isinstance(thr, dict) or sorted(thr) != sorted(comps) or \
            not all(_finite_number(v) and v > 0 for v in thr.values()):
        return f"thresholds must give a positive number for each of {comps}, got {thr!r}"
    if "intensity" in comps or "pixels" in comps:
        shape = det.get("input_shape")
        if not isinstance(shape, list) or len(shape) not in (3, 4) or \
                not all(isinstance(v, int) and v > 0 for v in shape):
            return f"input_shape must be [C, H, W] or [C, D, H, W], got {shape!r}"
        dims = len(shape) - 1
        if "intensity" in comps:
            f = n_input_statistics(dims)
            mu, pr = det.get("stat_mean"), det.get("stat_precision")
            if mu is None or pr is None or mu.shape != (f,) or pr.shape != (f, f):
                return f"the intensity component needs stat_mean ({f},) and stat_precision ({f}, {f})"
        if "pixels" in comps:
            grid = det.get("pix_grid")
            if grid != pixel_grid(shape[1:]):
                return f"pix_grid {grid!r} does not match input_shape {shape}"
            p = int(np.prod(grid))
            mu, comp, var = det.get("pix_mean"), det.get("pix_components"), det.get("pix_var")
            if mu is None or comp is None or var is None or mu.shape != (p,) or comp.ndim != 2 or \
                    comp.shape[1] != p or var.shape != (comp.shape[0],) or not (var > 0).all():
                return f"the pixels component needs pix_mean ({p},), pix_components (k, {p}) and positive pix_var (k,)"
            if not _finite_number(det.get("pix_noise")) or det["pix_noise"] <= 0:
                return f"pix_noise must be a positive number, got {det.get('pix_noise')!r}"
    return None


def detector_from_json(obj: dict, *, source: object = "detector") -> dict:
    """A detector from :func:`detector_to_json` output (or a file's contents), checked: a malformed one raises
    one :class:`DataError` line naming ``source``."""
    if isinstance(obj, dict) and obj.get("format") == RETIRED_FORMAT:
        raise DataError(f"OOD detector {source} is a single-score detector ({RETIRED_FORMAT}, {obj.get('score')!r}) "
                        "of an earlier medsight, no longer scored; retrain the bundle for the combined detector")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_COMBINED:
        raise DataError(f"not an OOD detector: expected format {FORMAT_COMBINED!r}")
    if obj.get("score") not in SCORES:
        raise DataError(choices_message("OOD score in detector", obj.get("score"), SCORES))
    det = dict(obj)
    try:
        for k in _ARRAYS:
            if k in det:
                det[k] = np.asarray(det[k], dtype=np.int64 if k == "classes" else np.float64)
                if not np.isfinite(det[k]).all():
                    raise ValueError(f"{k} contains NaN or infinite values")
    except (ValueError, TypeError) as e:
        raise DataError(f"OOD detector {source} is malformed: {str(e).splitlines()[0]}") from e
    problem = _check_detector(det)
    if problem:
        raise DataError(f"OOD detector {source} is malformed: {problem}")
    return det


def save_ood(path: str | Path, det: dict) -> Path:
    """Write a detector as ``.npz`` (arrays as arrays, the rest as a JSON string; no pickles)."""
    import io
    import json

    from medsight.utils import atomic_write_bytes

    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in det.items() if k in _ARRAYS}
    rest = {k: v for k, v in det.items() if k not in _ARRAYS}
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(rest)), **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_ood(path: str | Path) -> dict:
    """Read ``ood.npz`` (``allow_pickle=False``); a missing, unreadable or malformed file raises one
    :class:`DataError` line."""
    import json
    import zipfile

    p = Path(path)
    if not p.is_file():
        raise DataError(f"OOD detector {p} not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            det = json.loads(str(z["meta"]))
            if not isinstance(det, dict):
                raise ValueError("its meta entry is not a JSON object")
            det.update({k: z[k] for k in _ARRAYS if k in z.files})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"cannot read OOD detector {p}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return detector_from_json(detector_to_json(det), source=p)


def fit_bundle_detector(bundle, data) -> dict:
    """The detector for a bundle being built (the default, combined one): fitted on the TRAINING split, thresholds
    on the VALIDATION split, features through the bundle's own inference (TTA and clinical input included) and
    input statistics of the stored images, so the scores match what :class:`medsight.predict.Predictor` computes
    on either backend."""
    from medsight.fusion import split_clinical_rows

    tr, va = data.split("train"), data.split("val")
    return fit_ood_detector(bundle.model, tr.images, None if bundle.task.kind.indicator_labels else tr.labels,
                            va.images, task=bundle.task.name, tta_flip=bundle.tta_flip,
                            train_tab=split_clinical_rows(bundle, data, "train"),
                            val_tab=split_clinical_rows(bundle, data, "val"))
