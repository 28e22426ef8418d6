"""The worklist, config and result builders without a PACS (fast)."""

from __future__ import annotations

import io
import stat
import struct
from types import SimpleNamespace

import pydicom
import pytest

from medsight.errors import ConfigError
from medsight.node.worklist import QuotaExceeded, Worklist


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _wl(tmp_path, clock=None, **kw) -> Worklist:
    return Worklist(tmp_path / "w" / "worklist.sqlite", tmp_path / "w" / "store", clock=clock or Clock(), **kw)


def _recv(wl, sop="1.2.3.1", series="1.2.3", data=b"x" * 100, routes=(("r", "v1"),)):
    return wl.receive(data, study_uid="1.2", series_uid=series, sop_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                      routes=list(routes))


def test_states_unique_jobs_history_and_cleaning(tmp_path):
    clock = Clock()
    wl = _wl(tmp_path, clock)
    assert _recv(wl) == "new"
    assert _recv(wl) == "duplicate"
    assert _recv(wl, sop="1.2.3.2") == "new"
    assert wl.counts()["received"] == 1  # one job per (series, bundle version)
    assert wl.promote(5.0) == 0  # not stable yet
    clock.t += 6
    assert wl.promote(5.0) == 1 and wl.counts()["queued"] == 1
    job = wl.claim()
    assert job is not None and job.attempts == 1 and wl.claim() is None
    assert len(wl.instances("1.2.3")) == 2
    wl.sent(job.id, infer_s=0.1)
    assert wl.clean() == 2 and wl.store_bytes() == 0
    assert not [p for p in (tmp_path / "w" / "store").rglob("*") if p.is_file()]
    assert _recv(wl) == "done"  # sent again after its result: no second job, not kept
    assert _recv(wl, routes=[("r", "v2")]) == "new"  # a new bundle version: a new job
    assert wl.counts() == {"received": 1, "queued": 0, "running": 0, "sent": 1, "failed": 0}
    assert [h[1] for h in wl.history(job.id)] == ["received", "queued", "running", "sent"]


def test_backoff_then_failed_after_max_attempts(tmp_path):
    clock = Clock()
    wl = _wl(tmp_path, clock, max_attempts=4, backoff_s=2.0, backoff_max_s=5.0)
    _recv(wl)
    wl.promote(0)
    delays = []
    for _ in range(3):
        job = wl.claim()
        delays.append(wl.retry(job.id, "PACS down"))
        assert wl.claim() is None  # not due before the backoff
        clock.t += delays[-1]
    assert delays == [2.0, 4.0, 5.0]
    job = wl.claim()
    assert wl.retry(job.id, "PACS down") is None
    assert wl.counts()["failed"] == 1
    assert wl.last_errors(1)[0]["error"] == "PACS down"


def test_lease_expiry_and_restart_reclaim(tmp_path):
    clock = Clock()
    wl = _wl(tmp_path, clock, lease_s=10)
    _recv(wl)
    wl.promote(0)
    job = wl.claim()
    assert wl.reclaim() == 0
    clock.t += 11
    assert wl.reclaim() == 1 and wl.counts()["queued"] == 1
    job2 = wl.claim()
    assert job2.id == job.id and job2.attempts == 2
    wl.close()
    wl = _wl(tmp_path, clock)  # a restart: every running job goes back
    assert wl.reclaim(everything=True) == 1


def test_quota_and_private_files(tmp_path):
    wl = _wl(tmp_path, quota_bytes=250)
    _recv(wl, sop="1.1")
    _recv(wl, sop="1.2")
    with pytest.raises(QuotaExceeded):
        _recv(wl, sop="1.3")
    for p in (tmp_path / "w").rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
    # no UIDs in file names
    assert not [p for p in (tmp_path / "w" / "store").rglob("*") if "1.2.3" in p.name]


def test_config_credentials_and_errors(tmp_path, monkeypatch):
    from medsight.node.config import parse_config

    base = {"routes": [{"name": "a", "bundle": "b"}], "send": "dicomweb",
            "pacs": {"dicomweb": {"url": "https://pacs.example/dicom-web", "username": "u",
                                  "password_env": "NODE_PW"}}}
    monkeypatch.setenv("NODE_PW", "hunter2-secret")
    cfg = parse_config(base, tmp_path)
    assert cfg.dicomweb.password == "hunter2-secret" and cfg.dicomweb.verify_tls is True
    assert "hunter2" not in repr(cfg)
    (tmp_path / "pw").write_text("from-file\n")
    cfg = parse_config({**base, "pacs": {"dicomweb": {"url": "https://p/x", "password_file": str(tmp_path / "pw")}}})
    assert cfg.dicomweb.password == "from-file"
    bad = [({**base, "pacs": {"dicomweb": {"url": "https://p/x", "password": "inline"}}}, "may not be written"),
           ({**base, "pacs": {"dicomweb": {"url": "https://u:p@p/x"}}}, "credentials may not be part of the URL"),
           ({**base, "bogus": 1}, "unknown key"),
           ({**base, "routes": []}, "routes is empty"),
           ({**base, "listen": {"port": 1104}}, "allowed_calling_aets is empty"),
           ({**base, "ae_title": "X" * 17}, "not an AE title")]
    for raw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            parse_config(raw, tmp_path)
    monkeypatch.delenv("NODE_PW")
    with pytest.raises(ConfigError, match="NODE_PW"):
        parse_config(base, tmp_path)


def test_route_matching():
    from medsight.node.config import Route

    r = Route("chest", bundle=None, modality=["CR", "DX"], body_part=["CHEST"], series_description="(?i)pa",
              sop_class=[])
    assert r.matches({"Modality": "dx", "BodyPartExamined": "CHEST", "SeriesDescription": "Chest PA"})
    assert not r.matches({"Modality": "CT", "BodyPartExamined": "CHEST", "SeriesDescription": "PA"})
    assert not r.matches({"Modality": "CR", "BodyPartExamined": "CHEST", "SeriesDescription": "lateral"})


def test_result_uids_are_deterministic_and_review_adapter():
    from medsight.node.results import result_uid, review_of

    a = result_uid("1.2.3", "m-abc", "sr")
    assert a == result_uid("1.2.3", "m-abc", "sr") and a.startswith("2.25.")
    assert len({a, result_uid("1.2.3", "m-abd", "sr"), result_uid("1.2.4", "m-abc", "sr"),
                result_uid("1.2.3", "m-abc", "sc")}) == 4
    # the SR carries medsight.review's decision as the Prediction holds it, reasons unchanged
    assert review_of(SimpleNamespace(review=True, review_reasons=["too close to call"], ood_flag=False)) == \
        (True, ["too close to call"])
    assert review_of(SimpleNamespace(review=False, review_reasons=[], ood_flag=False)) == (False, [])


@pytest.mark.realdata
def test_check_instance_refuses_broken_input(breast):
    from nodekit import make_series

    from medsight.node.transport import BadInstance, check_instance

    (s,) = make_series(breast.splits["test"].images[:1], 1)
    good = s["files"][0]
    assert check_instance(good, 1 << 20).SeriesInstanceUID == s["series"]
    for data, msg in [(good[: len(good) - 300], "truncated"), (b"\0" * 200, "not a readable"),
                      (good, "above the limit")]:
        with pytest.raises(BadInstance, match=msg):
            check_instance(data, 1 << 20 if msg != "above the limit" else 100)
    at = good.rfind(b"\xe0\x7f\x10\x00")  # before the pixel data: an OB element declaring ~2 GiB, 50 bytes given
    huge = good[:at] + struct.pack("<HH2sHI", 0x7FDF, 0x0010, b"OB", 0, 0x7FFFFFF0) + b"\1" * 50
    with pytest.raises(BadInstance, match="declares 2147483632 bytes, 50 present"):
        check_instance(huge, 1 << 20)
    ds = pydicom.dcmread(io.BytesIO(good))
    ds.SeriesInstanceUID = "1.2.abc"
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(BadInstance, match="SeriesInstanceUID"):
        check_instance(buf.getvalue(), 1 << 20)


def test_cli_status_and_bad_config(tmp_path, capsys):
    import yaml

    from medsight.cli import main
    from medsight.node.service import metrics_text

    wl = Worklist(tmp_path / "node" / "worklist.sqlite", tmp_path / "node" / "store")
    _recv(wl)
    _recv(wl, series="1.2.4", sop="1.2.4.1")
    wl.promote(0)
    job = wl.claim()
    wl.retry(job.id, "DICOMweb STOW-RS failed: HTTP 503")
    text = metrics_text(wl)
    assert 'medsight_node_jobs{state="queued"} 2' in text and "medsight_node_store_bytes 200" in text
    wl.close()
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"workdir": str(tmp_path / "node"), "routes": [{"name": "a", "bundle": "b"}],
                                   "send": "dimse", "pacs": {"dimse": {"host": "h", "port": 1, "ae_title": "P"}}}))
    assert main(["node", "status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "queued 2" in out and "HTTP 503" in out and "1.2.3" not in out
    assert main(["node", "status", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot read node config" in err and len(err.strip().splitlines()) == 1


def test_node_usage_errors_one_line_exit_2(capsys):
    from medsight.cli import main

    for argv in (["node", "run", "--confg", "x.yaml"], ["node", "status"], ["node", "export", "--config"],
                 ["node", "nope"]):
        assert main(argv) == 2, argv
        cap = capsys.readouterr()
        lines = cap.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], (argv, cap.err)
        assert "Traceback" not in cap.err + cap.out


def test_route_may_match_before_retrieval():
    from medsight.node.config import Route

    r = Route("chest", bundle=None, modality=["CR"], series_description="(?i)pa")
    assert r.may_match({"modality": "CR", "description": "PA"})
    assert r.may_match({"modality": None, "description": None})  # not returned by the PACS: retrieve and see
    assert not r.may_match({"modality": "SR", "description": "medsight chest SR"})
    assert not r.may_match({"modality": "CR", "description": "lateral"})
