"""Shared helpers for the benchmarks: a tiny trained bundle and real BreastMNIST test images as PNG bytes."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np


def train_tiny_bundle(model: str, out: Path, epochs: int = 1) -> Path:
    from medsight.config import load_config
    from medsight.pipeline import run_training

    cfg = load_config(None, {"data.name": "breastmnist", "model.name": model, "train.epochs": epochs})
    path, _, _ = run_training(cfg, out)
    return path


def bundle_or_train(bundle: str | None, model: str, epochs: int = 1) -> Path:
    if bundle:
        return Path(bundle)
    return train_tiny_bundle(model, Path(tempfile.mkdtemp(prefix=f"medsight-bench-{model}-")) / "bundle", epochs)


def breast_pngs(n: int = 32, size: int = 28) -> list[bytes]:
    from PIL import Image

    from medsight.data.sources import load_dataset

    images = np.asarray(load_dataset("breastmnist", size=size).split("test").images[:n])
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.reshape(img.shape[-2:]).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))
