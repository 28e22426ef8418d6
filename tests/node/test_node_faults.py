"""Faults against a real Orthanc: kill -9 of the node mid-batch, the PACS down for a while, the same instances
sent twice, a new bundle version; and the push path with dcmtk's storescu."""

from __future__ import annotations

import io
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from nodekit import NODE_AET, make_series, node_config, run_until

pytestmark = pytest.mark.realdata  # BreastMNIST images and a bundle trained on them

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _subproc import env, free_port, medsight_cmd  # noqa: E402 (after the sys.path line)


def _node(tmp_path, raw):
    from medsight.node.config import parse_config
    from medsight.node.service import Node

    return Node(parse_config(raw, tmp_path), worker=False).start()


def _push(port: int, files: list[bytes], calling: str = "PUSHER") -> None:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.network_timeout = 30
    a = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert a.is_established
    try:
        for f in files:
            assert a.send_c_store(pydicom.dcmread(io.BytesIO(f))).Status == 0
    finally:
        a.release()


def _one_result_set(orthanc, series: list[dict]) -> None:
    for s in series:
        res = orthanc.results(s["study"])
        assert (len(res["SR"]), len(res["heatmap"])) == (1, 1), (s["study"], {k: len(v) for k, v in res.items()})


def _sent(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT COUNT(*) FROM jobs WHERE state='sent'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def _kill9_batch(tmp_path, orthanc, served_bundle, breast, n_series: int):
    port = free_port()
    raw = node_config(tmp_path, served_bundle, orthanc, port=port, stable_age_s=1.0, lease_s=60)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    series = make_series(breast.splits["test"].images, n_series)
    db = tmp_path / "node" / "worklist.sqlite"

    def start():
        with open(tmp_path / "node.log", "ab") as logs:
            p = subprocess.Popen(medsight_cmd("node", "run", "--config", str(cfg)), env=env(), stdout=logs,
                                 stderr=logs)
        deadline = time.time() + 90
        while time.time() < deadline:
            assert p.poll() is None, (tmp_path / "node.log").read_text()
            try:
                socket_ok = __import__("socket").create_connection(("127.0.0.1", port), timeout=1)
                socket_ok.close()
                return p
            except OSError:
                time.sleep(0.2)
        raise AssertionError("node did not listen")

    proc = start()
    try:
        for s in series:
            _push(port, s["files"])
        deadline = time.time() + 120
        while _sent(db) < max(1, n_series // 3):  # kill -9 part-way through the batch
            assert time.time() < deadline, (tmp_path / "node.log").read_text()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed_at = _sent(db)
        assert killed_at < n_series
        proc = start()
        deadline = time.time() + 240
        while _sent(db) < n_series:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "node.log").read_text()
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
    _one_result_set(orthanc, series)
    con = sqlite3.connect(db)
    jobs = con.execute("SELECT series_uid, state FROM jobs").fetchall()
    con.close()
    assert sorted(j[0] for j in jobs) == sorted(s["series"] for s in series)
    assert {j[1] for j in jobs} == {"sent"}
    assert not [p for p in (tmp_path / "node" / "store").rglob("*") if p.is_file()]


def test_kill9_mid_batch_then_restart_one_result_set_each(tmp_path, orthanc, served_bundle, breast):
    _kill9_batch(tmp_path, orthanc, served_bundle, breast, 12)


@pytest.mark.slow
def test_kill9_mid_batch_of_50(tmp_path, orthanc, served_bundle, breast):
    _kill9_batch(tmp_path, orthanc, served_bundle, breast, 50)


def test_pacs_down_retries_then_results_arrive(tmp_path, orthanc, served_bundle, breast):
    port = free_port()
    node = _node(tmp_path, node_config(tmp_path, served_bundle, orthanc, port=port))
    try:
        series = make_series(breast.splits["test"].images, 3)
        for s in series:
            _push(port, s["files"])
        orthanc.stop()
        deadline = time.time() + 30
        while not (node.wl.jobs() and all(j["attempts"] >= 2 and j["state"] == "queued" for j in node.wl.jobs())):
            node.step()
            assert time.time() < deadline, node.wl.jobs()
            time.sleep(0.05)
        assert all("DICOMweb STOW-RS failed" in j["last_error"] for j in node.wl.jobs())
        assert node.wl.counts()["sent"] == 0
        orthanc.start()
        run_until(node, lambda: node.wl.counts()["sent"] == 3)
        hist = node.wl.history(node.wl.jobs()[0]["id"])
        assert [h[1] for h in hist][:3] == ["received", "queued", "running"] and hist[-1][1] == "sent"
        assert any(h[2] and h[2].startswith("retry in") for h in hist)
    finally:
        node.stop()
    _one_result_set(orthanc, series)


def _retrained(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` with slightly different weights (a new version), hashes rewritten."""
    import json

    import torch

    from medsight.bundle import load_bundle, save_weights, write_meta

    shutil.copytree(bundle, out)
    b = load_bundle(out)
    with torch.no_grad():
        for prm in b.model.parameters():
            prm.add_(0.01)
    save_weights(out, b.model)
    write_meta(out, json.loads((out / "bundle.json").read_text()))
    return out


def test_resent_instances_one_result_set_new_version_new_results(tmp_path, orthanc, served_bundle, breast):
    port = free_port()
    raw = node_config(tmp_path, served_bundle, orthanc, port=port)
    series = make_series(breast.splits["test"].images, 2, per_series=2)
    node = _node(tmp_path, raw)
    try:
        for s in series:
            _push(port, s["files"])
            _push(port, s["files"])  # the same instances again before the series completes
        run_until(node, lambda: node.wl.counts()["sent"] == 2)
        for s in series:
            _push(port, s["files"])  # ... and after its results were sent
        for _ in range(20):
            node.step()
        assert node.wl.counts() == {"received": 0, "queued": 0, "running": 0, "sent": 2, "failed": 0}
        v1 = node.loaded["breast"].version
    finally:
        node.stop()
    _one_result_set(orthanc, series)

    # a new bundle version of the same route (retrained weights): new results, the old ones kept
    bundle2 = _retrained(served_bundle, tmp_path / "bundle2")
    raw["routes"][0]["bundle"] = str(bundle2)
    node = _node(tmp_path, raw)
    try:
        assert node.loaded["breast"].version != v1
        for s in series:
            _push(port, s["files"])
        run_until(node, lambda: node.wl.counts()["sent"] == 4)
    finally:
        node.stop()
    from medsight.node.results import read_sr

    for s in series:
        res = orthanc.results(s["study"])
        assert len(res["SR"]) == 2 and len(res["heatmap"]) == 2
        versions = {read_sr(pydicom.dcmread(io.BytesIO(b)))["Algorithm Version"] for b in res["SR"]}
        assert versions == {v1, node.loaded["breast"].version}


def test_push_with_storescu_results_reach_orthanc(tmp_path, orthanc, served_bundle, breast):
    storescu = shutil.which("storescu")
    if storescu is None:
        pytest.fail("dcmtk's storescu is not installed (apt-get install dcmtk)")
    port = free_port()
    node = _node(tmp_path, node_config(tmp_path, served_bundle, orthanc, port=port, send="dimse"))
    try:
        (s,) = make_series(breast.splits["test"].images, 1, per_series=3)
        files = []
        for i, b in enumerate(s["files"]):
            files.append(tmp_path / f"in{i}.dcm")
            files[-1].write_bytes(b)
        r = subprocess.run([storescu, "-aet", "STORESCU", "-aec", NODE_AET, "127.0.0.1", str(port), *map(str, files)],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        run_until(node, lambda: node.wl.counts()["sent"] == 1)
        p = node.loaded["breast"].predictor
        expected = {str(pydicom.dcmread(f).SOPInstanceUID): p.predict_file(f).to_dict() for f in files}
    finally:
        node.stop()
    from medsight.node.results import read_sr

    res = orthanc.results(s["study"])
    assert len(res["SR"]) == 1 and len(res["heatmap"]) == 1
    got = read_sr(pydicom.dcmread(io.BytesIO(res["SR"][0])))
    assert {g["sources"][0] for g in got["groups"]} == set(expected)
    for g in got["groups"]:
        row = expected[g["sources"][0]]
        assert g["Probability of positive class"] == pytest.approx(row["probabilities"][row["positive_class"]], abs=1e-6)


def test_crash_between_send_and_bookkeeping_resends_the_same_instances(tmp_path, orthanc, served_bundle, breast):
    """The worst moment for kill -9: results stored in the PACS, the worklist not yet told. The redone job
    sends instances with the same UIDs, so Orthanc still holds one result set."""
    port = free_port()
    raw = node_config(tmp_path, served_bundle, orthanc, port=port)
    (s,) = make_series(breast.splits["test"].images, 1)
    node = _node(tmp_path, raw)
    try:
        _push(port, s["files"])

        def crash(*a, **k):
            raise SystemExit("killed")  # stands for the process dying right after STOW-RS returned

        node.wl.sent = crash
        with pytest.raises(SystemExit):
            run_until(node, lambda: False, timeout=30)
        assert node.wl.counts()["running"] == 1
        first = orthanc.results(s["study"])
        assert (len(first["SR"]), len(first["heatmap"])) == (1, 1)
    finally:
        node.stop()
    node = _node(tmp_path, raw)  # restart: the running job is redone
    try:
        run_until(node, lambda: node.wl.counts()["sent"] == 1)
        assert node.wl.jobs()[0]["attempts"] == 2
    finally:
        node.stop()
    again = orthanc.results(s["study"])
    assert (len(again["SR"]), len(again["heatmap"])) == (1, 1)
    assert pydicom.dcmread(io.BytesIO(again["SR"][0])).SOPInstanceUID == \
        pydicom.dcmread(io.BytesIO(first["SR"][0])).SOPInstanceUID
