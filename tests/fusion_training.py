"""Fusion training helpers for tests, demos and scripts/beyond_results.py (not part of the product: the pipeline
trains fusion models through ``medsight.pipeline.run_training`` with ``model.fusion`` set).

``fit_fusion`` trains a :class:`medsight.fusion.FusionClassifier` on in-memory arrays with
:func:`medsight.train.fit` itself; ``fusion_logits`` runs it over stored images + encoded rows;
``synthetic_xor`` is a task whose label needs both modalities.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from medsight.config import EVAL_BATCH_SIZE
from medsight.errors import ConfigError, DataError
from medsight.fusion import FusionClassifier, TabularEncoder


def fit_tabular(data, *, numeric: Sequence[str] = (), categorical: Sequence[str] = ()) -> dict:
    """Fit a :class:`TabularEncoder` on the training rows and return its JSON-able spec."""
    return TabularEncoder.fit(data, numeric=numeric, categorical=categorical).to_dict()



@torch.inference_mode()
def fusion_logits(model: FusionClassifier, images, tab, *, batch_size: int = EVAL_BATCH_SIZE,
                  device: str | torch.device | None = None) -> torch.Tensor:
    """Logits for stored images (uint8 or float in [0, 1]) + encoded tabular rows; float32 on the CPU."""
    from medsight.inference import run_logits

    if images is None and model.mode != "tabular":
        raise DataError(f"fusion mode {model.mode!r} needs images")
    if tab is None and model.mode != "image":
        raise DataError(f"fusion mode {model.mode!r} needs the encoded tabular rows")
    if images is None:  # tabular only: a placeholder the model ignores
        images = np.zeros((len(tab), 1, 1, 1), np.uint8)
    if tab is None:
        tab = np.zeros((len(images), 0), np.float32)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    return run_logits(model, images, device=dev, batch_size=batch_size, tab=tab)


def _check_split(name, images, tab, labels, model) -> int:
    n = len(labels)
    if images is not None and model.mode != "tabular" and len(images) != n:
        raise DataError(f"{name}: {len(images)} images but {n} labels")
    if model.mode != "image":
        if tab is None or len(tab) != n:
            raise DataError(f"{name}: {0 if tab is None else len(tab)} tabular rows but {n} labels")
        if np.asarray(tab).ndim != 2 or np.asarray(tab).shape[1] != model.n_tab:
            raise DataError(f"{name}: tabular array must be (N, {model.n_tab}), got {np.asarray(tab).shape}")
    if n == 0:
        raise DataError(f"{name}: no samples")
    return n


def fit_fusion(model: FusionClassifier, task, train: tuple, val: tuple, *, cfg=None,
               device: str | torch.device | None = None, callback=None):
    """Train ``model`` on ``train = (images, tab, labels)``; pick the epoch by ``cfg.train.monitor`` on ``val``.

    The training loop is :func:`medsight.train.fit` itself (the tabular rows go in as the model's second input),
    so optimiser, schedule, augmentation, class weights, EMA and epoch selection behave exactly as for images.
    ``images``: stored (N, C, *S) uint8 or float in [0, 1] (may be None for ``mode='tabular'``); ``tab``: the
    encoded (N, n_tab) array (ignored by ``mode='image'``); ``labels`` as in :class:`medsight.data.sources.Split`.
    ``task``: a :class:`medsight.tasks.Task`; ``cfg``: a :class:`medsight.config.RunConfig` (default ``RunConfig()``)."""
    from medsight.config import RunConfig
    from medsight.data.dataset import Dataset, Split
    from medsight.tasks import Task
    from medsight.train import fit

    if not isinstance(task, Task):
        raise ConfigError(f"fit_fusion needs a medsight.tasks.Task, got {type(task).__name__}")
    if task.num_outputs != model.num_outputs:
        raise ConfigError(f"task {task.name} needs {task.num_outputs} outputs, the model has {model.num_outputs}")
    cfg = (cfg or RunConfig()).model_copy(deep=True)
    if device is not None:
        cfg.train.device = str(device)
    splits, tabs = {}, {}
    for name, (images, tab, labels) in (("train", train), ("val", val)):
        n = _check_split(name, images, tab, labels, model)
        if images is None:  # tabular only: a placeholder the model ignores
            images = np.zeros((n, 1, 1, 1), np.uint8)
        splits[name] = Split(images=np.asarray(images), labels=np.asarray(labels))
        tabs[name] = np.zeros((n, 0), np.float32) if tab is None else np.asarray(tab, dtype=np.float32)
    data = Dataset(name="fusion", task=task.name, classes=[str(i) for i in range(task.num_classes)],
                   spatial_dims=splits["train"].images.ndim - 2, splits=splits)
    return fit(cfg, data, model=model, tab=tabs, callback=callback)  # a medsight.train.FitResult


def synthetic_xor(n: int, seed: int, side: int = 16):
    """A synthetic image + clinical task for tests and demos: label = (bright blob in the image) XOR (age > 60),
    with 5 % label noise; sex and bmi are irrelevant and 5 % of ages are missing. Either modality alone carries no
    information about the label. Returns (uint8 images (n, 1, side, side), clinical rows, labels)."""
    rng = np.random.default_rng(seed)
    img = rng.normal(0.35, 0.08, size=(n, 1, side, side))
    blob = rng.random(n) < 0.5
    yy, xx = np.mgrid[:side, :side]
    for i in np.where(blob)[0]:
        cy, cx = rng.integers(4, side - 4, 2)
        img[i, 0] += 0.45 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5 ** 2))
    img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    age = rng.uniform(30, 90, n)
    y = (blob ^ (age > 60)).astype(np.int64)
    flip = rng.random(n) < 0.05
    y[flip] = 1 - y[flip]
    rows = [{"age": None if rng.random() < 0.05 else round(float(a), 1), "sex": str(rng.choice(["F", "M"])),
             "bmi": float(rng.normal(25, 4))} for a in age]
    return img, rows, y
