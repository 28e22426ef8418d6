"""Shared helpers for the benchmarks: a tiny trained bundle, real BreastMNIST test images as PNG bytes, and the
service in its own process (the helper the tests use)."""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[1]
_SRC = str(_REPO / "src")
sys.path.insert(0, str(_REPO / "tests"))
from _subproc import free_port, serve_process as _serve_process  # noqa: E402, F401  (one helper for tests and benchmarks)


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


def serve_process(bundle: Path, port: int, *args: str, host: str = "127.0.0.1"):
    """`medsight serve BUNDLE` in its own process on ``host:port`` (127.0.0.1 only), started and ready, stopped on
    exit: the tests' helper (``tests/_subproc.serve_process``), run in this process's own environment (its thread
    settings are the benchmark's conditions) with medsight's ``src`` on the path."""
    import os

    env = {**os.environ, "PYTHONPATH": _SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return _serve_process(bundle, *args, port=port, host=host, environ=env)
