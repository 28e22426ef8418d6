"""The service without HTTP (``Service``'s handlers), its admission rule, and the connection-level limits of
``medsight.serve.server``: slow uploads hold no slot, 64 concurrent clients wait instead of getting 503, a
half-sent header is closed, descriptor exhaustion is one log line."""

from __future__ import annotations

import errno
import io
import logging
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from medsight.predict import Predictor
from medsight.serve.app import (
    DEFAULT_QUEUE,
    Admission,
    Service,
    UploadError,
    create_app,
)
from medsight.serve.server import install_loop_handler, server_config


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _form(name: str, data: bytes, boundary: str = "b0undary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def predictor(served_bundle):
    return Predictor(served_bundle, backend="torch")


@pytest.fixture(scope="module")
def service(predictor):
    return Service(predictor, workers=1)


# --- handlers without HTTP ----------------------------------------------------------------------------------

def test_infer_is_the_predictors_answer_with_its_review(service, predictor, breast_files):
    for f in breast_files["png"][:4] + breast_files["dcm"][:2]:
        data = f.read_bytes()
        body = service.infer(data, f.name, rid="r1")
        ref = predictor.predict_bytes(data, f.name)
        assert body["request_id"] == "r1"
        for k in ("probabilities", "predicted", "decision", "threshold", "ood_flag", "review", "review_reasons",
                  "positive_class", "model_version", "calibrated"):
            assert body[k] == ref.to_dict()[k], (f.name, k)


def test_infer_explain_images_come_from_the_predictor(service, breast_files):
    body = service.infer(breast_files["png"][0].read_bytes(), "x.png", explain=True)
    for k in ("heatmap_png", "colormap_png", "image_png", "display_png", "display_heatmap_png", "colorbar_png"):
        assert isinstance(body[k], str) and len(body[k]) > 50, k
    assert body["display_size"] == [28, 28]


def test_infer_refusals_are_one_line_4xx(service):
    with pytest.raises(UploadError) as e:
        service.infer(b"this is not an image at all", "notes.txt")
    assert e.value.status == 415 and "\n" not in e.value.detail
    with pytest.raises(UploadError) as e:
        service.infer(_png(np.zeros((8, 8)))[:40], "cut.png")  # a PNG signature, then nothing
    assert e.value.status == 422 and "cut.png" in e.value.detail


def test_parse_check_length_health_and_model_info(service, predictor):
    body, ctype = _form("a.png", b"\x89PNG....")
    assert service.parse(body, ctype)[:2] == ("a.png", b"\x89PNG....")
    with pytest.raises(UploadError, match="empty"):
        service.parse(*_form("e.png", b""))
    for cl, status in (("12x", 400), (str(10**12), 413)):
        with pytest.raises(UploadError) as e:
            service.check_length(cl)
        assert e.value.status == status
    service.check_length(None)
    h = service.health()
    assert h.busy == 0 and h.receiving == 0 and h.capacity == 1 + DEFAULT_QUEUE
    m = service.model_info()
    assert m.model_version == predictor.version and m.review.margin == predictor.review_rule.margin
    assert m.threshold_display == "0.5" and m.review.rule == "logit_margin"


# --- admission ----------------------------------------------------------------------------------------------

def test_admission_refuses_only_when_the_wait_would_pass_the_deadline():
    gate = Admission(2, 100)
    try:
        gate._ewma = 1.0  # one second per job
        admitted = [gate.try_enter(deadline_s=10.0) for _ in range(22)]
        assert admitted == [None] * 22  # the last has 20 jobs ahead on 2 workers: 10 s, within the deadline
        why = gate.try_enter(deadline_s=10.0)
        assert why is not None and "expected wait of 10.5 s passes the 10 s deadline" in why
        err = gate.busy(why)
        assert err.status == 503 and int(err.headers["Retry-After"]) >= 1
        gate.active = gate.capacity
        assert "already admitted" in gate.try_enter(deadline_s=1e9)
    finally:
        gate.shutdown()


def test_64_concurrent_valid_requests_get_no_503_with_the_defaults(served_bundle, predictor, breast_files):
    from fastapi.testclient import TestClient

    app = create_app(served_bundle, predictor=predictor)  # default workers (the cores) and queue
    assert app.state.admission.capacity >= 64
    c = TestClient(app)
    data = breast_files["png"][0].read_bytes()
    statuses: list[int] = []
    lock = threading.Lock()
    go = threading.Barrier(64)

    def client():
        go.wait()
        r = c.post("/v1/predict", files={"file": ("x.png", data, "image/png")})
        with lock:
            statuses.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [200] * 64, sorted(set(statuses))


# --- a real server ------------------------------------------------------------------------------------------

class _Served:
    def __init__(self, app, **kw):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, **kw))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        end = time.time() + 30
        while not self.server.started:
            assert time.time() < end
            time.sleep(0.01)
        return self

    def __exit__(self, *a):
        self.server.should_exit = True
        self.thread.join(10)


def test_six_slow_uploads_do_not_block_prediction(served_bundle, predictor, breast_files):
    import httpx

    app = create_app(served_bundle, predictor=predictor, workers=1, queue=0, body_timeout_s=30)  # ONE slot
    data = breast_files["png"][0].read_bytes()
    with _Served(app) as srv:
        slow = []
        for _ in range(6):  # headers and the start of a body, then silence
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                      b"boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\nContent-Disposition: form-data; "
                      b"name=\"file\"; filename=\"a.png\"\r\n\r\n\x89PNG")
            slow.append(s)
        end = time.time() + 10
        while app.state.service.receiving < 6:
            assert time.time() < end, app.state.service.receiving
            time.sleep(0.01)
        try:
            for _ in range(3):
                r = httpx.post(f"http://127.0.0.1:{srv.port}/v1/predict", files={"file": ("x.png", data)}, timeout=10)
                assert r.status_code == 200, r.text
            h = httpx.get(f"http://127.0.0.1:{srv.port}/healthz", timeout=5).json()
            assert h["receiving"] == 6 and h["busy"] == 0
        finally:
            for s in slow:
                s.close()


def test_half_sent_header_is_closed_after_the_header_timeout(served_bundle, predictor):
    import httpx

    app = create_app(served_bundle, predictor=predictor, workers=1, queue=0)
    with _Served(app, header_timeout_s=0.5) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the server, not by our 5 s socket timeout
        assert time.monotonic() - t0 < 4
        s.close()
        # a connection that sends its header in time is served, and kept alive past the header timeout
        with httpx.Client() as c:
            assert c.get(f"http://127.0.0.1:{srv.port}/healthz").status_code == 200
            time.sleep(0.8)
            assert c.get(f"http://127.0.0.1:{srv.port}/healthz").status_code == 200


def test_descriptor_exhaustion_is_one_line_without_a_traceback(caplog):
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        handler = install_loop_handler(loop, every_s=60)
        with caplog.at_level(logging.ERROR, logger="medsight.serve"):
            for _ in range(500):
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(errno.EMFILE, "Too many open files")})
        lines = [r for r in caplog.records if r.name == "medsight.serve"]
        assert len(lines) == 1 and not lines[0].exc_info and "EMFILE" in lines[0].getMessage()
        assert handler.suppressed == 499
    finally:
        loop.close()


def test_a_bundle_from_before_the_rule_gets_the_stated_default(served_bundle, breast_files, tmp_path):
    """bundle.json without ``review`` (written before the rule existed): the default margin ln 2, said so."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(served_bundle, old)
    meta = json.loads((old / "bundle.json").read_text())
    del meta["review"]
    # as the last release wrote it: medsight-bundle/1, without the integrity manifest (a hand edit of a sealed
    # bundle would be refused)
    del meta["integrity"], meta["schema_version"]
    meta["format"] = "medsight-bundle/1"
    (old / "bundle.json").write_text(json.dumps(meta))
    svc = Service(Predictor(old, backend="torch"), workers=1)
    info = svc.model_info()
    assert info.review.fitted is False and info.review_margin == pytest.approx(np.log(2))
    assert "default margin ln 2" in info.review.description
    body = svc.infer(breast_files["png"][0].read_bytes(), "x.png")
    assert isinstance(body["review"], bool) and all("review margin 0.69" in r for r in body["review_reasons"]
                                                    if "too close" in r)


def test_idle_connection_flood_evicts_the_oldest_idle_and_health_answers(served_bundle, predictor):
    import httpx

    app = create_app(served_bundle, predictor=predictor, workers=1, queue=0)
    with _Served(app, connections=8, header_timeout_s=30) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(30)]
        try:
            t0 = time.monotonic()
            assert httpx.get(f"http://127.0.0.1:{srv.port}/healthz", timeout=10).status_code == 200
            assert time.monotonic() - t0 < 5  # not after the 30 s header timeout
            assert idle[0].recv(10) == b""  # the oldest idle connection was closed by the server
            assert len(srv.server.server_state.connections) <= 8
        finally:
            for s in idle:
                s.close()
