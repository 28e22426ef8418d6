"""The isolated decoder: compressed DICOM pixel data decoded in a worker process whose address space is capped,
so a decoder crash, hang or memory blow-up costs one file (:func:`decode_isolated`).

The worker runs this file as a script (``python .../isolated.py``): it needs numpy and pydicom (+ its pixel
plug-ins), not medsight itself, so no ``PYTHONPATH`` is passed to it. Workers are started once and reused
(at most :data:`MAX_WORKERS` at a time); a forked child starts its own.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # a worker: never import from the script's own folder (readers/), only installed packages
    sys.path.pop(0)

import atexit
import os
import threading
import warnings

import numpy as np


def _one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fail(name: object, reason: object):
    from medsight.data.readers.base import fail

    return fail(name, reason)


#: Address space a decoder worker may add to what it holds after start-up (RLIMIT_AS): a decoded array at the
#: default budget is at most 2**27 x 4 bytes, plus the decoder's own buffers and the pickled copy.
WORKER_MEMORY = 3 << 30
#: Seconds one isolated decode may take before its worker is killed.
DECODE_TIMEOUT_S = 120.0
#: Data set elements a pixel decoder needs (everything else stays in this process).
_PIXEL_MODULE = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                 "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames")
#: Decoder worker processes kept for reuse (at most this many decode at once).
MAX_WORKERS = 2
_idle_workers: list = []
_workers_lock = threading.Lock()
_workers_sem = threading.BoundedSemaphore(MAX_WORKERS)


def _vm_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 1 << 30


def _worker_main() -> None:  # pragma: no cover - runs in the worker process
    """Decoder worker: pixel decoders imported, address space capped, then length-prefixed pickled requests
    on stdin answered on stdout until stdin closes."""
    import pickle
    import resource
    import sys

    out, inp = sys.stdout.buffer, sys.stdin.buffer
    sys.stdout = sys.stderr  # nothing printed by a library can corrupt the replies
    import pydicom.pixels  # noqa: F401
    for mod in ("pylibjpeg", "openjpeg", "libjpeg", "rle"):
        try:
            __import__(mod)
        except ImportError:
            pass
    headroom = int(os.environ.get("MEDSIGHT_WORKER_MEMORY", WORKER_MEMORY))
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _vm_bytes() + headroom
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    except (ValueError, OSError):
        pass
    while True:
        hdr = inp.read(8)
        if len(hdr) < 8:
            return
        req = pickle.loads(inp.read(int.from_bytes(hdr, "little")))
        res = _worker_decode(*req)
        try:
            data = pickle.dumps(res, protocol=5)
        except MemoryError:
            data = pickle.dumps(("error", "MemoryError", "decoded image does not fit the worker's memory limit"))
        out.write(len(data).to_bytes(8, "little"))
        out.write(data)
        out.flush()


def _worker_decode(ts: str, elements: dict, pixel_data: bytes):
    """Rebuild a minimal data set and decode it. Returns ('ok', array) or ('error', type name, message):
    no exception object (e.g. pyo3's PanicException) has to cross the process boundary."""
    try:
        from pydicom import pixels as px
        from pydicom.dataset import Dataset, FileMetaDataset

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts  # type: ignore[assignment]  # pydicom converts str to UID
        for k, v in elements.items():
            setattr(ds, k, v)
        ds.add_new(0x7FE00010, "OB", pixel_data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ("ok", np.asarray(px.pixel_array(ds)))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - decoders raise anything, incl. pyo3 PanicException
        return ("error", type(e).__name__, _one_line(e))


class _WorkerGone(Exception):
    pass


class _Worker:
    """One decoder process (this file run as a script: nothing of the caller's ``__main__`` is re-run in it)."""

    def __init__(self):
        import subprocess
        import sys

        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.pid_owner = os.getpid()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)

    def call(self, req, timeout: float):
        import pickle
        import select
        import time

        data = pickle.dumps(req, protocol=5)
        try:
            self.proc.stdin.write(len(data).to_bytes(8, "little"))
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise _WorkerGone() from e
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()

        def read(n: int) -> bytes:
            buf = bytearray()
            while len(buf) < n:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise TimeoutError
                chunk = os.read(fd, min(n - len(buf), 1 << 24))
                if not chunk:
                    raise _WorkerGone()
                buf += chunk
            return bytes(buf)

        n = int.from_bytes(read(8), "little")
        return pickle.loads(read(n))

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except Exception:  # noqa: BLE001
            self.kill()


def _close_workers() -> None:
    with _workers_lock:
        mine = [w for w in _idle_workers if w.pid_owner == os.getpid()]
        _idle_workers.clear()
    for w in mine:
        w.close()


atexit.register(_close_workers)


def _forget_workers_after_fork() -> None:
    """A forked child (e.g. a DataLoader worker) starts its own decoder workers; the parent's pipes stay the parent's."""
    global _workers_lock, _workers_sem
    _workers_lock = threading.Lock()
    _workers_sem = threading.BoundedSemaphore(MAX_WORKERS)
    _idle_workers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers_after_fork)


def decode_isolated(ds, name: object = "image", *, timeout: float | None = None) -> np.ndarray:
    """Decode a DICOM data set's (compressed) pixel data in a worker process (started once, reused) whose
    address space is capped at start-up + :data:`WORKER_MEMORY`. A decoder exception, a memory error, a
    crash (segfault, abort) or a hang past ``timeout`` (default :data:`DECODE_TIMEOUT_S`) costs only this
    file: DataError naming it."""
    elements = {k: ds[k].value for k in _PIXEL_MODULE if k in ds}
    req = (str(ds.file_meta.TransferSyntaxUID), elements, bytes(ds.PixelData))
    limit = DECODE_TIMEOUT_S if timeout is None else float(timeout)
    with _workers_sem:
        with _workers_lock:
            worker = None
            while _idle_workers and worker is None:
                w = _idle_workers.pop()
                if w.pid_owner == os.getpid() and w.proc.poll() is None:
                    worker = w
        if worker is None:
            try:
                worker = _Worker()
            except OSError as e:
                raise _fail(name, f"cannot start the pixel decoder process ({e.strerror or e})") from e
        try:
            got = worker.call(req, limit)
        except TimeoutError:
            worker.kill()
            raise _fail(name, f"decoding pixel data took longer than {limit:g} s; the decoder was stopped") from None
        except (_WorkerGone, EOFError, OSError):
            worker.kill()
            code = worker.proc.returncode
            how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            raise _fail(name, f"the pixel decoder crashed on this file (worker process ended: {how})") from None
        with _workers_lock:
            _idle_workers.append(worker)
    if got[0] == "ok":
        return got[1]
    raise _fail(name, f"cannot decode DICOM pixel data ({got[1]}: {got[2]})")



if __name__ == "__main__":  # pragma: no cover - the worker process
    _worker_main()
