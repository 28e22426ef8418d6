"""Shared, cached fixtures for the robustness / OOD tests: one quick PneumoniaMNIST model per test session.

Imported by test_shift.py and test_ood.py; ``functools.cache`` trains the model once per session (the module is
imported once). Real data: FAILS (via the ``medmnist_dir`` fixture) when the MedMNIST files are missing.
"""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def pneumonia(root: str):
    from medsight.data.sources import load_medmnist

    return load_medmnist("pneumoniamnist", 28, root=root, download_missing=False)


@functools.cache
def pneumonia_model(root: str):
    """simple_cnn, 3 epochs on the first 1600 PneumoniaMNIST training images (about 10 s on one CPU core)."""
    import dataclasses

    import torch

    from medsight.config import load_config
    from medsight.train import fit

    data = pneumonia(root)
    tr = data.splits["train"]
    small = dataclasses.replace(data, splits={**data.splits, "train": dataclasses.replace(
        tr, images=tr.images[:1600], labels=tr.labels[:1600], ids=None)})
    cfg = load_config(None, {"model.name": "simple_cnn", "train.epochs": 3, "train.batch_size": 64,
                             "train.seed": 0, "train.device": "cpu", "train.threads": 1})
    threads = torch.get_num_threads()
    try:
        return fit(cfg, small).model
    finally:
        torch.set_num_threads(threads)


def root_of(medmnist_dir: Path) -> str:
    if not (Path(medmnist_dir) / "pneumoniamnist.npz").is_file():
        import pytest

        pytest.fail(f"pneumoniamnist.npz not found in {medmnist_dir}; set MEDSIGHT_DATA_DIR")
    return str(medmnist_dir)
