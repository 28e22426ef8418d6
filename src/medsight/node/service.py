"""The node: Storage SCP and poller in, worklist in the middle, bundles run, results out as DICOM.

    node = Node(load_config("node.yaml")).start()   # SCP, poller, worker, /metrics
    ...
    node.stop()

One node per work folder (an exclusive lock on ``workdir/node.lock``); at start-up every ``running`` job goes
back to ``queued`` (the previous process is gone: it held the lock) and files a crash left unrecorded are
taken in again. Log lines name jobs by number and series by a short hash, never by UIDs or patient data.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.server
import io
import logging
import os
import threading
import time
from dataclasses import dataclass

from medsight.errors import ConfigError, MedsightError
from medsight.node.config import NodeConfig, Route
from medsight.node.transport import (
    BadInstance,
    DicomWebClient,
    DimseClient,
    StorageSCP,
    TransportError,
    check_instance,
)
from medsight.node.worklist import QuotaExceeded, Worklist

log = logging.getLogger("medsight.node")

_ATTRS = ("Modality", "BodyPartExamined", "SeriesDescription", "SOPClassUID")


def short(uid: str) -> str:
    """A series' name in logs: a hash, not the UID."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


@dataclass
class _Loaded:
    route: Route
    predictor: object
    version: str


class Node:
    def __init__(self, cfg: NodeConfig, *, worker: bool = True):
        from medsight.predict import Predictor

        self.cfg = cfg
        self.worker = worker
        self._lock_fd = None
        self.loaded: dict[str, _Loaded] = {}
        for r in cfg.routes:
            p = Predictor(r.bundle)  # intra-op threads: torch's default (one job runs at a time)
            self.loaded[r.name] = _Loaded(r, p, p.version)
        self.wl: Worklist | None = None
        self.scp: StorageSCP | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._metrics_server = None
        self.metrics_port: int | None = None
        self.refused = 0
        self.received = 0
        self._stat_lock = threading.Lock()
        self.last_poll = 0.0
        self.sender = self._client(cfg.send)
        self.retriever = self._client(cfg.retrieve) if cfg.poll_interval_s is not None else None
        self.querier = self._client(cfg.poll_query) if cfg.poll_interval_s is not None else None

    def _client(self, kind: str):
        if kind == "dicomweb":
            return DicomWebClient(self.cfg.dicomweb) if self.cfg.dicomweb else None
        return DimseClient(self.cfg.dimse, self.cfg.ae_title) if self.cfg.dimse else None

    # --- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> Node:
        import highdicom  # noqa: F401 - imported now, not inside the first job's timing

        from medsight.utils import private_dir as _private_dir

        _private_dir(self.cfg.workdir)
        fd = os.open(self.cfg.workdir / "node.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another medsight node is running on {self.cfg.workdir}") from None
        self._lock_fd = fd
        self.wl = Worklist(self.cfg.db_path, self.cfg.store_dir, quota_bytes=self.cfg.store_quota_bytes,
                           lease_s=self.cfg.lease_s, max_attempts=self.cfg.max_attempts,
                           backoff_s=self.cfg.backoff_s, backoff_max_s=self.cfg.backoff_max_s)
        n = self.wl.reclaim(everything=True)
        if n:
            log.info("resumed %d job(s) that were running when the node stopped", n)
        self._recover_orphans()
        if self.cfg.port is not None:
            self.scp = StorageSCP(self.cfg.ae_title, self.cfg.host, self.cfg.port, self.cfg.allowed_calling_aets,
                                  self._on_scp_instance, max_instance_bytes=self.cfg.max_instance_bytes,
                                  on_refuse=self._refusal,
                                  ssl_context=self.cfg.listen_tls.server_context() if self.cfg.listen_tls else None,
                                  ).start()
            log.info("storage SCP %s listening on %s:%d", self.cfg.ae_title, self.cfg.host, self.scp.port)
        if self.cfg.metrics_port is not None:
            self._start_metrics()
        if self.worker:
            t = threading.Thread(target=self._loop, name="medsight-node-worker", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        if self.scp is not None:
            self.scp.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.wl is not None:
            self.wl.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def run_forever(self) -> None:
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()

    # --- receiving ------------------------------------------------------------------------------------------
    def _refusal(self, line: str) -> None:
        with self._stat_lock:
            self.refused += 1
        log.warning(line)

    def routes_for(self, ds) -> list[tuple[str, str]]:
        attrs = {k: getattr(ds, k, None) for k in _ATTRS}
        return [(name, ld.version) for name, ld in self.loaded.items() if ld.route.matches(attrs)]

    def ingest(self, data: bytes, ds=None) -> str:
        """Keep one instance (file bytes); 'new' / 'duplicate' / 'done' / 'unrouted'. Raises BadInstance or
        QuotaExceeded."""
        if ds is None:
            ds = check_instance(data, self.cfg.max_instance_bytes)
        routes = self.routes_for(ds)
        if not routes:
            return "unrouted"
        what = self.wl.receive(data, study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
                               sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), routes=routes)
        with self._stat_lock:
            self.received += 1
        return what

    def _on_scp_instance(self, data: bytes, ds) -> None:
        what = self.ingest(data, ds)
        if what == "unrouted":
            log.info("instance of series %s matches no route; not kept", short(str(ds.SeriesInstanceUID)))

    def _recover_orphans(self) -> None:
        for p in self.wl.orphan_files():
            try:
                if p.name.startswith("."):
                    raise BadInstance("partial write")
                data = p.read_bytes()
                p.unlink()
                self.ingest(data)
            except (BadInstance, QuotaExceeded, OSError):
                p.unlink(missing_ok=True)

    # --- polling --------------------------------------------------------------------------------------------
    def poll_once(self) -> int:
        """Query the PACS for series matching ``poll.filters``; retrieve the ones not seen before. Returns the
        number of series retrieved."""
        got = 0
        for row in self.querier.series_rows(self.cfg.poll_filters):
            study, series = row["study"], row["series"]
            if not self.wl.mark_seen(series):
                continue
            if not any(ld.route.may_match(row) for ld in self.loaded.values()):
                continue  # no route can take it (e.g. this node's own results): never retrieved
            try:
                if isinstance(self.retriever, DimseClient):
                    self.retriever.move_series(study, series, self.cfg.ae_title)
                else:
                    for data in self.retriever.retrieve_series(study, series):
                        try:
                            self.ingest(data)
                        except BadInstance as e:
                            self._refusal(f"refused retrieved instance of series {short(series)}: {e}")
                got += 1
            except (TransportError, QuotaExceeded) as e:
                self.wl.forget_seen(series)  # retried at the next poll
                log.warning("retrieval of series %s failed, retried at the next poll: %s", short(series), e)
                break
        return got

    # --- work -----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                did = self.step()
            except Exception as e:  # noqa: BLE001 - the worker never dies; one line per problem
                log.error("node worker: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                did = False
            if not did:
                self._stop.wait(0.2)

    def step(self) -> bool:
        """One round: poll when due, promote stable series, redo expired leases, run one job. True if a job ran."""
        if self.querier is not None and time.time() - self.last_poll >= self.cfg.poll_interval_s:
            self.last_poll = time.time()
            try:
                self.poll_once()
            except TransportError as e:
                log.warning("poll failed, retried in %.0f s: %s", self.cfg.poll_interval_s, e)
        self.wl.promote(self.cfg.stable_age_s)
        self.wl.reclaim()
        job = self.wl.claim()
        if job is None:
            return False
        self.process(job)
        self.wl.clean()
        return True

    def process(self, job) -> None:
        from medsight.node.results import build_sc, build_sr, strongest

        ld = self.loaded.get(job.route)
        if ld is None or ld.version != job.bundle_version:
            self.wl.failed(job.id, f"bundle version {job.bundle_version} of route {job.route} is no longer loaded")
            log.warning("job %d failed: its bundle version is no longer loaded", job.id)
            return
        t0 = time.perf_counter()
        try:
            findings = self._predict(ld, job)
        except MedsightError as e:
            self.wl.failed(job.id, str(e).splitlines()[0][:300])
            log.warning("job %d (series %s) failed: %s", job.id, short(job.series_uid), str(e).splitlines()[0][:300])
            return
        pos = ld.predictor.bundle.positive_class
        top = strongest(findings, pos)
        if top.prediction.heatmap is None:
            top.prediction = self._explained(ld, top)
        t1 = time.perf_counter()
        try:
            sr = build_sr(findings, bundle=ld.predictor.bundle, version=ld.version, route=job.route,
                          series_uid=job.series_uid)
            sc = build_sc(top, predictor=ld.predictor, version=ld.version, route=job.route, series_uid=job.series_uid)
        except Exception as e:  # noqa: BLE001 - a header highdicom will not take: this series cannot be answered
            self.wl.failed(job.id, f"cannot build the result DICOM: {type(e).__name__}: {str(e)[:200]}")
            log.warning("job %d failed: cannot build the result DICOM (%s)", job.id, type(e).__name__)
            return
        t2 = time.perf_counter()
        try:
            self.sender.store([sr, sc], job.study_uid)
        except TransportError as e:
            delay = self.wl.retry(job.id, str(e))
            log.warning("job %d: sending results failed (%s); %s", job.id, e,
                        "gave up" if delay is None else f"retry in {delay:.1f} s")
            return
        self.wl.sent(job.id, infer_s=t1 - t0, build_s=t2 - t1, send_s=time.perf_counter() - t2)
        log.info("job %d (series %s, route %s) sent", job.id, short(job.series_uid), job.route)

    def _predict(self, ld: _Loaded, job) -> list:
        import pydicom

        from medsight.errors import DataError
        from medsight.node.results import Finding

        inst = self.wl.instances(job.series_uid)
        if not inst:
            raise DataError("no instances held for this series")
        p = ld.predictor
        headers = {}
        for sop, _, path in inst:
            headers[sop] = pydicom.dcmread(path, stop_before_pixels=True)
        if int(p.bundle.meta.input.spatial_dims) == 3:
            folder = inst[0][2].parent
            return [Finding([headers[s] for s, _, _ in inst], p.predict_file(folder, explain=True))]
        findings, errors = [], []
        explain = len(inst) == 1  # one image: its heatmap now; else only the strongest one's, afterwards
        for sop, _, path in inst:
            try:
                findings.append(Finding([headers[sop]], p.predict_file(path, explain=explain)))
            except DataError as e:
                errors.append(str(e))
        if not findings:
            raise DataError(f"no usable instance in the series ({errors[0] if errors else 'none'})")
        return findings

    def _explained(self, ld: _Loaded, f):
        path = {s: pth for s, _, pth in self.wl.instances(f.sources[0].SeriesInstanceUID)}[
            str(f.sources[0].SOPInstanceUID)]
        return ld.predictor.predict_file(path, explain=True)

    # --- observability --------------------------------------------------------------------------------------
    def metrics_text(self) -> str:
        return metrics_text(self.wl, refused=self.refused, received=self.received)

    def _start_metrics(self) -> None:
        node = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = node.metrics_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self._metrics_server = http.server.ThreadingHTTPServer((self.cfg.metrics_host, self.cfg.metrics_port), H)
        self.metrics_port = self._metrics_server.server_address[1]
        t = threading.Thread(target=self._metrics_server.serve_forever, name="medsight-node-metrics", daemon=True)
        t.start()


def metrics_text(wl: Worklist, *, refused: int | None = None, received: int | None = None) -> str:
    """Prometheus text exposition of the worklist (and the process's counters when given)."""
    out = io.StringIO()
    out.write("# HELP medsight_node_jobs Jobs in the worklist by state.\n# TYPE medsight_node_jobs gauge\n")
    for state, n in wl.counts().items():
        out.write(f'medsight_node_jobs{{state="{state}"}} {n}\n')
    out.write("# HELP medsight_node_store_bytes Bytes of received files held.\n# TYPE medsight_node_store_bytes gauge\n")
    out.write(f"medsight_node_store_bytes {wl.store_bytes()}\n")
    tp = wl.throughput(3600)
    out.write("# HELP medsight_node_sent_last_hour Jobs sent in the last hour.\n"
              "# TYPE medsight_node_sent_last_hour gauge\n")
    out.write(f"medsight_node_sent_last_hour {tp['sent']}\n")
    if refused is not None:
        out.write("# HELP medsight_node_refused_total Associations and instances refused.\n"
                  "# TYPE medsight_node_refused_total counter\n")
        out.write(f"medsight_node_refused_total {refused}\n")
    if received is not None:
        out.write("# HELP medsight_node_received_total Instances received.\n"
                  "# TYPE medsight_node_received_total counter\n")
        out.write(f"medsight_node_received_total {received}\n")
    return out.getvalue()


def status(cfg: NodeConfig) -> dict:
    """Queue counts per state, the last errors and the throughput, read from the worklist file."""
    if not cfg.db_path.is_file():
        raise ConfigError(f"no worklist at {cfg.db_path} (has the node run with this config?)")
    wl = Worklist(cfg.db_path, cfg.store_dir)
    try:
        return {"counts": wl.counts(), "last_errors": wl.last_errors(5), "throughput": wl.throughput(3600),
                "store_bytes": wl.store_bytes()}
    finally:
        wl.close()
