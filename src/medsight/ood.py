"""Out-of-distribution (OOD) scores per prediction: is this image like the ones the model was trained on?

Every score is oriented the same way: **higher = more out-of-distribution**.

- ``"mahalanobis"`` (default): Mahalanobis distance of the penultimate features (the input of the model's last
  ``nn.Linear``) to the nearest class mean, with class-conditional means and one shared (tied) covariance fitted
  on the *training* split (Lee et al. 2018). It separates foreign image types well, e.g. breast ultrasound
  shown to a chest X-ray model (AUROC 0.99+ in ``tests/test_ood.py``).
- ``"energy"``: ``-T * logsumexp(logits / T)`` (Liu et al. 2020); a binary single-logit model is scored as
  the two-class logits ``[0, z]`` (multilabel / ordinal: summed per output).
- ``"msp"``: ``1 - max softmax probability`` (Hendrycks & Gimpel 2017).

The flag threshold is fitted on the *validation* split: ``fit_ood_threshold(val_scores, 0.95)`` flags a
prediction whose score is above the 95th percentile of in-distribution validation scores (about 5 % false
alarms on in-distribution data by construction).

A fitted detector (:func:`fit_ood_detector`) is a dict of numpy arrays and scalars; :func:`save_ood` /
:func:`load_ood` store it as ``ood.npz`` in a bundle, and :func:`detector_to_json` / :func:`detector_from_json`
convert it to / from a ``bundle.json``-compatible dict of lists.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medsight.errors import ConfigError, DataError, choices_message
from medsight.inference import last_linear, run_model

SCORES = ("mahalanobis", "energy", "msp")
FORMAT = "medsight-ood/1"


# --------------------------------------------------------------------------------------------- logit scores
def _logits_2d(logits) -> torch.Tensor:
    z = torch.as_tensor(logits, dtype=torch.float32)
    if z.dim() == 1:
        z = z[:, None]
    if z.dim() != 2:
        raise DataError(f"logits must have shape (N,) or (N, K), got {tuple(z.shape)}")
    return z


def _per_output(task: str | None, z: torch.Tensor) -> bool:
    """True when each output is its own two-class problem (binary, multilabel, ordinal)."""
    if task is None:
        return z.shape[1] == 1
    if task not in ("binary", "multiclass", "multilabel", "ordinal"):
        raise ConfigError(choices_message("task", task, ("binary", "multiclass", "multilabel", "ordinal")))
    return task != "multiclass"


def energy_score(logits, temperature: float = 1.0, task: str | None = None) -> np.ndarray:
    """``-T * logsumexp(logits / T)`` per row (higher = more OOD). Single-logit / per-output tasks use ``[0, z]``.

    ``task=None`` treats one column as binary and several as multiclass."""
    if temperature <= 0:
        raise ConfigError(f"energy temperature must be > 0, got {temperature}")
    z = _logits_2d(logits) / temperature
    if _per_output(task, z):
        pair = torch.stack([torch.zeros_like(z), z], dim=-1)  # (N, K, 2)
        e = -temperature * torch.logsumexp(pair, dim=-1).sum(dim=1)
    else:
        e = -temperature * torch.logsumexp(z, dim=1)
    return e.numpy()


def msp_score(logits, task: str | None = None) -> np.ndarray:
    """``1 - max softmax probability`` per row (higher = more OOD); per-output tasks use the mean over outputs
    of ``1 - max(sigmoid(z), 1 - sigmoid(z))``."""
    z = _logits_2d(logits)
    if _per_output(task, z):
        p = torch.sigmoid(z)
        return (1 - torch.maximum(p, 1 - p)).mean(dim=1).numpy()
    return (1 - torch.softmax(z, dim=1).max(dim=1).values).numpy()


# --------------------------------------------------------------------------------------------- features
@torch.inference_mode()
def logits_and_features(model: nn.Module, images, *, batch_size: int = 256,
                        device: str | torch.device | None = None, layer: str | None = None, tab=None,
                        tta_flip=()) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over stored images (uint8 or float in [0, 1]) through :func:`medsight.inference.run_model`:
    (logits (N, K), penultimate features (N, D)), float32 on the CPU. Features are the input of ``layer``
    (default: the last ``nn.Linear``)."""
    out = run_model(model, images, batch_size=batch_size, device=device, layer=layer, features=True, tab=tab,
                    tta_flip=tta_flip)
    if len(out.logits) == 0:
        raise DataError("no images to score")
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
def fit_mahalanobis(model: nn.Module, train_images, labels=None, *, batch_size: int = 256,
                    device: str | torch.device | None = None, shrinkage: float = 1e-3) -> dict:
    """Class-conditional means and a shared covariance of the penultimate features of the TRAINING split.

    ``labels``: (N,) class indices; ``None`` or multilabel (N, K) labels fit one class-agnostic mean.
    Returns ``{"layer", "means" (K, D), "precision" (D, D), "classes" (K,)}`` (numpy arrays). The covariance is
    shrunk towards ``shrinkage * mean variance * I`` so it is invertible even with few samples."""
    layer, _ = last_linear(model)
    _, f = logits_and_features(model, train_images, batch_size=batch_size, device=device, layer=layer)
    return mahalanobis_state(f, labels, layer=layer, shrinkage=shrinkage)


def mahalanobis_state(features, labels=None, *, layer: str, shrinkage: float = 1e-3) -> dict:
    """Class means and tied precision of TRAINING features (see :func:`fit_mahalanobis`)."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    if labels is None or np.asarray(labels).ndim == 2 and np.asarray(labels).shape[1] > 1:
        y = np.zeros(n, dtype=np.int64)
    else:
        y = np.asarray(labels).reshape(-1).astype(np.int64)
    if len(y) != n:
        raise DataError(f"fit_mahalanobis: {n} images but {len(y)} labels")
    if n < 2:
        raise DataError(f"fit_mahalanobis needs at least 2 training images, got {n}")
    classes = np.unique(y)
    means = np.stack([f[y == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, y)]
    cov = centred.T @ centred / max(1, n - len(classes))
    cov += np.eye(d) * (shrinkage * max(float(np.trace(cov)) / d, 1e-12))
    precision = np.linalg.pinv(cov, hermitian=True)
    return {"layer": layer, "means": means.astype(np.float64), "precision": precision.astype(np.float64),
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


# --------------------------------------------------------------------------------------------- one entry point
def ood_scores(model: nn.Module, images, *, score: str = "mahalanobis", state: dict | None = None,
               temperature: float = 1.0, task: str | None = None, batch_size: int = 256,
               device: str | torch.device | None = None, return_logits: bool = False):
    """OOD score per image (higher = more OOD). ``score='mahalanobis'`` needs ``state`` from
    :func:`fit_mahalanobis` (or a detector from :func:`fit_ood_detector`). With ``return_logits=True`` returns
    ``(scores, logits)`` so a predictor gets both from one forward pass."""
    if score not in SCORES:
        raise ConfigError(choices_message("OOD score", score, SCORES))
    if score == "mahalanobis":
        if state is None or "means" not in state:
            raise ConfigError("score='mahalanobis' needs a fitted state: call fit_mahalanobis(model, train_images, "
                              "labels) or fit_ood_detector(...) first")
        logits, feats = logits_and_features(model, images, batch_size=batch_size, device=device,
                                            layer=state.get("layer"))
        s = mahalanobis_from_features(feats.numpy(), state)
    else:
        logits, _ = logits_and_features(model, images, batch_size=batch_size, device=device)
        s = energy_score(logits, temperature, task) if score == "energy" else msp_score(logits, task)
    return (s, logits) if return_logits else s


def score_from_outputs(logits, features, detector: dict) -> np.ndarray:
    """The detector's score from outputs already computed (e.g. by ONNX Runtime with a features output)."""
    if detector["score"] == "mahalanobis":
        return mahalanobis_from_features(features, detector)
    if detector["score"] == "energy":
        return energy_score(logits, detector.get("temperature", 1.0), detector.get("task"))
    return msp_score(logits, detector.get("task"))


def fit_ood_threshold(val_scores, quantile: float = 0.95) -> float:
    """The ``quantile`` of in-distribution VALIDATION scores: scores above it are flagged as OOD."""
    if not 0 < quantile < 1:
        raise ConfigError(f"OOD quantile must be in (0, 1), got {quantile}")
    s = np.asarray(val_scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise DataError("fit_ood_threshold: no validation scores")
    if not np.isfinite(s).all():
        raise DataError("fit_ood_threshold: validation scores contain NaN or infinite values")
    return float(np.quantile(s, quantile))


def ood_flags(scores, threshold: float) -> np.ndarray:
    """Boolean array: ``score > threshold``."""
    if threshold is None or not math.isfinite(float(threshold)):
        raise ConfigError(f"OOD threshold must be a finite number, got {threshold!r}")
    return np.asarray(scores, dtype=np.float64) > float(threshold)


def fit_ood_detector(model: nn.Module, train_images, train_labels, val_images, *, score: str = "mahalanobis",
                     quantile: float = 0.95, temperature: float = 1.0, task: str | None = None,
                     batch_size: int = 256, device: str | torch.device | None = None) -> dict:
    """Everything a predictor needs: the score's state (Mahalanobis: fitted on TRAIN) and the flag threshold
    (fitted on VAL). Use with :func:`detect`. Save with :func:`save_ood` (``ood.npz``) or
    :func:`detector_to_json`."""
    if score not in SCORES:
        raise ConfigError(choices_message("OOD score", score, SCORES))
    det: dict = {"format": FORMAT, "score": score, "quantile": float(quantile), "temperature": float(temperature),
                 "task": task}
    if score == "mahalanobis":
        det.update(fit_mahalanobis(model, train_images, train_labels, batch_size=batch_size, device=device))
    val = ood_scores(model, val_images, score=score, state=det, temperature=temperature, task=task,
                     batch_size=batch_size, device=device)
    det["threshold"] = fit_ood_threshold(val, quantile)
    return det


def detect(model: nn.Module, images, detector: dict, *, batch_size: int = 256,
           device: str | torch.device | None = None) -> dict:
    """``{"ood_score": (N,), "ood_flag": (N,) bool, "logits": (N, K) tensor}`` from one forward pass."""
    s, logits = ood_scores(model, images, score=detector["score"], state=detector,
                           temperature=detector.get("temperature", 1.0), task=detector.get("task"),
                           batch_size=batch_size, device=device, return_logits=True)
    return {"ood_score": s, "ood_flag": ood_flags(s, detector["threshold"]), "logits": logits}


# --------------------------------------------------------------------------------------------- persistence
_ARRAYS = ("means", "precision", "classes")


def detector_to_json(det: dict) -> dict:
    """A ``bundle.json``-compatible copy (numpy arrays -> nested lists)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in det.items()}


def detector_from_json(obj: dict) -> dict:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise DataError(f"not an OOD detector: expected format {FORMAT!r}")
    if obj.get("score") not in SCORES:
        raise DataError(choices_message("OOD score in detector", obj.get("score"), SCORES))
    det = dict(obj)
    for k in _ARRAYS:
        if k in det:
            det[k] = np.asarray(det[k], dtype=np.int64 if k == "classes" else np.float64)
    return det


def save_ood(path: str | Path, det: dict) -> Path:
    """Write a detector as ``.npz`` (arrays as arrays, the rest as a JSON string)."""
    import io
    import json

    from medsight.utils import atomic_write_bytes

    arrays = {k: np.asarray(v) for k, v in det.items() if k in _ARRAYS}
    rest = {k: v for k, v in det.items() if k not in _ARRAYS}
    buf = io.BytesIO()
    np.savez(buf, meta=np.array(json.dumps(rest)), **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_ood(path: str | Path) -> dict:
    import json
    import zipfile

    p = Path(path)
    if not p.is_file():
        raise DataError(f"OOD detector {p} not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            det = json.loads(str(z["meta"]))
            det.update({k: z[k] for k in _ARRAYS if k in z.files})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise DataError(f"cannot read OOD detector {p}: {type(e).__name__}: {e}") from e
    return detector_from_json(detector_to_json(det))


def fit_bundle_detector(bundle, data, *, quantile: float = 0.95) -> dict:
    """The detector for a bundle being built: Mahalanobis state on the TRAINING split's features, flag threshold
    on the VALIDATION split, both through the bundle's own inference (TTA and clinical input included), so the
    scores match what :class:`medsight.predict.Predictor` computes on either backend."""
    from medsight.fusion import split_clinical_rows as clinical_rows

    tr = data.split("train")
    labels = tr.labels if bundle.task.name != "multilabel" else None
    det: dict = {"format": FORMAT, "score": "mahalanobis", "quantile": float(quantile), "temperature": 1.0,
                 "task": bundle.task.name}
    det.update(mahalanobis_state(
        logits_and_features(bundle.model, tr.images, tab=clinical_rows(bundle, data, "train"),
                            tta_flip=bundle.tta_flip)[1], labels, layer=last_linear(bundle.model)[0]))
    _, fv = logits_and_features(bundle.model, data.split("val").images, tab=clinical_rows(bundle, data, "val"),
                                tta_flip=bundle.tta_flip)
    det["threshold"] = fit_ood_threshold(mahalanobis_from_features(fv.numpy(), det), quantile)
    return det
