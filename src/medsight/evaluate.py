"""Evaluate a bundle on dataset splits: probabilities at the bundle's temperature, decisions at its threshold."""

from __future__ import annotations

import numpy as np
import torch

from medsight.bundle import Bundle
from medsight.data.sources import Dataset
from medsight.errors import MedsightError
from medsight.train import evaluate_logits


def check_compatible(bundle: Bundle, data: Dataset) -> None:
    inp = bundle.meta["input"]
    if data.in_channels != inp["channels"] or list(data.input_size) != list(inp["size"]):
        raise MedsightError(
            f"data {data.name} has images of {data.in_channels} channel(s) x {list(data.input_size)}, but the model in "
            f"{bundle.path} expects {inp['channels']} x {inp['size']}")
    if data.task != bundle.meta["task"] or len(data.classes) != len(bundle.classes):
        raise MedsightError(f"data {data.name} is a {data.task} task with {len(data.classes)} classes; the model in "
                            f"{bundle.path} is {bundle.meta['task']} with {len(bundle.classes)}")


def split_logits(bundle: Bundle, data: Dataset, split: str, *, device="cpu", batch_size: int = 512) -> torch.Tensor:
    s = data.split(split)
    return evaluate_logits(bundle.model.to(device), s.images, device=torch.device(device), batch_size=batch_size,
                           tta_flip=bundle.meta.get("tta_flip") or ())


def evaluate_split(bundle: Bundle, data: Dataset, split: str, *, device="cpu", n_boot: int = 0,
                   seed: int = 0) -> dict:
    from medsight import metrics

    check_compatible(bundle, data)
    logits = split_logits(bundle, data, split, device=device)
    probs = bundle.task.probabilities(logits, bundle.temperature).numpy()
    y = data.split(split).labels
    if n_boot and hasattr(metrics, "evaluate_predictions"):
        return metrics.evaluate_predictions(bundle.task.name, y, probs, threshold=bundle.threshold,
                                            n_boot=n_boot, seed=seed)
    return {k: {"value": v} for k, v in metrics.compute_metrics(bundle.task.name, y, probs,
                                                                 threshold=bundle.threshold).items()}


def scalar_metrics(result: dict) -> dict[str, float]:
    return {k: v["value"] for k, v in result.items() if isinstance(v, dict) and isinstance(v.get("value"), (int, float, np.floating))}
