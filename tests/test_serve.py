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
    return TestClient(create_app(served_bundle, backend="onnx"))


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
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
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


def test_every_pydicom_test_file_is_200_or_4xx(client):
    from pydicom.data import get_testdata_files

    import os

    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    assert len(files) > 50
    statuses = {}
    for f in files:
        with open(f, "rb") as fh:
            data = fh.read()
        r = post(client, data, f.rsplit("/", 1)[-1])
        assert r.status_code == 200 or 400 <= r.status_code < 500, (f, r.status_code, r.text)
        if r.status_code != 200:
            assert isinstance(r.json()["detail"], str)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert statuses.get(200, 0) > 10  # many of them are real images


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
