"""Hostile network input at the node's Storage SCP: each refused with one log line, the node still serving."""

from __future__ import annotations

import io
import logging
import socket
import struct
import sys
import time
from pathlib import Path

import pydicom
import pytest
from nodekit import make_series

pytestmark = pytest.mark.realdata  # BreastMNIST images and a bundle trained on them

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _subproc import free_port  # noqa: E402 (after the sys.path line)


@pytest.fixture
def scp(tmp_path, served_bundle):
    from medsight.node.config import parse_config
    from medsight.node.service import Node

    raw = {"ae_title": "MEDSIGHT", "workdir": str(tmp_path / "node"), "listen": {"host": "127.0.0.1", "port": free_port()},
           "allowed_calling_aets": ["PUSHER"], "max_instance_mb": 4, "metrics": {"port": free_port()},
           "pacs": {"dimse": {"host": "127.0.0.1", "port": 1, "ae_title": "NOWHERE"}}, "send": "dimse",
           "routes": [{"name": "breast", "bundle": str(served_bundle)}]}
    node = Node(parse_config(raw, tmp_path), worker=False).start()
    yield node
    node.stop()


def _assoc(port: int, calling: str = "PUSHER"):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="MEDSIGHT")


def _alive(node, breast) -> None:
    """A C-ECHO and a valid C-STORE from an allowed AE still succeed."""
    a = _assoc(node.scp.port)
    assert a.is_established
    assert a.send_c_echo().Status == 0
    (s,) = make_series(breast.splits["test"].images[:1], 1)
    status = a.send_c_store(pydicom.dcmread(io.BytesIO(s["files"][0])))
    a.release()
    assert status.Status == 0
    assert node.wl.instances(s["series"])


def _raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        try:
            return sock.recv(100)
        except (TimeoutError, ConnectionResetError):
            return b""


def _new_lines(caplog, before: int) -> list[str]:
    time.sleep(0.5)  # the acceptor thread logs after the peer sees the refusal
    return [r.getMessage() for r in caplog.records[before:] if r.name == "medsight.node" and r.levelno >= logging.WARNING]


def test_hostile_input_refused_one_line_each_node_alive(scp, breast, caplog):
    caplog.set_level(logging.INFO, logger="medsight.node")
    port = scp.scp.port

    n = len(caplog.records)
    a = _assoc(port, calling="EVIL")
    assert not a.is_established
    lines = _new_lines(caplog, n)
    assert len(lines) == 1 and "'EVIL' is not allowed" in lines[0], lines

    n = len(caplog.records)
    _raw(port, b"\xff\x00garbage-garbage-garbage" * 8)
    lines = _new_lines(caplog, n)
    assert len(lines) == 1 and "garbage PDU" in lines[0], lines

    n = len(caplog.records)
    _raw(port, struct.pack(">BBL", 0x01, 0, 0x80000000) + b"\0" * 64)  # A-ASSOCIATE-RQ declaring 2 GiB
    lines = _new_lines(caplog, n)
    assert len(lines) == 1 and "declared PDU length 2147483648" in lines[0], lines

    n = len(caplog.records)
    (s,) = make_series(breast.splits["test"].images[:1], 1)
    ds = pydicom.dcmread(io.BytesIO(s["files"][0]))
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # truncated dataset
    a = _assoc(port)
    status = a.send_c_store(ds)
    a.release()
    assert status.Status == 0xC210
    lines = _new_lines(caplog, n)
    assert len(lines) == 1 and "truncated pixel data" in lines[0], lines
    assert not scp.wl.instances(s["series"])

    _alive(scp, breast)
    assert scp.refused == 4
    import requests

    metrics = requests.get(f"http://127.0.0.1:{scp.metrics_port}/metrics", timeout=10).text
    assert "medsight_node_refused_total 4" in metrics and 'medsight_node_jobs{state="received"} 1' in metrics
    # no UIDs or patient data in any line the node logged
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("medsight"))
    assert s["series"] not in text and "Test^Patient" not in text and "PID-NODE-1" not in text
