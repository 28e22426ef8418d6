"""Helpers for tests that start `python -m medsight` in a subprocess."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    e.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra})
    e.pop("WORLD_SIZE", None)
    e.pop("RANK", None)
    return e


def medsight_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "medsight", *args]
