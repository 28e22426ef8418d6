"""Shared fixtures. Real data comes from $MEDSIGHT_DATA_DIR (CI sets it to ../shared/data/medmnist).

Tests that need the real files FAIL, not skip, when the data is missing: CI must never go green without them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _medmnist_dir() -> Path:
    env = os.environ.get("MEDSIGHT_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "medmnist"


@pytest.fixture(scope="session")
def medmnist_dir() -> Path:
    d = _medmnist_dir()
    if not (d / "breastmnist.npz").is_file():
        pytest.fail(f"real MedMNIST data not found in {d}; set MEDSIGHT_DATA_DIR to the folder holding breastmnist.npz")
    return d


@pytest.fixture(autouse=True)
def _data_env(monkeypatch):
    """Point the product at the real data dir and never let a test reach the network."""
    monkeypatch.setenv("MEDSIGHT_DATA_DIR", str(_medmnist_dir()))


@pytest.fixture(scope="session")
def breast(medmnist_dir):
    from medsight.data.sources import load_medmnist

    return load_medmnist("breastmnist", 28, root=medmnist_dir, download_missing=False)


def make_npz(path: Path, n=(24, 8, 8), shape=(16, 16), classes=2, seed=0, **override) -> Path:
    """A small synthetic MedMNIST-layout archive."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        arrays[f"{split}_images"] = rng.integers(0, 255, size=(k, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, classes, size=(k, 1)).astype(np.uint8)
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    return make_npz(tmp_path / "tiny.npz")
