"""Helpers for tests that start `python -m medsight` in a subprocess."""

from __future__ import annotations

import contextlib
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


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_process(bundle, *args: str, port: int | None = None, host: str = "127.0.0.1", log_path=None,
                  environ: dict | None = None, timeout: float = 120):
    """`medsight serve BUNDLE *args` in its own process on ``host:port`` (a free port when None), yielded once
    /healthz answers 200 as ``(process, base_url)``, stopped on exit. Its log goes to ``log_path`` or a temporary
    file (one line per request: never a pipe that can fill up); ``process.log_path`` names it. ``environ``: the
    child's environment (default :func:`env`); MEDSIGHT_API_KEY is always removed. Raises RuntimeError with the
    log's tail when the server exits or does not answer within ``timeout`` seconds."""
    import http.client
    import subprocess
    import tempfile
    import time

    port = port or free_port(host)
    child = dict(environ if environ is not None else env())
    child.pop("MEDSIGHT_API_KEY", None)
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="medsight-serve-")) / "server.log"
    log_path = Path(log_path)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(medsight_cmd("serve", str(bundle), "--host", host, "--port", str(port), *args),
                                env=child, stdout=subprocess.DEVNULL, stderr=log)
        proc.log_path = log_path
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    c = http.client.HTTPConnection(host, port, timeout=2)
                    c.request("GET", "/healthz")
                    if c.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("server did not start: " + log_path.read_text(errors="replace")[-2000:])
                time.sleep(0.2)
            yield proc, f"http://{host}:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
