"""DICOMweb over TLS: the server certificate is verified by default (a self-signed one is refused), trusted
when its CA is configured, and skipped only when the config says so explicitly.

(Debian's Orthanc 1.10 build crashes on its first HTTPS connection here, so the server is a minimal QIDO-RS
endpoint over Python's ssl.)"""

from __future__ import annotations

import http.server
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _subproc import free_port


@pytest.fixture
def https_qido(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                        str(cert)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    seen = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            body = (b'[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},'
                    b' "00080050": {"vr": "SH", "Value": ["A1"]}}]')
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"https://127.0.0.1:{srv.server_address[1]}/dicom-web", cert, seen
    srv.shutdown()
    srv.server_close()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # the explicit opt-out below
def test_dicomweb_tls_verified_by_default(https_qido):
    from medsight.node.config import parse_config
    from medsight.node.transport import DicomWebClient, TransportError

    url, cert, seen = https_qido

    def client(**over):
        raw = {"routes": [{"name": "a", "bundle": "b"}],
               "pacs": {"dicomweb": {"url": url, "username": "u", "password_file": str(cert.parent / "pw"), **over}}}
        return DicomWebClient(parse_config(raw, cert.parent).dicomweb)

    (cert.parent / "pw").write_text("pw-secret\n")
    with pytest.raises(TransportError, match="SSLError") as e:
        client().find_series({"Modality": "CR"})
    assert "pw-secret" not in str(e.value)
    assert not seen  # nothing was sent over the unverified connection
    assert client(ca_bundle=str(cert)).find_series({"Modality": "CR"}) == [("1.2.3", "1.2.3.4")]
    assert client(verify_tls=False).find_series({}) == [("1.2.3", "1.2.3.4")]
    assert len(seen) == 2 and all(a and a.startswith("Basic ") for _, a in seen)


def _cert(tmp_path, name: str):
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                        "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                        str(cert)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return cert, key


@pytest.mark.realdata
def test_dimse_tls_scp_and_scu(tmp_path, served_bundle, breast):
    """The SCP over TLS: the node's own DIMSE client (pacs.dimse.tls) stores into it when it trusts the node's
    certificate, and is refused when it does not."""
    import io

    import pydicom
    from nodekit import make_series

    from medsight.node.config import parse_config
    from medsight.node.service import Node
    from medsight.node.transport import DimseClient, TransportError

    port = free_port()
    cert, key = _cert(tmp_path, "node")
    other, _ = _cert(tmp_path, "other")
    raw = {"ae_title": "MEDSIGHT", "workdir": str(tmp_path / "node"), "allowed_calling_aets": ["PUSHER"],
           "listen": {"host": "127.0.0.1", "port": port, "tls": {"cert": str(cert), "key": str(key)}},
           "pacs": {"dimse": {"host": "127.0.0.1", "port": port, "ae_title": "MEDSIGHT", "tls": {"ca": str(cert)}}},
           "send": "dimse", "routes": [{"name": "breast", "bundle": str(served_bundle)}]}
    node = Node(parse_config(raw, tmp_path), worker=False).start()
    try:
        (s,) = make_series(breast.splits["test"].images[:1], 1)
        ds = pydicom.dcmread(io.BytesIO(s["files"][0]))
        good = parse_config(raw, tmp_path).dimse
        DimseClient(good, "PUSHER").store([ds], s["study"])
        assert node.wl.instances(s["series"])
        bad = parse_config({**raw, "pacs": {"dimse": {**raw["pacs"]["dimse"], "tls": {"ca": str(other)}}}},
                           tmp_path).dimse
        with pytest.raises(TransportError):
            DimseClient(bad, "PUSHER").store([ds], s["study"])
        plain = parse_config({**raw, "pacs": {"dimse": {k: v for k, v in raw["pacs"]["dimse"].items() if k != "tls"}}},
                             tmp_path).dimse
        with pytest.raises(TransportError):
            DimseClient(plain, "PUSHER").store([ds], s["study"])  # no TLS: not established
    finally:
        node.stop()
