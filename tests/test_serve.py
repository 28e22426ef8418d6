"""REST service: endpoints, same probabilities as the Predictor, auth, upload limits, and no 5xx for bad input."""

import base64
import io
import logging
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from medsight.bundle import load_bundle
from medsight.evaluate import split_logits
from medsight.serve import create_app

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def client(served_bundle):
    return TestClient(create_app(served_bundle, backend="onnx", workers=2, queue=8))  # 8 concurrent clients fit


@pytest.fixture(scope="module")
def keyed(served_bundle):
    return TestClient(create_app(served_bundle, api_key=KEY, max_upload_mb=1, backend="torch"))


def post(c, data, name="scan.png", ctype="application/octet-stream", **kw):
    return c.post("/v1/predict", files={"file": (name, data, ctype)}, **kw)


def test_health_model_docs_page(client, served_bundle):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["auth_required"] is False and h["model_version"].startswith("simple_cnn-")
    m = client.get("/v1/model").json()
    b = load_bundle(served_bundle)
    assert m["classes"] == b.classes and m["task"] == "binary" and m["name"] == "simple_cnn"
    assert m["input"]["size"] == [28, 28] and m["input"]["preprocessing"] == b.recipe
    assert m["threshold"] == b.threshold and m["temperature"] == b.temperature and m["calibrated"] is (b.temperature != 1.0)
    assert 0 <= m["metrics"]["test"]["auc"] <= 1
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and 'type="file"' in page.text
    for asset in ("app.js", "style.css"):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text


def test_predict_png_and_dicom_match_reference(client, served_bundle, breast, breast_files):
    b = load_bundle(served_bundle)
    ref = b.task.probabilities(split_logits(b, breast, "test"), b.temperature).numpy()
    for i in range(6):
        r = post(client, breast_files["png"][i].read_bytes(), "x.png", "image/png")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["probabilities"][b.classes[1]] == pytest.approx(float(ref[i]), abs=1e-5)
        assert body["predicted"] == b.classes[int(ref[i] >= 0.5)] and body["decision"] == int(ref[i] >= 0.5)
        assert body["calibrated"] is (b.temperature != 1.0) and body["threshold"] == 0.5 and "heatmap_png" not in body
        d = post(client, breast_files["dcm"][i].read_bytes(), "x.dcm", "application/dicom").json()
        assert d["probabilities"] == pytest.approx(body["probabilities"], abs=1e-6)
        assert d["model_version"] == body["model_version"]
        assert r.headers["x-request-id"] == body["request_id"]


def test_explain_returns_png_overlay(client, breast_files):
    from PIL import Image

    r = client.post("/v1/predict?explain=true", files={"file": ("x.dcm", breast_files["dcm"][0].read_bytes())})
    assert r.status_code == 200
    for key in ("heatmap_png", "colormap_png", "image_png"):
        img = Image.open(io.BytesIO(base64.b64decode(r.json()[key])))
        assert img.format == "PNG" and img.size == (28, 28)


def test_api_key(keyed, breast_files):
    data = breast_files["png"][0].read_bytes()
    assert keyed.get("/healthz").json()["auth_required"] is True
    assert keyed.get("/v1/model").status_code == 401
    r = post(keyed, data)
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert post(keyed, data, headers={"X-API-Key": "wrong"}).status_code == 401
    assert post(keyed, data, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(keyed, data, headers={"X-API-Key": KEY}).status_code == 200
    assert post(keyed, data, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert keyed.get("/v1/model", headers={"X-API-Key": KEY}).status_code == 200


def test_upload_too_large_413(keyed):
    h = {"X-API-Key": KEY}
    big = b"\x89PNG" + b"\0" * (2 * 1024 * 1024)
    r = post(keyed, big, headers=h)
    assert r.status_code == 413 and "MB limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the streamed size is checked
        for _ in range(40):
            yield b"x" * 65536

    r = keyed.post("/v1/predict", content=chunks(), headers={**h, "content-type": "multipart/form-data; boundary=abc"})
    assert r.status_code == 413


def test_unsupported_415_and_corrupt_422(client, breast_files):
    png = breast_files["png"][0].read_bytes()
    cases = {
        415: [(b"hello, this is a text file", "notes.txt"), (b"%PDF-1.4 something", "report.pdf")],
        422: [(png[:60], "truncated.png"), (b"", "empty.png"), (b"\xff\xd8\xff\xe0" + b"\0" * 100, "bad.jpg"),
              (b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 5, "bad.dcm"),
              (breast_files["dcm"][0].read_bytes()[:400], "cut.dcm")],
    }
    for status, items in cases.items():
        for data, name in items:
            r = post(client, data, name)
            assert r.status_code == status, (name, r.status_code, r.text)
            detail = r.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail and detail
    r = client.post("/v1/predict", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/v1/predict", files={"image": ("x.png", png)})
    assert r.status_code == 422 and "form field 'file'" in r.json()["detail"]
    r = client.post("/v1/predict", content=b"--abc\r\nbroken", headers={"content-type": "multipart/form-data; boundary=abc"})
    assert r.status_code == 422


def test_wrong_shape_is_422(client):
    import nibabel as nib

    vol = nib.Nifti1Image(np.zeros((3, 4, 5, 6, 7), np.float32), np.eye(4))  # 5D: not an image we can use
    buf = io.BytesIO()
    vol.to_file_map({"image": nib.FileHolder(fileobj=buf), "header": nib.FileHolder(fileobj=buf)})
    r = post(client, buf.getvalue(), "vol.nii")
    assert 400 <= r.status_code < 500


def test_decompression_bomb_refused(client):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")  # 144 Mpixel, a few kB compressed
    r = post(client, buf.getvalue(), "bomb.png")
    assert r.status_code in (413, 422), r.text


def test_every_pydicom_test_file_is_200_or_4xx_and_logs_one_line(client, caplog):
    from pydicom.data import get_testdata_files

    import os

    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    assert len(files) > 50
    statuses = {}
    with caplog.at_level(logging.DEBUG):
        for f in files:
            with open(f, "rb") as fh:
                data = fh.read()
            r = post(client, data, f.rsplit("/", 1)[-1])
            assert r.status_code == 200 or 400 <= r.status_code < 500, (f, r.status_code, r.text)
            if r.status_code != 200:
                assert isinstance(r.json()["detail"], str)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert statuses.get(200, 0) > 10  # many of them are real images
    assert sum(v for k, v in statuses.items() if k >= 400) > 5  # and several are refused (J2K, bombs, broken)
    # a refused file is one access-log line: no tracebacks, no ERROR records from the decoders
    bad = [(r.name, r.levelname) for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert bad == []
    served = [r for r in caplog.records if r.name == "medsight.serve"]
    assert len(served) == len(files) and all("\n" not in r.getMessage() for r in served)


def test_logs_carry_no_identifiers(client, breast_files, tmp_path, caplog):
    from tests.conftest import write_dicom

    img = np.asarray(breast_files["images"][0]).reshape(28, 28)
    dcm = write_dicom(tmp_path / "Smith_John_1970.dcm", img, patient_name="Smith^John", patient_id="MRN-998877")
    with caplog.at_level(logging.DEBUG):
        r = post(client, dcm.read_bytes(), "Smith_John_1970.dcm")
        post(client, b"junk", "Smith_John_1970.txt")
    assert r.status_code == 200
    text = caplog.text
    assert "request_id=" in text and "status=200" in text and "status=415" in text
    for secret in ("Smith", "John", "MRN-998877", "1970"):
        assert secret not in text


def test_no_upload_written_to_disk(client, breast_files, monkeypatch):
    import tempfile

    def forbidden(*a, **k):
        raise AssertionError("upload spooled to disk")

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", forbidden)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", forbidden)
    monkeypatch.setattr(tempfile, "mkstemp", forbidden)
    big = breast_files["png"][0].read_bytes() + b"\0" * (3 * 1024 * 1024)  # > Starlette's 1 MB spool size
    assert post(client, big, "big.png").status_code == 200


def test_concurrent_requests(client, breast_files):
    data = [f.read_bytes() for f in breast_files["png"][:8]]
    ref = [post(client, d).json()["probabilities"] for d in data]
    errors = []

    def worker(k):
        for i in range(10):
            j = (k + i) % len(data)
            r = post(client, data[j], params={"explain": str(i % 3 == 0).lower()})
            if r.status_code != 200 or r.json()["probabilities"] != pytest.approx(ref[j], abs=1e-6):
                errors.append((k, i, r.status_code))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# --- admission control, deadlines, body timeout -------------------------------------------------------------

class _Blocking:
    """Wrap a Predictor so that predict_array waits until ``release`` is set (a busy model)."""

    def __init__(self, pred):
        self.release = threading.Event()
        self.started = threading.Semaphore(0)
        self._orig = pred.predict_array

        def slow(*a, **k):
            self.started.release()
            assert self.release.wait(30), "test never released the predictor"
            return self._orig(*a, **k)

        pred.predict_array = slow


@pytest.fixture
def blocked(served_bundle):
    """An app with 1 worker and a queue of 1 whose model blocks until released."""
    from medsight.predict import Predictor

    pred = Predictor(served_bundle, backend="torch")
    blocker = _Blocking(pred)
    app = create_app(served_bundle, predictor=pred, workers=1, queue=1, deadline_s=20)
    yield app, blocker
    blocker.release.set()


def _wait_for(cond, timeout=10.0):
    import time

    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "condition not reached"
        time.sleep(0.01)


def test_queue_full_is_503_with_retry_after(blocked, breast_files):
    app, blocker = blocked
    c = TestClient(app)
    data = breast_files["png"][0].read_bytes()
    results = []
    threads = [threading.Thread(target=lambda: results.append(post(c, data))) for _ in range(2)]
    for t in threads:
        t.start()
    _wait_for(lambda: app.state.admission.active == 2)  # one running, one queued
    assert blocker.started.acquire(timeout=10)
    r = post(c, data)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["detail"].startswith("server busy") and "\n" not in r.json()["detail"]
    h = c.get("/healthz").json()
    assert h["busy"] == 2 and h["capacity"] == 2
    blocker.release.set()
    for t in threads:
        t.join(30)
    assert [x.status_code for x in results] == [200, 200]
    _wait_for(lambda: app.state.admission.active == 0)
    assert post(c, data).status_code == 200  # the slots came back


def test_deadline_504_when_running_and_503_when_queued(served_bundle, breast_files):
    from medsight.predict import Predictor

    pred = Predictor(served_bundle, backend="torch")
    blocker = _Blocking(pred)
    app = create_app(served_bundle, predictor=pred, workers=1, queue=1, deadline_s=0.5)
    c = TestClient(app)
    data = breast_files["png"][0].read_bytes()
    results = {}

    def first():
        results["running"] = post(c, data)

    t = threading.Thread(target=first)
    t.start()
    assert blocker.started.acquire(timeout=10)
    queued = post(c, data)  # waits behind the blocked one, past its deadline
    t.join(10)
    running = results["running"]
    assert running.status_code == 504 and "deadline" in running.json()["detail"]
    assert queued.status_code == 503 and "queue" in queued.json()["detail"] and queued.headers["retry-after"]
    assert app.state.admission.active == 1  # the timed-out job still holds its worker until it really ends
    blocker.release.set()
    _wait_for(lambda: app.state.admission.active == 0)


class _Server:
    """The app under a real uvicorn on 127.0.0.1 (a thread); ``url`` while inside ``with``."""

    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import httpx

        self.thread.start()
        _wait_for(lambda: self.server.started, 30)
        assert httpx.get(self.url + "/healthz", timeout=5).status_code == 200
        return self

    def __exit__(self, *a):
        self.server.should_exit = True
        self.thread.join(10)


def test_healthz_answers_while_inference_is_busy(blocked, breast_files):
    import time

    import httpx

    app, blocker = blocked
    data = breast_files["png"][0].read_bytes()
    with _Server(app) as srv:
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(srv.url + "/v1/predict", files={"file": ("x.png", data)}, timeout=30))) for _ in range(2)]
        for t in threads:
            t.start()
        assert blocker.started.acquire(timeout=10)
        _wait_for(lambda: app.state.admission.active == 2)
        for _ in range(20):  # the only worker is busy and the queue is full: /healthz still answers at once
            t0 = time.perf_counter()
            h = httpx.get(srv.url + "/healthz", timeout=5)
            assert h.status_code == 200 and h.json()["busy"] == 2 and time.perf_counter() - t0 < 0.5
        full = httpx.post(srv.url + "/v1/predict", files={"file": ("x.png", data)}, timeout=5)
        assert full.status_code == 503 and full.headers["retry-after"]
        blocker.release.set()
        for t in threads:
            t.join(30)
        assert sorted(r.status_code for r in results) == [200, 200]


def test_slow_body_is_408_and_frees_its_slot(served_bundle):
    import socket
    import time

    app = create_app(served_bundle, backend="torch", workers=1, queue=0, body_timeout_s=1.0)
    with _Server(app) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  b"Content-Length: 100000\r\n\r\n--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc")
        t0 = time.perf_counter()
        reply = s.recv(65536).decode("latin-1")
        waited = time.perf_counter() - t0
        head, _, body = reply.partition("\r\n\r\n")
        length = int(next(v for k, _, v in (x.partition(": ") for x in head.split("\r\n")) if k.lower() == "content-length"))
        while len(body.encode("latin-1")) < length:
            body += s.recv(65536).decode("latin-1")
        s.close()
        assert reply.startswith("HTTP/1.1 408"), reply[:200]
        assert 0.5 < waited < 5
        assert "x-content-type-options: nosniff" in reply.lower() and "not received within 1 s" in body
        import httpx

        assert httpx.get(srv.url + "/healthz").json()["busy"] == 0


# --- form fields --------------------------------------------------------------------------------------------

def test_malformed_clinical_and_form_fields_are_422(client, breast_files):
    import json
    import time

    png = breast_files["png"][0].read_bytes()
    f = {"file": ("x.png", png, "image/png")}
    cases = {
        "[" * 30_000 + "]" * 30_000: "nested deeper",  # RecursionError in json.loads before the cap
        '{"a":' * 20 + "1" + "}" * 20: "nested deeper",
        json.dumps({"age": "x" * 70_000}): "larger than 64 KB",
        "[1, 2]": "got a JSON list",
        '{"age": {"years": 3}}': "holds a dict",
        '{"age": NaN}': "invalid JSON",
        "{not json": "invalid JSON",
        '{"age": ' + "9" * 5000 + "}": "invalid JSON",
    }
    for value, why in cases.items():
        t0 = time.perf_counter()
        r = client.post("/v1/predict", files=f, data={"clinical": value})
        assert r.status_code == 422 and why in r.json()["detail"], (value[:30], r.status_code, r.text[:200])
        assert time.perf_counter() - t0 < 2
    r = client.post("/v1/predict", files={"file": ("x.png", png), "clinical": ("c.json", b"\xff\xfe{}")})
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"]
    r = client.post("/v1/predict", files=[("file", ("a.png", png)), ("file", ("b.png", png))])
    assert r.status_code == 422 and "more than once" in r.json()["detail"]
    r = client.post("/v1/predict", files=f, data={"note": "hello"})
    assert r.status_code == 422 and "unexpected form field 'note'" in r.json()["detail"]
    boundary = "b0undary"
    many = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nx\r\n" for i in range(50))
    r = client.post("/v1/predict", content=(many + f"--{boundary}--\r\n").encode(),
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 422
    assert client.post("/v1/predict", files=f, data={"clinical": '{"age": 70, "site": "F"}'}).status_code == 200


# --- security headers, hosts, docs, OpenAPI -----------------------------------------------------------------

def _assert_security_headers(r):
    h = r.headers
    assert h["x-content-type-options"] == "nosniff", r.url
    csp = h["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "http" not in csp
    assert h["referrer-policy"] == "no-referrer" and h["x-frame-options"] == "DENY"


def test_security_headers_on_every_response(served_bundle, keyed, breast_files):
    from medsight.predict import Predictor

    h = {"X-API-Key": KEY}
    png = breast_files["png"][0].read_bytes()
    responses = {
        200: [keyed.get("/"), keyed.get("/static/app.js"), keyed.get("/healthz"), keyed.get("/docs"),
              keyed.get("/openapi.json"), keyed.get("/v1/model", headers=h), post(keyed, png, headers=h)],
        401: [keyed.get("/v1/model")],
        404: [keyed.get("/nope"), keyed.get("/static/nope.js")],
        405: [keyed.get("/v1/predict", headers=h)],
        413: [post(keyed, b"\0" * (2 << 20), headers=h)],
        415: [post(keyed, b"plain text", "a.txt", headers=h)],
        422: [post(keyed, png[:50], headers=h)],
    }
    pred = Predictor(served_bundle, backend="torch")

    def broken(*a, **k):
        raise RuntimeError("a server bug")

    pred.predict_array = broken
    crashing = TestClient(create_app(served_bundle, predictor=pred), raise_server_exceptions=False)
    responses[500] = [post(crashing, png)]
    for status, rs in responses.items():
        for r in rs:
            assert r.status_code == status, (r.url, r.status_code)
            _assert_security_headers(r)
    assert responses[200][-1].headers["cache-control"] == "no-store"  # predictions are patient data


def test_host_allow_list(served_bundle, breast_files):
    from medsight.serve.app import LOOPBACK_HOSTS, default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1") == LOOPBACK_HOSTS == default_allowed_hosts("::1")
    assert default_allowed_hosts("localhost") == LOOPBACK_HOSTS and default_allowed_hosts("0.0.0.0") is None
    app = create_app(served_bundle, backend="torch", allowed_hosts=default_allowed_hosts("127.0.0.1"))
    c = TestClient(app, base_url="http://localhost:8000")
    for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "127.0.0.1"):
        assert c.get("/healthz", headers={"host": host}).status_code == 200, host
    png = breast_files["png"][0].read_bytes()
    for host in ("evil.example:8000", "localhost.evil.example", "attacker.test", "", "127.0.0.2:8000"):
        r = c.get("/healthz", headers={"host": host})
        assert r.status_code == 421 and "Host" in r.json()["detail"], host
        _assert_security_headers(r)
        assert c.post("/v1/predict", files={"file": ("x.png", png)}, headers={"host": host}).status_code == 421
    wild = TestClient(create_app(served_bundle, backend="torch", allowed_hosts=["*.hospital.example"]),
                      base_url="http://pacs.hospital.example")
    assert wild.get("/healthz").status_code == 200
    assert wild.get("/healthz", headers={"host": "hospital.example.evil"}).status_code == 421


def test_docs_are_local_and_openapi_declares_the_key(client, keyed):
    import re

    for c in (client, keyed):
        page = c.get("/docs")
        assert page.status_code == 200 and "/static/docs.js" in page.text
        for text in (page.text, c.get("/static/docs.js").text):
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text.replace("/openapi.json", "")), text[:200]
        assert c.get("/redoc").status_code == 404
    spec = keyed.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                 "description": "the server's API key"}
    assert schemes["bearer"]["type"] == "http" and schemes["bearer"]["scheme"] == "bearer"
    for path in ("/v1/predict", "/v1/model"):
        op = next(iter(spec["paths"][path].values()))
        assert {"apiKey": []} in op["security"] and {"bearer": []} in op["security"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    open_spec = client.get("/openapi.json").json()  # a key-less server declares no key
    assert "securitySchemes" not in open_spec.get("components", {})


def test_service_never_writes_into_the_bundle(served_bundle, breast_files, tmp_path):
    import os
    import shutil

    b = tmp_path / "bundle"
    shutil.copytree(served_bundle, b, ignore=shutil.ignore_patterns("model.onnx"))

    def snapshot():
        return {str(p.relative_to(b)): (p.stat().st_mtime_ns, p.stat().st_size) for p in b.rglob("*")}

    before = snapshot()
    for p in [b, *b.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        c = TestClient(create_app(b, backend="onnx"))  # no model.onnx in the bundle: exported elsewhere
        r = c.post("/v1/predict?explain=true", files={"file": ("x.png", breast_files["png"][0].read_bytes())})
        assert r.status_code == 200
    finally:
        for p in [b, *b.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert snapshot() == before and not (b / "model.onnx").exists()


# --- explain: the scan at its own resolution; review flags --------------------------------------------------

def _png_of(arr) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _img(b64):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_explain_returns_the_scan_at_its_own_resolution(client, breast_files):
    from PIL import Image

    src = Image.fromarray(breast_files["images"][0].reshape(28, 28).astype(np.uint8)).resize((400, 300), Image.BICUBIC)
    up = np.asarray(src)
    body = client.post("/v1/predict?explain=true", files={"file": ("wide.png", _png_of(up))}).json()
    disp, heat, bar = _img(body["display_png"]), _img(body["display_heatmap_png"]), _img(body["colorbar_png"])
    assert disp.size == heat.size == (400, 300) and body["display_size"] == [400, 300]
    assert np.abs(np.asarray(disp.convert("L"), float) - up).max() <= 1  # 8-bit PNG: shown as uploaded
    assert _img(body["image_png"]).size == (28, 28)  # the model input is still there
    h = np.asarray(heat.convert("RGB"), float)
    assert h.std() > 0  # a real map, spread over the whole scan
    assert bar.size == (256, 12)
    b = np.asarray(bar.convert("RGB"), int)
    assert b[0, 0, 2] > b[0, 0, 0] and b[0, -1, 0] > b[0, -1, 2]  # jet: blue at 0, red at 1
    big = np.asarray(Image.fromarray(up).resize((2000, 1500)))
    body = client.post("/v1/predict?explain=true", files={"file": ("big.png", _png_of(big))}).json()
    assert body["display_size"] == [1024, 768] and _img(body["display_png"]).size == (1024, 768)


def test_review_for_ood_and_near_threshold(client, served_bundle, breast_files):
    """The service applies the bundle's fitted rule (medsight.review): near on the logit scale, or OOD."""
    b = load_bundle(served_bundle)
    pos = b.classes[1]
    rule = b.meta.review.model_dump()
    assert rule["rule"] == "logit_margin" and 0 < rule["margin"] <= np.log(4) and rule["val_share"] <= 0.1
    near = far = 0
    for f in breast_files["png"]:
        r = post(client, f.read_bytes()).json()
        p, t = r["probabilities"][pos], r["threshold"]
        lo = lambda v: np.log(np.clip(v, 1e-7, 1 - 1e-7)) - np.log1p(-np.clip(v, 1e-7, 1 - 1e-7))  # noqa: E731
        if abs(lo(p) - lo(t)) < rule["margin"]:
            near += 1
            assert r["review"] is True and any("too close to the threshold" in x for x in r["review_reasons"])
        elif not r["ood_flag"]:
            far += 1
            assert r["review"] is False and r["review_reasons"] == []
    assert far
    noise = np.random.default_rng(0).integers(0, 255, (28, 28))
    r = post(client, _png_of(noise), "noise.png").json()
    assert r["ood_flag"] is True and r["review"] is True
    assert any("does not look like the training data" in x for x in r["review_reasons"])
    assert r["predicted"] is None and r["decision"] is None  # no class verdict for an OOD scan
    m = client.get("/v1/model").json()
    assert m["review_margin"] == rule["margin"] and m["review"]["fitted"] is True
    assert m["threshold_display"] == "0.5"


# --- the serve command --------------------------------------------------------------------------------------

def test_serve_command_key_file_hosts_and_warning(served_bundle, tmp_path, monkeypatch, capsys):

    from medsight.cli import main

    import sys

    seen = {}
    import medsight.serve.server as server

    monkeypatch.setattr(server, "run_server", lambda app, host, port, **kw: seen.update(app=app, host=host, port=port))
    monkeypatch.setattr(sys, "setswitchinterval", lambda s: seen.update(switch=s))  # not for the test process
    monkeypatch.delenv("MEDSIGHT_API_KEY", raising=False)
    keyfile = tmp_path / "key.txt"
    keyfile.write_text("file-key-123\n")
    assert main(["serve", str(served_bundle), "--backend", "torch", "--api-key-file", str(keyfile),
                 "--workers", "3", "--queue", "4"]) == 0
    c = TestClient(seen["app"], base_url="http://127.0.0.1:8000")
    assert c.get("/v1/model").status_code == 401
    assert c.get("/v1/model", headers={"X-API-Key": "file-key-123"}).status_code == 200
    assert c.get("/healthz", headers={"host": "rebound.example"}).status_code == 421  # loopback bind: loopback names
    assert seen["app"].state.admission.capacity == 7 and seen["host"] == "127.0.0.1" and seen["switch"] == 0.001
    assert "warning" not in capsys.readouterr().err

    assert main(["serve", str(served_bundle), "--backend", "torch", "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert "without an API key" in " ".join(err.split())
    assert TestClient(seen["app"], base_url="http://scanner.example").get("/healthz").status_code == 200

    monkeypatch.setenv("MEDSIGHT_API_KEY", "env-key")
    assert main(["serve", str(served_bundle), "--backend", "torch", "--host", "0.0.0.0",
                 "--allowed-hosts", "ai.hospital.example"]) == 0
    assert "without an API key" not in capsys.readouterr().err
    c = TestClient(seen["app"], base_url="http://ai.hospital.example")
    assert c.get("/v1/model", headers={"Authorization": "Bearer env-key"}).status_code == 200
    assert c.get("/healthz", headers={"host": "localhost"}).status_code == 421
    monkeypatch.delenv("MEDSIGHT_API_KEY")

    for bad, why in ((tmp_path / "missing.txt", "cannot read"), (tmp_path / "empty.txt", "empty")):
        if why == "empty":
            bad.write_text("\n")
        assert main(["serve", str(served_bundle), "--api-key-file", str(bad)]) == 2
        assert why in capsys.readouterr().err


def test_client_that_disconnects_mid_upload_is_no_500(served_bundle, caplog):
    import socket

    import httpx

    app = create_app(served_bundle, backend="torch", workers=1, queue=0, body_timeout_s=30)
    with caplog.at_level(logging.INFO, logger="medsight.serve"), _Server(app) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                  b"Content-Length: 100000\r\n\r\n--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc")
        _wait_for(lambda: app.state.service.receiving == 1)
        assert app.state.admission.active == 0  # a body still arriving holds no admission slot
        s.close()  # gone before the body ended
        _wait_for(lambda: app.state.service.receiving == 0)  # forgotten again, well before the 30 s timeout
        assert httpx.get(srv.url + "/healthz").status_code == 200
        _wait_for(lambda: sum("path=/v1/predict" in r.getMessage() for r in caplog.records) == 1)
    lines = [r.getMessage() for r in caplog.records if "path=/v1/predict" in r.getMessage()]
    assert "status=500" not in lines[0] and not any(r.exc_info for r in caplog.records)
