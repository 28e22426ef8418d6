"""The executor seam for file-parallel work (``predict``, ``qc``, ``deid`` over many files).

An executor runs one module-level function over batches of files and yields ``(batch index, result)`` in the
order the batches finish. Two backends:

* :class:`LocalExecutor` (the default): this process (``workers=0``) or a pool of forked processes on this
  machine, as the local commands have always run.
* :class:`DaskExecutor` (``--cluster tcp://scheduler:8786`` or ``--cluster local:N``): a Dask distributed
  cluster, from the optional extra ``medsight[cluster]``. Batches are submitted a few per worker ahead, so the
  workers never wait; results stream back by :func:`distributed.as_completed`. A worker lost mid-batch has its
  batch rescheduled on another worker by the scheduler; the caller dedupes rows by input (see
  :mod:`medsight.cluster`), so nothing is counted twice.

Work functions run on the workers and keep what is costly to build (a loaded bundle) in a per-process cache,
:func:`worker_cached`, keyed by what identifies it (bundle path and the sha256 of its ``bundle.json``): each
worker builds it once, whatever number of batches it runs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from medsight import errors
from medsight.errors import ConfigError, MedsightError

CLUSTER_EXTRA = "medsight[cluster]"
#: how long a run waits for the first worker of a scheduler that has none
WAIT_FOR_WORKERS_S = 60.0


def parse_cluster(spec: str) -> tuple[str, Any]:
    """``tcp://host:port`` -> ("tcp", address); ``local:N`` -> ("local", N). One-line error otherwise."""
    s = (spec or "").strip()
    if s.startswith(("tcp://", "tls://")) and len(s.split("://", 1)[1]) > 0:
        return "tcp", s
    if s.startswith("local:"):
        try:
            n = int(s.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return "local", n
    raise ConfigError(f"--cluster {spec!r}: expected tcp://HOST:PORT (a running `dask scheduler`) or local:N "
                      "(N worker processes on this machine)")


def import_distributed():
    """The ``distributed`` package, or a one-line error naming the extra to install."""
    try:
        return errors.optional_import("distributed", CLUSTER_EXTRA)
    except MedsightError as e:
        raise MedsightError(f"--cluster needs Dask distributed, which is not installed: "
                            f"pip install '{CLUSTER_EXTRA}'") from e


def batch_size_for(n_files: int, workers: int, largest: int, per_worker: int = 4) -> int:
    """Files per batch: at most ``largest``, and small enough that every worker gets ``per_worker`` batches."""
    if n_files <= 0:
        return 1
    return max(1, min(largest, math.ceil(n_files / max(1, workers * per_worker))))


def batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# --- worker-side cache ------------------------------------------------------------------------------------------
_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def worker_cached(key: tuple, build: Callable[[], Any]) -> Any:
    """``build()`` once per process for ``key``; later calls return the same object."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def bundle_fingerprint(bundle: str | Path) -> str:
    """sha256 of the bundle's ``bundle.json``, which records the sha256 of every artefact (checked on load): two
    bundles with the same fingerprint hold the same files."""
    p = Path(bundle) / "bundle.json"
    if not p.is_file():
        raise MedsightError(f"{Path(bundle)} is not a medsight bundle: bundle.json not found")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def cached_predictor(bundle: str, sha256: str, backend: str = "torch"):
    """The worker's Predictor for ``bundle``, loaded once; refuses a bundle whose files differ from the client's."""
    def build():
        from medsight.bundle import load_bundle
        from medsight.predict import Predictor, default_threads

        here = bundle_fingerprint(bundle)
        if here != sha256:
            raise MedsightError(f"the bundle at {bundle} on worker {_worker_name()} has bundle.json sha256 "
                                f"{here[:12]}, the client's has {sha256[:12]}: every worker must see the same bundle")
        b = load_bundle(bundle)
        return Predictor(b, backend=backend, threads=default_threads(b))

    return worker_cached(("predictor", str(bundle), sha256, backend), build)


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except Exception:  # noqa: BLE001 - not on a Dask worker
        return f"pid {os.getpid()}"


# --- backends ---------------------------------------------------------------------------------------------------
class LocalExecutor:
    """This process (``workers`` = 0) or ``workers`` forked processes on this machine."""

    name = "local"
    dashboard_link: str | None = None

    def __init__(self, workers: int = 0):
        self.workers = max(0, int(workers))

    @property
    def n_workers(self) -> int:
        return max(1, self.workers)

    def map(self, fn: Callable, batch_list: Sequence[list], *args,
            on_lost: Callable[[Any], Any] | None = None) -> Iterator[tuple[int, Any]]:
        """``(index, fn(batch, *args))`` per batch, in order of completion (``on_lost`` is for clusters)."""
        if self.workers == 0:
            for i, b in enumerate(batch_list):
                yield i, fn(b, *args)
            return
        import multiprocessing as mp

        with mp.get_context("fork").Pool(self.workers) as pool:
            yield from pool.imap_unordered(_call, [(fn, i, b, args) for i, b in enumerate(batch_list)])

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _call(job):
    fn, i, b, args = job
    return i, fn(b, *args)


class DaskExecutor:
    """A Dask distributed client: to a running scheduler (``tcp://...``) or to a LocalCluster it starts."""

    def __init__(self, spec: str | None = None, *, client=None, ahead: int = 2):
        self.spec = spec
        self.ahead = max(1, ahead)
        self._cluster = None
        self._own_client = client is None
        if client is not None:  # a client the caller made (and closes)
            self.client = client
            self.name = spec or str(client.scheduler.address)
            return
        kind, where = parse_cluster(spec or "")
        distributed = import_distributed()
        if kind == "local":
            self._cluster = distributed.LocalCluster(n_workers=where, threads_per_worker=1, processes=True,
                                                     host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                                     scheduler_port=0, silence_logs=logging.ERROR)
            self.client = distributed.Client(self._cluster)
        else:
            try:
                self.client = distributed.Client(where, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise MedsightError(f"--cluster {where}: cannot reach the Dask scheduler ({type(e).__name__}); "
                                    "start one with `dask scheduler` and workers with `dask worker "
                                    f"{where}`") from e
            try:
                self.client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
            except (OSError, TimeoutError) as e:
                self.client.close()
                raise MedsightError(f"--cluster {where}: no Dask worker joined the scheduler within "
                                    f"{WAIT_FOR_WORKERS_S:.0f} s; start some with `dask worker {where}`") from e
        self.name = str(spec)

    @property
    def n_workers(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    @property
    def dashboard_link(self) -> str | None:
        """The scheduler's dashboard, when one is running (it needs bokeh on the scheduler)."""
        try:
            if "dashboard" not in self.client.scheduler_info().get("services", {}):
                return None
            if not self.client.run_on_scheduler(_has_bokeh):  # the HTTP server runs; its pages need bokeh
                return None
            return self.client.dashboard_link
        except Exception:  # noqa: BLE001 - a link is a courtesy
            return None

    def map(self, fn: Callable, batch_list: Sequence[list], *args,
            on_lost: Callable[[Any], Any] | None = None) -> Iterator[tuple[int, Any]]:
        """Batches submitted ``ahead`` per worker at a time; ``(index, result)`` as each finishes. A batch whose
        worker dies is rescheduled by the scheduler (up to its ``allowed-failures``). A batch that kept killing
        its workers (``KilledWorker``) is set aside and, once the other batches are done, run again *alone* on the
        cluster (a batch that only shared a dying worker then succeeds); alone and still killing them, it is split
        in halves, and a single item that still kills them gets ``on_lost(item)`` as its result (without
        ``on_lost``: the run stops). Any other exception raised by ``fn`` stops the run (pending batches are
        cancelled) and is raised here."""
        from distributed import KilledWorker, as_completed

        todo = list(enumerate(batch_list))[::-1]
        suspects: list = []  # batches that died with their workers: run one at a time, after the rest
        limit = self.ahead * self.n_workers
        index: dict = {}
        ac = as_completed([])

        def submit(i, b, alone):
            f = self.client.submit(fn, b, *args, pure=False, key=f"medsight-{fn.__name__}-{i}-{os.urandom(4).hex()}")
            index[f.key] = (i, b, alone)
            ac.add(f)

        def fill():
            while todo and len(index) < limit:
                submit(*todo.pop(), False)
            if not todo and not index and suspects:
                submit(*suspects.pop(), True)

        fill()
        try:
            for fut in ac:
                i, b, alone = index.pop(fut.key)
                try:
                    result = fut.result()  # raises the batch's exception
                except MedsightError:
                    raise
                except KilledWorker as e:
                    fut.release()
                    if on_lost is None:
                        raise MedsightError(f"a batch of {len(b)} files kept stopping the Dask workers that ran it "
                                            f"({type(e).__name__}); rows already finished are kept: re-run the same "
                                            "command to continue") from e
                    if not alone:
                        suspects.append((i, b))
                    elif len(b) > 1:  # find the item: each half alone
                        suspects.extend([(i, b[len(b) // 2:]), (i, b[:len(b) // 2])])
                    else:
                        yield i, on_lost(b[0])
                    fill()
                    continue
                except Exception as e:
                    raise MedsightError(f"a batch of {len(b)} files failed on the cluster "
                                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                        "rows already finished are kept: re-run the same command to continue") from e
                fut.release()
                fill()
                yield i, result
        finally:
            pending = list(ac.futures) if hasattr(ac, "futures") else []
            if pending:
                self.client.cancel(pending)

    def close(self) -> None:
        if not self._own_client:
            return
        try:
            self.client.close()
        finally:
            if self._cluster is not None:
                self._cluster.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_executor(cluster: str | None, workers: int = 0):
    """``cluster`` None -> :class:`LocalExecutor` (``workers`` processes); else a :class:`DaskExecutor`."""
    if cluster is None:
        return LocalExecutor(workers)
    return DaskExecutor(cluster)
