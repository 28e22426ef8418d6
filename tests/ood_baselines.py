"""OOD baselines the benchmarks and tests compare the product's combined detector with (not part of the product;
``medsight.ood`` keeps the combined detector only).

- ``energy_score``: ``-T * logsumexp(logits / T)`` (Liu et al. 2020); a binary single-logit model is scored as
  the two-class logits ``[0, z]`` (multilabel / ordinal: summed per output);
- ``msp_score``: ``1 - max softmax probability`` (Hendrycks & Gimpel 2017);
- ``fit_mahalanobis`` / ``mahalanobis_detector``: the features component alone (Lee et al. 2018), its threshold
  at a quantile of validation scores (``fit_ood_threshold``): the single-score detector of earlier versions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medsight.errors import ConfigError, DataError, choices_message
from medsight.inference import last_linear
from medsight.ood import logits_and_features, mahalanobis_from_features, mahalanobis_state, ood_flags



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



# --------------------------------------------------------------------------------------------- features only
def fit_mahalanobis(model: nn.Module, train_images, labels=None, *, shrinkage: float = 1e-3) -> dict:
    """:func:`medsight.ood.mahalanobis_state` of the penultimate features of the TRAINING split, plus the
    ``layer`` name. ``labels``: (N,) class indices; ``None`` or multilabel (N, K) labels fit one class-agnostic
    mean."""
    layer, _ = last_linear(model)
    _, f = logits_and_features(model, train_images, layer=layer)
    return {"layer": layer, **mahalanobis_state(f.numpy(), labels, shrinkage=shrinkage)}


def mahalanobis_scores(model: nn.Module, images, state: dict) -> np.ndarray:
    _, f = logits_and_features(model, images, layer=state["layer"])
    return mahalanobis_from_features(f.numpy(), state)


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


def mahalanobis_detector(model: nn.Module, train_images, train_labels, val_images, quantile: float = 0.95) -> dict:
    """Features-only Mahalanobis fitted on TRAIN, flag threshold at the ``quantile`` of VAL scores."""
    det = fit_mahalanobis(model, train_images, train_labels)
    det["threshold"] = fit_ood_threshold(mahalanobis_scores(model, val_images, det), quantile)
    return det


def mahalanobis_flags(model: nn.Module, images, det: dict) -> np.ndarray:
    return ood_flags(mahalanobis_scores(model, images, det), det["threshold"])
