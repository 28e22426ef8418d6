"""predict, qc and deid on a Dask cluster (a real LocalCluster: 2 worker processes, 1 thread each), resumable, one
row per file; the same rows as the local commands."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from medsight.errors import ConfigError, DataError, MedsightError
from tests.conftest import REPO, write_dicom

distributed = pytest.importorskip("distributed")  # the [cluster] extra; CI installs it (pyproject "all")


@pytest.fixture(scope="module")
def client():
    import dask
    from distributed import Client, LocalCluster

    # a task is given up (KilledWorker) once it was running on 2 workers that died (default: 4), so the test of a
    # file that kills its workers stays short; one lost worker is still rescheduled
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", scheduler_port=0, silence_logs=50)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture
def executor(client):
    from medsight.executor import DaskExecutor

    return DaskExecutor(client=client)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, breast) -> dict:
    """Valid PNG and DICOM files and hostile ones (truncated, garbage, empty, text named .png)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    images = np.asarray(breast.splits["test"].images[:24]).reshape(24, 28, 28)
    for i, img in enumerate(images[:16]):
        Image.fromarray(img.astype(np.uint8)).save(root / f"img_{i:02d}.png")
    for i, img in enumerate(images[16:]):
        write_dicom(root / f"scan_{i:02d}.dcm", img)
    (root / "truncated.png").write_bytes((root / "img_00.png").read_bytes()[:60])
    (root / "garbage.dcm").write_bytes(b"DICM" + os.urandom(300))
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not an image")
    from medsight.predict import expand_inputs

    return {"root": root, "files": expand_inputs([root])}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_predictions(rows: list[dict], local) -> None:
    assert [r["file"] for r in rows] == [p.file for p in local]
    for r, p in zip(rows, local):
        d = p.to_dict()
        assert r["error"] == d["error"]
        assert set(r["probabilities"]) == set(d["probabilities"])
        for c, v in d["probabilities"].items():
            assert abs(r["probabilities"][c] - v) <= 1e-6
        for k in ("predicted", "decision", "threshold", "ood_flag", "model_version", "calibrated"):
            assert r[k] == d[k], k


def _private(p: Path) -> bool:
    return stat.S_IMODE(p.stat().st_mode) == 0o600


def test_cluster_spec_and_missing_extra(served_bundle, mixed, tmp_path, monkeypatch, capsys):
    from medsight.cli import main
    from medsight.executor import parse_cluster

    assert parse_cluster("tcp://10.0.0.5:8786") == ("tcp", "tcp://10.0.0.5:8786")
    assert parse_cluster("local:3") == ("local", 3)
    for bad in ("local:0", "local:x", "10.0.0.5:8786", ""):
        with pytest.raises(ConfigError, match="expected tcp://HOST:PORT"):
            parse_cluster(bad)
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if medsight[cluster] were not installed
    rc = main(["predict", str(served_bundle), str(mixed["root"]), "--out", str(tmp_path / "p.csv"),
               "--cluster", "local:2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "medsight[cluster]" in err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()


def test_predict_on_cluster_matches_local(served_bundle, mixed, tmp_path, executor):
    from medsight.cluster import manifest_path, predict_files
    from medsight.predict import Predictor

    local = Predictor(served_bundle).predict_paths(mixed["files"])
    out = tmp_path / "rows.jsonl"
    st = predict_files(served_bundle, mixed["files"], out, executor=executor, batch_size=4)
    rows = _jsonl(out)
    _assert_same_predictions(rows, local)
    assert st["files"] == st["done_now"] == len(mixed["files"]) and st["errors"] == 4 and st["workers"] == 2
    assert _private(out) and _private(manifest_path(out))
    # re-run: nothing left to do, the same rows
    st2 = predict_files(served_bundle, mixed["files"], out, executor=executor, batch_size=4)
    assert st2["done_now"] == 0 and st2["done_before"] == len(mixed["files"]) and _jsonl(out) == rows
    # another bundle or input list is refused by the manifest
    with pytest.raises(ConfigError, match="other inputs or settings"):
        predict_files(served_bundle, mixed["files"][:-1], out, executor=executor)
    # CSV and Parquet render the same rows
    import pyarrow.parquet as pq

    predict_files(served_bundle, mixed["files"], tmp_path / "rows.parquet", executor=executor, batch_size=4)
    t = pq.read_table(tmp_path / "rows.parquet").to_pylist()
    assert [r["file"] for r in t] == [p.file for p in local]
    assert all(abs(r["p_malignant"] - p.probabilities["malignant"]) <= 1e-6 for r, p in zip(t, local) if p.ok)


def test_qc_on_cluster_matches_local(mixed, tmp_path, executor):
    from medsight.cluster import qc_facts
    from medsight.data.quality import run_qc

    local = run_qc(mixed["root"], layout="raw")
    status: dict = {}
    out = tmp_path / "qc_rows.csv"
    remote = run_qc(mixed["root"], layout="raw", facts=qc_facts(out, executor=executor, batch_size=4, status=status))
    assert remote == local
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == [str(p) for p in sorted(Path(mixed["root"]).iterdir())]
    assert sum(r["readable"] == "False" for r in rows) == local["n_unreadable"] == 4
    assert status["errors"] == 4 and _private(out)
    assert all(r["format"] == "dicom" and r["identifying_headers"] == "PatientID;PatientName"
               for r in rows if r["file"].endswith("scan_00.dcm"))


def _deid_tree(root: Path, images: np.ndarray, *, leak_in: int | None = None) -> Path:
    """Three patients in folders named after them; held-back (no BurnedInAnnotation) and writable files; hostile."""
    import pydicom

    src = root / "src"
    for i, img in enumerate(images):
        name, pid = [("Doe^Jane", "PID-12345"), ("Roe^Rick", "PID-67890"), ("Poe^Edgar", "PID-55555")][i % 3]
        d = src / f"{name.split('^')[0]}_{pid}"
        d.mkdir(parents=True, exist_ok=True)
        f = write_dicom(d / f"img{i:02d}.dcm", img.astype(np.uint8), patient_name=name, patient_id=pid)
        ds = pydicom.dcmread(f)
        ds.StudyDate = "20240105"
        if i % 4:
            ds.BurnedInAnnotation = "NO"
        if i == leak_in:  # a kept private tag repeating the patient's name: the verifier must catch it
            ds.private_block(0x0011, "ACME", create=True).add_new(0x02, "LO", name)
        ds.save_as(f, enforce_file_format=True)
    (src / "garbage.dcm").write_bytes(b"DICM" + os.urandom(200))
    (src / "README.txt").write_text("export notes")
    return src


def _tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_deid_on_cluster_matches_local(breast, tmp_path, executor):
    from medsight.cluster import deid_files
    from medsight.data.deid import deidentify

    src = _deid_tree(tmp_path, np.asarray(breast.splits["test"].images[:12]).reshape(12, 28, 28))
    local = deidentify(src, tmp_path / "local", secret="s3cret", mapping_csv=tmp_path / "map_local.csv")
    remote = deid_files(src, tmp_path / "remote", secret="s3cret", executor=executor, batch_size=3,
                        mapping_csv=tmp_path / "map_remote.csv")
    assert local["written"] == remote["written"] == 9
    for k in ("skipped", "burned_in", "patients"):
        assert sorted(remote[k]) == sorted(local[k]) if isinstance(local[k], list) else remote[k] == local[k]
    assert [e["path"] for e in remote["errors"]] == [e["path"] for e in local["errors"]] == ["garbage.dcm"]
    # the same pseudonyms, UIDs, date offsets and bytes, whichever worker saw a file
    assert _tree_bytes(tmp_path / "remote") == _tree_bytes(tmp_path / "local")
    assert (tmp_path / "map_remote.csv").read_text() == (tmp_path / "map_local.csv").read_text()
    outs = [p for p in (tmp_path / "remote").rglob("*") if p.is_file()]
    assert outs and all(_private(p) for p in outs) and _private(tmp_path / "map_remote.csv")
    assert not (tmp_path / ".remote.staging").exists()
    assert not (tmp_path / "remote.manifest.sqlite").exists()  # it linked inputs to outputs: gone once complete
    with pytest.raises(DataError, match="the folder is not empty"):
        deid_files(src, tmp_path / "remote", secret="s3cret", executor=executor)
    with pytest.raises(ConfigError, match="needs a secret"):
        deid_files(src, tmp_path / "r2", secret="", executor=executor)


def test_deid_verifier_hit_fails_the_run_without_publishing_that_batch(breast, tmp_path, executor):
    from medsight.cluster import deid_files

    src = _deid_tree(tmp_path, np.asarray(breast.splits["test"].images[:9]).reshape(9, 28, 28), leak_in=1)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"^de-identification verifier: an? [a-z ]+ from the input survived in ANON-[0-9A-F]+/[0-9./]+\.dcm; nothing written$"):
        deid_files(src, out, secret="s3cret", executor=executor, batch_size=2, keep_private=True)
    # batches verified before the failing one may have been published; never the leaking one
    assert not any(b"Roe^Rick" in data for data in _tree_bytes(out).values())
    staged = tmp_path / ".out.staging"
    assert not staged.exists() or not any(b"Roe^Rick" in d for d in _tree_bytes(staged).values())


def _worker_pids(client) -> list[int]:
    return list(client.run(os.getpid).values())


@pytest.mark.slow
def test_worker_killed_mid_run_one_row_per_file(served_bundle, mixed, tmp_path, client, executor):
    from medsight import progress
    from medsight.cluster import predict_files
    from medsight.predict import Predictor

    files = mixed["files"] * 2  # the same files twice: each gets its own row
    killed = []

    class KillOnFirstRow:
        def start(self, key, description, total):
            pass

        def advance(self, key, amount):
            if not killed:
                pid = _worker_pids(client)[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        def finish(self, key):
            pass

    out = tmp_path / "rows.jsonl"
    with progress.using(KillOnFirstRow()):
        st = predict_files(served_bundle, files, out, executor=executor, batch_size=1)
    client.wait_for_workers(2, timeout=60)
    assert killed and killed[0] not in _worker_pids(client)
    rows = _jsonl(out)
    assert len(rows) == st["files"] == len(files)
    _assert_same_predictions(rows, Predictor(served_bundle).predict_paths(files))
    con = sqlite3.connect(str(out) + ".manifest.sqlite")
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT seq) FROM rows").fetchone() == (len(files), len(files))


@pytest.mark.slow
def test_client_killed_and_rerun_gives_the_rows_of_an_uninterrupted_run(served_bundle, mixed, tmp_path, client):
    from medsight.cli import main

    address = client.scheduler.address
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    ref = tmp_path / "ref" / "rows.csv"
    ref.parent.mkdir()
    assert main(["--quiet", "predict", str(served_bundle), str(mixed["root"]), "--out", str(ref), "--batch-size", "1",
                 "--cluster", address]) == 1  # 1: the hostile files are rows with an error
    out = tmp_path / "run" / "rows.csv"
    cmd = [sys.executable, "-m", "medsight", "--quiet", "predict", str(served_bundle), str(mixed["root"]), "--out",
           str(out), "--batch-size", "1", "--cluster", address]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = Path(str(out) + ".manifest.sqlite")
    n = _wait_rows(manifest, proc, 3)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # still running: killed mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= n < len(mixed["files"]) and not out.exists()
    rc = subprocess.run(cmd, check=False, env=env, capture_output=True, timeout=300)
    assert rc.returncode == 1, rc.stderr.decode()[-2000:]
    got, want = list(csv.reader(out.open())), list(csv.reader(ref.open()))
    assert len(got) == len(mixed["files"]) + 1 and got == want
    con = sqlite3.connect(str(manifest))
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT seq) FROM rows").fetchone() == (len(mixed["files"]),) * 2
    assert _private(out) and _private(manifest)


def test_local_executor_is_the_default(served_bundle, mixed, tmp_path):
    """The same runner without a cluster: this process, resumable too."""
    from medsight.cluster import predict_files
    from medsight.predict import Predictor

    st = predict_files(served_bundle, mixed["files"][:6], tmp_path / "r.jsonl")
    assert st["executor"] == "local" and st["done_now"] == 6
    _assert_same_predictions(_jsonl(tmp_path / "r.jsonl"), Predictor(served_bundle).predict_paths(mixed["files"][:6]))


@pytest.mark.slow
def test_a_file_that_kills_its_workers_becomes_one_error_row(executor, client):
    """A batch that keeps killing workers is split until the culprit is alone; that item gets the on_lost result,
    every other item its own result, and the run goes on."""

    def work(batch):  # defined here, so it travels by value to the workers
        if "poison" in batch:
            os._exit(1)  # as a decoder crash would
        return [(x, "ok") for x in batch]

    got = []
    for _, result in executor.map(work, [["a", "poison"], ["b", "c"]], on_lost=lambda x: [(x, "lost")]):
        got += result
    client.wait_for_workers(2, timeout=60)
    assert sorted(got) == [("a", "ok"), ("b", "ok"), ("c", "ok"), ("poison", "lost")]
    with pytest.raises(MedsightError, match="kept stopping the Dask workers"):
        list(executor.map(work, [["poison"]]))
    client.wait_for_workers(2, timeout=60)


def test_cli_deid_and_qc_on_cluster(breast, tmp_path, client, capsys, monkeypatch):
    from medsight.cli import main

    src = _deid_tree(tmp_path, np.asarray(breast.splits["test"].images[:6]).reshape(6, 28, 28))
    address = client.scheduler.address
    out = tmp_path / "out"
    assert main(["deid", str(src), str(out), "--cluster", address]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a secret (--secret-env)" in err and not out.exists()
    monkeypatch.setenv("DEID_SECRET", "s3cret")
    assert main(["deid", str(src), str(out), "--secret-env", "DEID_SECRET", "--cluster", address]) == 1
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "de-identified 4 files" in text and "1 errors" in text and "error: garbage.dcm: " in text
    assert "2 held back" in text and "8 files in" in text  # the status line: files, time, rate, workers
    assert stat.S_IMODE(out.stat().st_mode) == 0o700 and len([p for p in out.rglob("*") if p.is_file()]) == 4
    # qc: one row per file beside the report; --cluster without --out is refused in one line
    assert main(["qc", str(src), "--layout", "raw", "--cluster", address]) == 2
    assert "needs --out" in capsys.readouterr().err
    rows = tmp_path / "qc.csv"
    assert main(["qc", str(src), "--layout", "raw", "--out", str(rows), "--cluster", address]) == 1  # 1 unreadable
    got = list(csv.DictReader(rows.open()))
    assert len(got) == 7 and sum(r["readable"] == "False" for r in got) == 1  # README.txt is skipped, not a row


def _wait_rows(manifest: Path, proc, at_least: int, timeout: float = 120) -> int:
    """Poll the manifest (read-only) until it holds ``at_least`` finished rows or ``proc`` ends."""
    n, deadline = 0, time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists():
            try:
                n = sqlite3.connect(f"file:{manifest}?mode=ro", uri=True, timeout=5).execute(
                    "SELECT COUNT(*) FROM rows WHERE published=1").fetchone()[0]
            except sqlite3.OperationalError:
                n = 0  # the tables are being created
            if n >= at_least:
                break
        time.sleep(0.01)
    return n


@pytest.mark.slow
def test_scheduler_killed_and_rerun_one_row_per_file(served_bundle, mixed, tmp_path):
    """`dask scheduler` + `dask worker` as a real deployment runs them; the scheduler is killed mid-run: the client
    stops with one line, keeps its rows, and the same command against a restarted scheduler finishes the rest."""
    from medsight.predict import Predictor
    from tests._subproc import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    address = f"tcp://127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    procs: list = []

    def start(*args):
        procs.append(subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        return procs[-1]

    def cluster():
        s = start("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", port, "--dashboard-address",
                  "127.0.0.1:0")
        start("distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
              "--dashboard-address", "127.0.0.1:0")
        return s

    out = tmp_path / "rows.csv"
    cmd = [sys.executable, "-m", "medsight", "--quiet", "predict", str(served_bundle), str(mixed["root"]), "--out",
           str(out), "--batch-size", "1", "--cluster", address]
    try:
        scheduler = cluster()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        n = _wait_rows(Path(str(out) + ".manifest.sqlite"), proc, 3)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        scheduler.kill()
        scheduler.wait()
        assert proc.wait(timeout=120) == 2
        err = proc.stderr.read().decode().strip()
        assert len(err.splitlines()) == 1 and "re-run the same command" in err and "Traceback" not in err
        assert 3 <= n < len(mixed["files"]) and not out.exists()
        cluster()
        rc = subprocess.run(cmd, check=False, env=env, capture_output=True, timeout=300)
        assert rc.returncode == 1, rc.stderr.decode()[-2000:]  # 1: the hostile files are rows with an error
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rows = list(csv.DictReader(out.open()))
    local = Predictor(served_bundle).predict_paths(mixed["files"])
    assert [r["file"] for r in rows] == [p.file for p in local]
    for r, p in zip(rows, local):
        assert (r["error"] or None) == p.error
        if p.ok:
            assert abs(float(r["p_malignant"]) - p.probabilities["malignant"]) <= 1e-6


def test_worker_refuses_a_bundle_that_differs_from_the_clients(served_bundle):
    from medsight.executor import bundle_fingerprint, cached_predictor

    sha = bundle_fingerprint(served_bundle)
    p = cached_predictor(str(served_bundle), sha)
    assert cached_predictor(str(served_bundle), sha) is p  # loaded once per worker process
    with pytest.raises(MedsightError, match=r"has bundle.json sha256 [0-9a-f]{12}, the client's has 000000000000: "
                                            "every worker must see the same bundle"):
        cached_predictor(str(served_bundle), "0" * 64)


def test_deid_killed_while_publishing_a_batch_redoes_it(breast, tmp_path, monkeypatch):
    """A kill between recording a batch's rows and publishing its files: the re-run drops the unpublished rows,
    de-identifies those files again (same secret: same bytes, same paths) and ends with the local run's output."""
    from medsight.cluster import deid_files
    from medsight.data.deid import deidentify

    src = _deid_tree(tmp_path, np.asarray(breast.splits["test"].images[:9]).reshape(9, 28, 28))
    deidentify(src, tmp_path / "local", secret="s3cret", mapping_csv=tmp_path / "map_local.csv")
    out = tmp_path / "out"
    real_replace, moved = os.replace, []

    def replace(a, b):
        if str(b).startswith(str(out) + os.sep):
            moved.append(b)
            if len(moved) == 4:  # the second file of the second published batch
                raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        deid_files(src, out, secret="s3cret", batch_size=3, mapping_csv=tmp_path / "map.csv")
    monkeypatch.setattr(os, "replace", real_replace)
    con = sqlite3.connect(str(tmp_path / "out.manifest.sqlite"))
    assert con.execute("SELECT COUNT(*) FROM rows WHERE published=0").fetchone()[0] > 0
    con.close()
    summary = deid_files(src, out, secret="s3cret", batch_size=3, mapping_csv=tmp_path / "map.csv")
    assert summary["done_before"] > 0
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "local")
    assert (tmp_path / "map.csv").read_text() == (tmp_path / "map_local.csv").read_text()
