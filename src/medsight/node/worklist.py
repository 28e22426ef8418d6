"""The node's durable worklist: one SQLite file (WAL) holding received instances, jobs and their history.

A job is one (series UID, bundle version). Its states::

    received -> queued -> running -> sent
                   ^         |  \\-> failed   (bad data, or retries used up)
                   \\---------/               (transport error: back to queued after a backoff)

* ``received``: instances are still arriving; the series becomes ``queued`` once no instance came for the
  configured stable age.
* ``UNIQUE(series_uid, bundle_version)`` makes "exactly one result set per (series, bundle version)" a
  property of the database: an instance sent again never makes a second job, and a job that is ``sent`` is
  never redone. A new bundle version is a new job (new results; the old ones are kept).
* ``running`` jobs carry a lease; a job whose lease ran out (the node was killed) goes back to ``queued``
  and is redone. Result UIDs are derived from (series UID, bundle version), so a redone job re-sends the
  same instances and the PACS stores them once.
* Every state change is a row in ``history``.

Received files live under ``store/`` (files 0600, folders 0700) within a byte quota; a file is removed once
every job of its series has ended (``sent`` or ``failed``).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from medsight.utils import atomic_write_bytes, private_dir, private_open

STATES = ("received", "queued", "running", "sent", "failed")
ACTIVE = ("received", "queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    first_at REAL NOT NULL,
    last_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    sop_class_uid TEXT NOT NULL,
    path TEXT,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    bundle_version TEXT NOT NULL,
    route TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'queued', 'running', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    lease_until REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    arrived_at REAL NOT NULL,
    last_error TEXT,
    infer_s REAL,
    build_s REAL,
    send_s REAL,
    UNIQUE (series_uid, bundle_version)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_at);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS history_job ON history(job_id);
CREATE TABLE IF NOT EXISTS seen (
    series_uid TEXT PRIMARY KEY,
    at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    study_uid: str
    bundle_version: str
    route: str
    attempts: int
    arrived_at: float


def _h(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:24]


class QuotaExceeded(Exception):
    """The received-file store is full (the sender gets "out of resources" and may retry later)."""


class Worklist:
    """Thread-safe (one connection behind a lock). ``path`` is the SQLite file; ``store`` the received files."""

    def __init__(self, path: str | os.PathLike, store: str | os.PathLike, *, quota_bytes: int = 2 << 30,
                 lease_s: float = 300.0, max_attempts: int = 8, backoff_s: float = 2.0, backoff_max_s: float = 300.0,
                 clock=time.time):
        self.path = Path(path)
        self.store = Path(store)
        private_dir(self.path.parent)
        private_dir(self.store)
        self.quota_bytes = int(quota_bytes)
        self.lease_s = float(lease_s)
        self.max_attempts = int(max_attempts)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.clock = clock
        self._lock = threading.RLock()
        new = not self.path.exists()
        if new:  # create the file 0600 before SQLite opens it
            private_open(self.path, "a").close()  # created 0600
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        for suffix in ("-wal", "-shm"):
            side = Path(str(self.path) + suffix)
            if side.exists():
                os.chmod(side, 0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- transactions ---------------------------------------------------------------------------------------
    def _tx(self):
        wl = self

        class _T:
            def __enter__(self):
                wl._lock.acquire()
                wl._db.execute("BEGIN IMMEDIATE")
                return wl._db

            def __exit__(self, et, e, tb):
                try:
                    wl._db.execute("COMMIT" if et is None else "ROLLBACK")
                finally:
                    wl._lock.release()

        return _T()

    def _move(self, db, job_id: int, to: str, note: str | None = None, **cols) -> None:
        (frm,) = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        sets = ", ".join(f"{k}=?" for k in cols)
        db.execute(f"UPDATE jobs SET state=?, updated_at=?{', ' + sets if sets else ''} WHERE id=?",
                   (to, self.clock(), *cols.values(), job_id))
        db.execute("INSERT INTO history(job_id, at, from_state, to_state, note) VALUES (?,?,?,?,?)",
                   (job_id, self.clock(), frm, to, note))

    # --- receiving ------------------------------------------------------------------------------------------
    def instance_path(self, series_uid: str, sop_uid: str) -> Path:
        """Where a received instance lives: hashed names (no UIDs on disk), one folder per series."""
        return self.store / _h(series_uid) / f"{_h(sop_uid)}.dcm"

    def store_bytes(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(size),0) FROM instances WHERE path IS NOT NULL")
                       .fetchone()[0])

    def receive(self, data: bytes, *, study_uid: str, series_uid: str, sop_uid: str, sop_class_uid: str,
                routes: list[tuple[str, str]]) -> str:
        """Keep one received instance (its encoded bytes) and make its series' jobs, one per matching route
        (``(route name, bundle version)``). Returns 'new', 'duplicate' (already held: nothing changes but the
        series' arrival time) or 'done' (every job of the series has ended: the instance is not kept).
        Raises :class:`QuotaExceeded` when the store is full."""
        now = self.clock()
        with self._lock:
            row = self._db.execute("SELECT path FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
            refill = row is not None and row[0] is None  # held once, cleaned after its results: needed again
            ended = bool(routes) and all(
                (r := self._db.execute("SELECT state FROM jobs WHERE series_uid=? AND bundle_version=?",
                                       (series_uid, v)).fetchone()) is not None and r[0] in ("sent", "failed")
                for _, v in routes)
            if ended:
                return "done"
            if row is None or refill:
                if self.store_bytes() + len(data) > self.quota_bytes:
                    raise QuotaExceeded(f"store {self.store} is full ({self.quota_bytes} bytes)")
                path = self.instance_path(series_uid, sop_uid)
                atomic_write_bytes(path, data, private=True)  # the file first: a row never points at a missing file
            with self._tx() as db:
                db.execute("INSERT INTO series(series_uid, study_uid, first_at, last_at) VALUES (?,?,?,?) "
                           "ON CONFLICT(series_uid) DO UPDATE SET last_at=excluded.last_at",
                           (series_uid, study_uid, now, now))
                if row is None:
                    db.execute("INSERT INTO instances(sop_uid, series_uid, sop_class_uid, path, size, received_at) "
                               "VALUES (?,?,?,?,?,?)", (sop_uid, series_uid, sop_class_uid,
                                                        str(self.instance_path(series_uid, sop_uid)), len(data), now))
                elif refill:
                    db.execute("UPDATE instances SET path=?, size=?, received_at=? WHERE sop_uid=?",
                               (str(self.instance_path(series_uid, sop_uid)), len(data), now, sop_uid))
                for name, version in routes:
                    cur = db.execute("INSERT OR IGNORE INTO jobs(series_uid, bundle_version, route, state, created_at, "
                                     "updated_at, arrived_at) VALUES (?,?,?,?,?,?,?)",
                                     (series_uid, version, name, "received", now, now, now))
                    if cur.rowcount:
                        db.execute("INSERT INTO history(job_id, at, from_state, to_state, note) VALUES (?,?,?,?,?)",
                                   (cur.lastrowid, now, None, "received", f"route {name}"))
            return "new" if row is None or refill else "duplicate"

    def mark_seen(self, series_uid: str) -> bool:
        """The poller's memory: True the first time a series is seen (it is then retrieved), False after."""
        with self._tx() as db:
            return bool(db.execute("INSERT OR IGNORE INTO seen(series_uid, at) VALUES (?,?)",
                                   (series_uid, self.clock())).rowcount)

    def forget_seen(self, series_uid: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM seen WHERE series_uid=?", (series_uid,))

    # --- scheduling -----------------------------------------------------------------------------------------
    def promote(self, stable_age_s: float) -> int:
        """``received`` -> ``queued`` for series with no new instance for ``stable_age_s``; returns how many."""
        now = self.clock()
        with self._tx() as db:
            ids = [r[0] for r in db.execute(
                "SELECT j.id FROM jobs j JOIN series s USING(series_uid) WHERE j.state='received' AND s.last_at<=?",
                (now - stable_age_s,))]
            for i in ids:
                self._move(db, i, "queued", "series complete (stable)", next_at=now)
        return len(ids)

    def reclaim(self, *, everything: bool = False) -> int:
        """``running`` jobs whose lease ran out (``everything``: all of them, at start-up under the node's
        lock) go back to ``queued``; returns how many."""
        now = self.clock()
        with self._tx() as db:
            q = "SELECT id FROM jobs WHERE state='running'" + ("" if everything else " AND lease_until<?")
            ids = [r[0] for r in db.execute(q, () if everything else (now,))]
            for i in ids:
                self._move(db, i, "queued", "lease expired (node stopped while running)", next_at=now,
                           lease_until=None)
        return len(ids)

    def claim(self) -> Job | None:
        """The oldest ``queued`` job that is due -> ``running`` with a lease; None when there is none."""
        now = self.clock()
        with self._tx() as db:
            row = db.execute("SELECT j.id, j.series_uid, s.study_uid, j.bundle_version, j.route, j.attempts, "
                             "j.arrived_at FROM jobs j JOIN series s USING(series_uid) "
                             "WHERE j.state='queued' AND j.next_at<=? ORDER BY j.next_at, j.id LIMIT 1",
                             (now,)).fetchone()
            if row is None:
                return None
            self._move(db, row[0], "running", None, attempts=row[5] + 1, lease_until=now + self.lease_s)
            return Job(row[0], row[1], row[2], row[3], row[4], row[5] + 1, row[6])

    def sent(self, job_id: int, *, infer_s: float | None = None, build_s: float | None = None,
             send_s: float | None = None) -> None:
        """Done: the results are stored in the PACS (seconds spent in inference, building the result DICOM and
        sending it are kept for status and benchmarks)."""
        with self._tx() as db:
            self._move(db, job_id, "sent", None, lease_until=None, infer_s=infer_s, build_s=build_s, send_s=send_s,
                       last_error=None)

    def failed(self, job_id: int, error: str) -> None:
        """Permanent failure (the data cannot be used): no retry."""
        with self._tx() as db:
            self._move(db, job_id, "failed", error, lease_until=None, last_error=error)

    def retry(self, job_id: int, error: str) -> float | None:
        """Transient failure (the PACS is down): back to ``queued`` after an exponential backoff, or ``failed``
        once ``max_attempts`` are used. Returns the delay, or None when the job failed."""
        with self._tx() as db:
            (attempts,) = db.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
            if attempts >= self.max_attempts:
                self._move(db, job_id, "failed", f"gave up after {attempts} attempts: {error}", lease_until=None,
                           last_error=error)
                return None
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, attempts - 1))
            self._move(db, job_id, "queued", f"retry in {delay:.1f} s: {error}", lease_until=None,
                       next_at=self.clock() + delay, last_error=error)
            return delay

    def next_due(self) -> float | None:
        with self._lock:
            r = self._db.execute("SELECT MIN(next_at) FROM jobs WHERE state='queued'").fetchone()
            return None if r[0] is None else float(r[0])

    # --- files ----------------------------------------------------------------------------------------------
    def instances(self, series_uid: str) -> list[tuple[str, str, Path]]:
        """(SOP instance UID, SOP class UID, file) of the series' held instances, in arrival order."""
        with self._lock:
            return [(r[0], r[1], Path(r[2])) for r in self._db.execute(
                "SELECT sop_uid, sop_class_uid, path FROM instances WHERE series_uid=? AND path IS NOT NULL "
                "ORDER BY received_at, sop_uid", (series_uid,))]

    def clean(self) -> int:
        """Remove the files of series whose jobs have all ended; returns the number of files removed."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.sop_uid, i.path FROM instances i WHERE i.path IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM jobs j WHERE j.series_uid=i.series_uid AND j.state IN ('received','queued','running'))"
            ).fetchall()
        for sop, path in rows:
            p = Path(path)
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            try:
                p.parent.rmdir()
            except OSError:
                pass
            with self._tx() as db:
                db.execute("UPDATE instances SET path=NULL WHERE sop_uid=?", (sop,))
        return len(rows)

    def orphan_files(self) -> list[Path]:
        """Files in the store that no row names (the node stopped between writing a file and recording it)."""
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT path FROM instances WHERE path IS NOT NULL")}
        return [p for p in self.store.rglob("*") if p.is_file() and str(p) not in known]

    # --- status ---------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self._lock:
            got = dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {s: int(got.get(s, 0)) for s in STATES}

    def last_errors(self, n: int = 5) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT id, route, state, attempts, updated_at, last_error FROM jobs "
                                    "WHERE last_error IS NOT NULL ORDER BY updated_at DESC LIMIT ?", (n,)).fetchall()
        return [dict(zip(("job", "route", "state", "attempts", "at", "error"), r)) for r in rows]

    def throughput(self, window_s: float = 3600.0) -> dict:
        """Jobs sent within the last ``window_s`` seconds, per minute, and their arrival -> sent times."""
        now = self.clock()
        with self._lock:
            rows = self._db.execute("SELECT arrived_at, updated_at, infer_s FROM jobs WHERE state='sent' "
                                    "AND updated_at>=?", (now - window_s,)).fetchall()
        lat = sorted(r[1] - r[0] for r in rows)
        return {"sent": len(rows), "per_minute": len(rows) / (window_s / 60.0),
                "p50_s": lat[len(lat) // 2] if lat else None,
                "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None}

    def history(self, job_id: int) -> list[tuple]:
        """(from state, to state, note, time) of every change of one job, oldest first."""
        with self._lock:
            return [tuple(r) for r in self._db.execute(
                "SELECT from_state, to_state, note, at FROM history WHERE job_id=? ORDER BY id", (job_id,))]

    def jobs(self) -> list[dict]:
        with self._lock:
            cols = ("id", "series_uid", "bundle_version", "route", "state", "attempts", "arrived_at", "updated_at",
                    "infer_s", "build_s", "send_s", "last_error")
            return [dict(zip(cols, r)) for r in self._db.execute(f"SELECT {', '.join(cols)} FROM jobs ORDER BY id")]
