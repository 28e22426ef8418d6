"""Shared helpers for the benchmarks: a tiny trained bundle and real BreastMNIST test images as PNG bytes."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def serve_process(bundle: Path, port: int, *args: str, host: str = "127.0.0.1"):
    """`medsight serve BUNDLE` in its own process on ``host:port`` (127.0.0.1 only), started and ready (/healthz
    answers 200), stopped on exit. The server's log goes to a temporary file (one line per request: never a pipe
    that can fill up). Raises RuntimeError with the log's tail when it does not start within 120 s."""
    import http.client
    import os
    import subprocess
    import sys
    import time

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("MEDSIGHT_API_KEY", None)
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-m", "medsight", "serve", str(bundle), "--host", host,
                               "--port", str(port), *args], env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 120
        while True:
            try:
                c = http.client.HTTPConnection(host, port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError("server did not start: " + log.read().decode()[-2000:])
            time.sleep(0.2)
        yield server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
