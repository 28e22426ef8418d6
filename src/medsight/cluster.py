"""``predict``, ``qc`` and ``deid`` over many files through an executor (:mod:`medsight.executor`): exactly one row
per file, resumable.

Every finished file is recorded, with its row, in a SQLite manifest beside the output (``OUT.manifest.sqlite``;
for ``deid`` ``OUT_DIR.manifest.sqlite`` beside the output folder, never inside it). Rows are committed in one
transaction per batch, keyed by the file's position in the input list (``INSERT OR IGNORE``): a batch that a lost
worker ran twice adds its rows once. The output file (CSV, JSON, JSON lines or Parquet) is rendered from the
manifest at the end, written to a temporary file and renamed into place, so a kill at any point leaves either no
output or a complete one, and the manifest holds every row committed before it. Re-running the same command reads
the manifest and sends only the files it lacks; the manifest refuses a run whose inputs or settings differ.

``deid`` publishes batch by batch: a worker de-identifies its batch with :func:`medsight.data.deid.deidentify`
(allow-list, then the verifier over the batch's outputs) into a staging folder beside the output; a verifier hit
fails the batch, and the run, before anything of it is published. The client then records the batch's rows as
*unpublished*, moves its files into the output folder and marks them published; rows left unpublished by a kill
are redone on the next run (the same secret gives the same bytes at the same paths). Pseudonyms, UIDs and date
offsets are keyed by the secret alone (HMAC), so they are the same whichever worker sees a file; ``--cluster``
therefore needs ``--secret-env``. The ``deid`` manifest links inputs to outputs: it holds the original identifiers
only when ``--mapping`` was asked for (else keyed digests, for the counts) and is removed once the run is complete
(a finished output folder is then, as for the local command, not empty: give a new one).

Manifest, outputs and output folders are created 0600 / 0700 (without touching the process umask).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import hmac
import io
import json
import os
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from medsight import progress
from medsight.errors import ConfigError, DataError, MedsightError
from medsight.executor import LocalExecutor, batch_size_for, batches, bundle_fingerprint, cached_predictor
from medsight.utils import atomic_private, private_dir, private_open

MANIFEST_SUFFIX = ".manifest.sqlite"
#: the row of a file that kept stopping the workers that read it (Dask ``KilledWorker`` after the batch was split)
LOST = "cannot use {path}: it stopped the Dask workers that read it (skipped)"


# --- the manifest --------------------------------------------------------------------------------------------------
def file_key(path: Path) -> str:
    """What identifies an input: its path, size and modification time (a changed file is a different input)."""
    try:
        st = os.stat(path)
        return f"{path}\x1f{st.st_size}\x1f{st.st_mtime_ns}"
    except OSError:
        return f"{path}\x1fmissing"


class Manifest:
    """The durable record of one run: its settings and inputs, and one row per finished input.

    ``rows(seq PRIMARY KEY, key, row JSON, published)``: ``seq`` is the input's position in the run's input
    list (the same list on every re-run, which ``meta.job`` checks), so a row can only be added once."""

    def __init__(self, path: Path, job: dict, keys: Sequence[str]):
        self.path = Path(path)
        fresh = not self.path.exists()
        private_open(self.path, "a").close()  # created 0600
        self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=60)
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS rows (seq INTEGER PRIMARY KEY, key TEXT NOT NULL, "
                        "row TEXT NOT NULL, published INTEGER NOT NULL DEFAULT 1, claim TEXT UNIQUE)")
        self.db.execute("CREATE TABLE IF NOT EXISTS extra (kind TEXT, k TEXT, v TEXT, PRIMARY KEY (kind, k))")
        digest = hashlib.sha256("\n".join(keys).encode("utf-8", "surrogateescape")).hexdigest()
        ident = json.dumps({**job, "inputs": digest, "n_inputs": len(keys)}, sort_keys=True)
        have = self.db.execute("SELECT v FROM meta WHERE k='job'").fetchone()
        if have is None:
            if not fresh and self.count():
                raise ConfigError(f"{self.path} holds rows of an unknown run; remove it to start again")
            self.db.execute("INSERT INTO meta VALUES ('job', ?)", (ident,))
        elif have[0] != ident:
            raise ConfigError(f"{self.path} belongs to a run with other inputs or settings; re-run that command to "
                              "finish it, or remove this file (and the output) to start again")
        self.keys = keys

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM rows WHERE published=1").fetchone()[0]

    def done(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT seq FROM rows WHERE published=1")}

    def add(self, rows: Iterable[tuple[int, dict]], *, published: bool = True,
            claims: dict[int, str] | None = None) -> list[int]:
        """Insert rows in one transaction; a seq already present is ignored. Returns the seqs added."""
        added = []
        with self._tx():
            for seq, row in rows:
                cur = self.db.execute("INSERT OR IGNORE INTO rows (seq, key, row, published, claim) VALUES (?,?,?,?,?)",
                                      (seq, self.keys[seq], json.dumps(row), int(published),
                                       (claims or {}).get(seq)))
                if cur.rowcount:
                    added.append(seq)
        return added

    def claimant(self, claim: str) -> int | None:
        r = self.db.execute("SELECT seq FROM rows WHERE claim=?", (claim,)).fetchone()
        return None if r is None else r[0]

    def publish(self, seqs: Sequence[int], extra: Iterable[tuple[str, str, str]] = ()) -> None:
        with self._tx():
            self.db.executemany("UPDATE rows SET published=1 WHERE seq=?", [(s,) for s in seqs])
            self.db.executemany("INSERT OR IGNORE INTO extra VALUES (?,?,?)", list(extra))

    def drop_unpublished(self) -> int:
        with self._tx():
            return self.db.execute("DELETE FROM rows WHERE published=0").rowcount

    def rows(self) -> Iterator[tuple[int, dict]]:
        """Every published row, in input order (streamed)."""
        for seq, row in self.db.execute("SELECT seq, row FROM rows WHERE published=1 ORDER BY seq"):
            yield seq, json.loads(row)

    def extra(self, kind: str) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT k, v FROM extra WHERE kind=? ORDER BY k", (kind,)))

    @contextlib.contextmanager
    def _tx(self):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()


def manifest_path(out: Path) -> Path:
    out = Path(out)
    return out.parent / (out.name + MANIFEST_SUFFIX)


# --- the driver ----------------------------------------------------------------------------------------------------
def _run(executor, fn: Callable, items: Sequence[tuple[int, object]], size: int, args: tuple, description: str,
         on_result: Callable[[object], tuple[int, int]], status: dict,
         on_lost: Callable[[tuple[int, object]], object] | None = None) -> None:
    """Send ``items`` (``(seq, payload)``) in batches of ``size``; ``on_result(result) -> (rows added, errors)``
    records each batch as it arrives; ``on_lost(item)``: the result for one item that kept killing the workers
    that read it (an error row). Progress: files done, rate, errors."""
    t0 = time.perf_counter()
    done = errors = 0
    sink = progress.get_sink()
    with progress.task(description, total=len(items)) as bar:
        for _, result in executor.map(fn, batches(items, size), *args, on_lost=on_lost):
            added, err = on_result(result)
            done += added
            errors += err
            bar.advance(added)
            rate = done / max(1e-9, time.perf_counter() - t0)
            update = getattr(sink, "update", None)  # the CLI's bar shows a note beside the count
            if update is not None:
                update(bar.key, info=f"{rate:.1f} files/s, {errors} errors")
    status["done_now"] = done
    status["seconds"] = time.perf_counter() - t0
    status["rate"] = done / status["seconds"] if status["seconds"] > 0 else 0.0


def _status(executor, n: int, done_before: int) -> dict:
    return {"files": n, "done_before": done_before, "done_now": 0, "seconds": 0.0, "rate": 0.0,
            "executor": getattr(executor, "name", "local"), "workers": executor.n_workers,
            "dashboard": getattr(executor, "dashboard_link", None)}


# --- predict -------------------------------------------------------------------------------------------------------
def predict_batch(batch: list[tuple[int, str]], bundle: str, sha256: str, backend: str) -> list[tuple[int, dict]]:
    """On a worker: ``[(seq, path)]`` -> ``[(seq, Prediction.to_dict())]`` with the worker's cached predictor."""
    p = cached_predictor(bundle, sha256, backend)
    preds = p.predict_paths([path for _, path in batch], batch_size=max(1, len(batch)))
    return [(seq, pr.to_dict()) for (seq, _), pr in zip(batch, preds)]


PREDICT_OUTPUTS = (".csv", ".json", ".jsonl", ".parquet")


def predict_files(bundle: str | Path, files: Sequence[Path], out: str | Path, *, executor=None,
                  backend: str = "torch", batch_size: int = 64) -> dict:
    """Predict ``files`` with ``bundle`` through ``executor`` (default: this process) into ``out``, resumably.
    Returns a status dict (files, done_before, done_now, errors, seconds, rate, out, manifest)."""
    from medsight.bundle import load_bundle
    from medsight.predict import BACKENDS

    out = Path(out).absolute()
    if out.suffix.lower() not in PREDICT_OUTPUTS:
        raise ConfigError(f"--out must end in {', '.join(PREDICT_OUTPUTS)}, got {out.name!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    bundle = Path(bundle).absolute()
    b = load_bundle(bundle)  # fails here, once, on a bad bundle
    sha = bundle_fingerprint(bundle)
    executor = executor or LocalExecutor(0)
    files = [Path(f).absolute() for f in files]
    keys = [file_key(f) for f in files]
    private_dir(out.parent)
    m = Manifest(manifest_path(out), {"command": "predict", "bundle": sha, "backend": backend}, keys)
    try:
        done = m.done()
        status = _status(executor, len(files), len(done))
        todo = [(i, str(f)) for i, f in enumerate(files) if i not in done]
        size = batch_size_for(len(todo), executor.n_workers, batch_size)

        def record(result) -> tuple[int, int]:
            added = set(m.add(result))
            return len(added), sum(1 for s, r in result if s in added and r["error"] is not None)

        from medsight.predict import Prediction, model_version

        def lost(item) -> list:
            seq, path = item
            return [(seq, Prediction(file=path, error=LOST.format(path=path), model_version=model_version(b),
                                     calibrated=abs(b.temperature - 1.0) > 1e-12).to_dict())]

        _run(executor, predict_batch, todo, size, (str(bundle), sha, backend),
             f"predicting {len(todo)} files ({len(done)} done before)", record, status, on_lost=lost)
        status["errors"] = _render_predictions(m, out, b.classes)
        status["out"], status["manifest"] = str(out), str(m.path)
        return status
    finally:
        m.close()


def _render_predictions(m: Manifest, out: Path, classes: Sequence[str]) -> int:
    """The manifest's rows -> ``out`` (0600, atomically); returns the number of rows with an error."""
    from medsight.predict import Prediction, write_predictions

    n_rows = m.count()
    if n_rows != len(m.keys):
        raise MedsightError(f"{m.path}: {n_rows} of {len(m.keys)} files done; re-run the same command to finish")
    with atomic_private(out) as tmp:
        if out.suffix.lower() == ".parquet":
            return _write_parquet(tmp, (r for _, r in m.rows()), classes)
        _, n_err = write_predictions((Prediction(**r) for _, r in m.rows()), tmp, classes)
    return n_err


def _write_parquet(path: Path, rows: Iterable[dict], classes: Sequence[str], chunk: int = 65536) -> int:
    """Predictions as Parquet: the CSV's columns, probabilities as float64, written in row groups."""
    from medsight.errors import optional_import

    pa = optional_import("pyarrow", "pyarrow")
    pq = optional_import("pyarrow.parquet", "pyarrow")
    cols = ["file", *[f"p_{c}" for c in classes], "predicted", "decision", "threshold", "positive_class",
            "calibrated", "model_version", "ood_score", "ood_flag", "error"]
    types = {**{c: pa.string() for c in cols}, **{f"p_{c}": pa.float64() for c in classes},
             "calibrated": pa.bool_(), "ood_score": pa.float64(), "ood_flag": pa.bool_()}
    schema = pa.schema([(c, types[c]) for c in cols])
    n_err = 0
    with pq.ParquetWriter(str(path), schema) as w:
        buf: list[dict] = []
        for r in rows:
            n_err += r["error"] is not None
            pred = r["predicted"]
            buf.append({"file": r["file"], **{f"p_{c}": (r["probabilities"] or {}).get(c) for c in classes},
                        "predicted": ";".join(pred) if isinstance(pred, list) else pred,
                        "decision": None if r["decision"] is None else json.dumps(r["decision"]),
                        "threshold": None if r["threshold"] is None else json.dumps(r["threshold"]),
                        "positive_class": r.get("positive_class"), "calibrated": r["calibrated"],
                        "model_version": r["model_version"], "ood_score": r["ood_score"], "ood_flag": r["ood_flag"],
                        "error": r["error"]})
            if len(buf) >= chunk:
                w.write_table(pa.Table.from_pylist(buf, schema))
                buf = []
        if buf:
            w.write_table(pa.Table.from_pylist(buf, schema))
    return n_err


# --- qc ------------------------------------------------------------------------------------------------------------
def qc_batch(batch: list[tuple[int, str]], hash_size: int) -> list[tuple[int, dict]]:
    """On a worker: ``[(seq, path)]`` -> ``[(seq, file_facts)]``."""
    from medsight.data.quality import file_facts

    return [(seq, file_facts(path, hash_size)) for seq, path in batch]


QC_COLUMNS = ("file", "readable", "error", "content_sha256", "phash", "shape", "spacing", "median", "format",
              "modality", "identifying_headers")


def qc_rows_csv(rows: Iterable[dict], path: Path) -> None:
    """One CSV row per file: what QC read of it (no identifying value: header names, never their contents)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(QC_COLUMNS)
        for r in rows:
            d = r.get("dicom")
            ok = r["error"] is None
            w.writerow([r["file"], ok, r["error"] or "", r.get("hash") or "",
                        "" if r.get("phash") is None else f"{r['phash']:x}",
                        "x".join(map(str, r["shape"])) if ok else "",
                        "x".join(f"{v:g}" for v in r["spacing"]) if ok and r.get("spacing") else "",
                        f"{r['median']:.6g}" if ok else "", ("dicom" if d else "image") if ok else "",
                        (d or {}).get("modality") or "", ";".join((d or {}).get("phi") or [])])


def qc_facts(out: str | Path, *, executor=None, hash_size: int = 8, batch_size: int = 64,
             status: dict | None = None) -> Callable[[list[dict]], list[dict]]:
    """A ``facts`` function for :func:`medsight.data.quality.run_qc` that reads the files through ``executor``,
    resumably, recording one row per file in the manifest beside ``out`` and rendering ``out`` (CSV) at the end.
    ``status`` (a dict) receives the run's counts."""
    out = Path(out).absolute()
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"qc --out must end in .csv, got {out.name!r}")
    executor = executor or LocalExecutor(0)
    status = {} if status is None else status

    def facts(records: list[dict]) -> list[dict]:
        files = [Path(str(r["path"])).absolute() for r in records]
        keys = [file_key(f) for f in files]
        private_dir(out.parent)
        m = Manifest(manifest_path(out), {"command": "qc", "hash_size": hash_size}, keys)
        try:
            done = m.done()
            status.update(_status(executor, len(files), len(done)))
            todo = [(i, str(f)) for i, f in enumerate(files) if i not in done]

            def record(result) -> tuple[int, int]:
                added = set(m.add(result))
                return len(added), sum(1 for s, r in result if s in added and r["error"] is not None)

            _run(executor, qc_batch, todo, batch_size_for(len(todo), executor.n_workers, batch_size), (hash_size,),
                 f"QC: reading {len(todo)} files ({len(done)} done before)", record, status,
                 on_lost=lambda item: [(item[0], {"file": item[1], "error": LOST.format(path=item[1])})])
            if m.count() != len(files):
                raise MedsightError(f"{m.path}: {m.count()} of {len(files)} files done; re-run the same command")
            rows = [r for _, r in m.rows()]
            with atomic_private(out) as tmp:
                qc_rows_csv(rows, tmp)
            status["errors"] = sum(r["error"] is not None for r in rows)
            status["out"], status["manifest"] = str(out), str(m.path)
            # run_qc names files by its records' paths; the rows carry the same files
            return rows
        finally:
            m.close()

    return facts


# --- deid ----------------------------------------------------------------------------------------------------------
def deid_batch(batch: list[tuple[int, str]], in_root: str, staging: str, secret: bytes, keep_private: bool,
               allow_burned_in: bool, want_mapping: bool = False) -> dict:
    """On a worker: de-identify ``[(seq, path relative to in_root)]`` with :func:`deidentify` (the verifier runs
    over this batch's outputs; a hit raises, and nothing of the batch is kept) into a fresh folder below
    ``staging``. Returns ``{"work": folder, "rows": [(seq, row)], "mapping": [(kind, original, new)]}``; without
    ``want_mapping`` the mapping holds a keyed digest of each original and no new value (enough to count
    patients and UIDs, useless for re-identification)."""
    from medsight.data.deid import deidentify

    work = Path(staging) / f"b{batch[0][0]}-{uuid.uuid4().hex[:12]}"
    work.mkdir(mode=0o700, parents=False)
    try:
        src = work / "in"
        for _, rel in batch:  # the batch as a folder of links: the same relative paths as in the input
            link = src / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(in_root) / rel, link)
        mapping = work / "mapping.csv"
        summary = deidentify(src, work / "out", mapping_csv=mapping, secret=secret, keep_private=keep_private,
                             allow_burned_in=allow_burned_in)
        hits = [e for e in summary["errors"] if str(e["error"]).startswith("verifier:")]
        if hits:  # deid held the file back; on a cluster a verifier hit also stops the run, this batch unpublished
            raise DataError(f"de-identification verifier: {hits[0]['path']}: {hits[0]['error'][len('verifier: '):]}; "
                            "this batch is not published and the run stops")
        with open(mapping, newline="", encoding="utf-8") as fh:
            entries = [tuple(r) for r in list(csv.reader(fh))[1:]]
        mapping.unlink()
        shutil.rmtree(src)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    files = {old: new for kind, old, new in entries if kind == "file"}
    errors = {e["path"]: e["error"] for e in summary["errors"]}
    skipped, burned = set(summary["skipped"]), set(summary["burned_in"])
    rows = []
    for seq, rel in batch:
        if rel in errors:
            row = {"file": rel, "status": "error", "output": None, "error": errors[rel]}
        elif rel in skipped:
            row = {"file": rel, "status": "skipped", "output": None, "error": None}
        elif rel in files:
            row = {"file": rel, "status": "written", "output": files[rel], "error": None,
                   "burned_in": rel in burned}
        elif rel in burned:
            row = {"file": rel, "status": "held_back", "output": None, "error": None, "burned_in": True}
        else:  # pragma: no cover - deidentify accounts for every file
            row = {"file": rel, "status": "error", "output": None, "error": "not accounted for by de-identification"}
        rows.append((seq, row))
    pairs = [(str(e[0]), str(e[1]), str(e[2])) for e in entries if e[0] != "file"]
    if not want_mapping:
        pairs = [(kind, hmac.new(secret, f"{kind}\x1f{old}".encode(), "sha256").hexdigest()[:32], "")
                 for kind, old, _ in pairs]
    return {"work": str(work / "out"), "rows": rows, "mapping": pairs,
            "studies": summary.get("studies", 0)}


def deid_files(in_dir: str | Path, out_dir: str | Path, *, secret: str | bytes, executor=None,
               mapping_csv: str | Path | None = None, keep_private: bool = False, allow_burned_in: bool = False,
               batch_size: int = 64) -> dict:
    """:func:`medsight.data.deid.deidentify` over ``executor``, batch by batch, resumably (see the module notes).
    Returns the summary ``deidentify`` returns (written, skipped, errors, burned_in, ...) plus the run's status."""
    src, dst = Path(in_dir).resolve(), Path(out_dir).absolute()
    if not src.is_dir():
        raise DataError(f"cannot de-identify {src}: not a folder")
    if dst.resolve() == src or src in dst.resolve().parents:
        raise DataError(f"cannot de-identify {src}: the output folder {dst} must be outside the input folder")
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret or b"")
    if not key:
        raise ConfigError("--cluster: de-identification on several workers needs a secret (--secret-env), so that "
                          "pseudonyms, UIDs and date offsets are the same on every worker and every re-run")
    if mapping_csv is not None:
        mp = Path(mapping_csv).resolve()
        if dst.resolve() in mp.parents or src in mp.parents:
            raise DataError(f"--mapping {mp}: the mapping re-identifies the output; write it outside the input and "
                            "output folders")
    executor = executor or LocalExecutor(0)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    rels = [f.relative_to(src).as_posix() for f in files]
    mpath = manifest_path(dst)
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not mpath.exists())):
        raise DataError(f"cannot de-identify into {dst}: the folder is not empty (give a new or empty folder)")
    private_dir(dst)
    job = {"command": "deid", "in": str(src), "keep_private": keep_private, "allow_burned_in": allow_burned_in,
           "mapping": mapping_csv is not None,
           # which secret, as a slow keyed digest (the manifest must not make a weak secret easy to guess)
           "secret": hashlib.pbkdf2_hmac("sha256", key, b"medsight-deid-manifest", 100_000)[:8].hex()}
    m = Manifest(mpath, job, [file_key(f) for f in files])
    staging = dst.parent / f".{dst.name}.staging"
    complete = False
    try:
        m.drop_unpublished()  # a kill between recording and publishing: redo those files (same bytes, same paths)
        shutil.rmtree(staging, ignore_errors=True)  # batches an earlier run left unpublished
        private_dir(staging)
        done = m.done()
        status = _status(executor, len(files), len(done))
        todo = [(i, rels[i]) for i in range(len(files)) if i not in done]

        def record(result) -> tuple[int, int]:
            work = Path(result["work"] or staging / "none")
            fresh, claims, errors = [], {}, 0
            for seq, row in result["rows"]:
                if row["status"] == "written":
                    holder = m.claimant(row["output"])
                    if holder is not None and holder != seq:
                        row = {**row, "status": "error", "output": None,
                               "error": "another input file has the same SOP Instance UID; not written"}
                    else:
                        claims[seq] = row["output"]
                fresh.append((seq, row))
            added = m.add(fresh, published=False, claims=claims)  # 1. recorded, not yet published
            for seq in added:
                if seq in claims:  # 2. moved into place (0600, folders 0700)
                    target = dst / claims[seq]
                    private_dir(target.parent)
                    staged = work / claims[seq]
                    if not staged.is_file():
                        raise MedsightError(f"a worker's de-identified file is not visible here below {staging}: "
                                            "deid --cluster needs the input and output folders on storage that "
                                            "the client and every worker share (same paths)")
                    os.chmod(staged, 0o600)
                    os.replace(staged, target)
            m.publish(added, [(kind, old, new) for kind, old, new in result["mapping"]])  # 3. published
            if result["work"]:
                shutil.rmtree(work.parent, ignore_errors=True)
            errors = sum(1 for seq, row in fresh if seq in set(added) and row["status"] == "error")
            return len(added), errors

        def lost(item) -> dict:
            row = {"file": item[1], "status": "error", "output": None,
                   "error": "cannot de-identify: it stopped the Dask workers that read it"}
            return {"work": None, "rows": [(item[0], row)], "mapping": []}

        _run(executor, deid_batch, todo, batch_size_for(len(todo), executor.n_workers, batch_size),
             (str(src), str(staging), key, keep_private, allow_burned_in, mapping_csv is not None),
             f"de-identifying {len(todo)} files ({len(done)} done before)", record, status, on_lost=lost)
        if m.count() != len(files):
            raise MedsightError(f"{m.path}: {m.count()} of {len(files)} files done; re-run the same command")
        rows = [r for _, r in m.rows()]
        summary = {"in_dir": str(src), "out_dir": str(dst), "written": sum(r["status"] == "written" for r in rows),
                   "skipped": [r["file"] for r in rows if r["status"] == "skipped"],
                   "errors": [{"path": r["file"], "error": r["error"]} for r in rows if r["status"] == "error"],
                   "burned_in": [r["file"] for r in rows if r.get("burned_in")],
                   "burned_in_written": bool(allow_burned_in),
                   "patients": len(m.extra("patient")), "uids_remapped": len(m.extra("uid")),
                   "mapping_csv": None, **status, "manifest": str(m.path)}
        if mapping_csv is not None:
            summary["mapping_csv"] = str(_write_mapping(Path(mapping_csv), m, rows))
        complete, summary["manifest"] = True, None
        return summary
    finally:
        m.close()
        if complete:  # it links inputs to outputs: kept only while the run is unfinished (a mapping only on request)
            m.path.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # a failed run: finished batches it did not publish


def _write_mapping(path: Path, m: Manifest, rows: list[dict]) -> Path:
    """The same CSV as the local ``deid --mapping`` (patients, date offsets, UIDs sorted; then files in order)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["kind", "original", "new"])
    for kind in ("patient", "date_offset_days", "uid"):
        for old, new in m.extra(kind):
            w.writerow([kind, old, new])
    for r in rows:
        if r["status"] == "written":
            w.writerow(["file", r["file"], r["output"]])
    path = Path(path).absolute()
    private_dir(path.parent)
    with atomic_private(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path
