"""The web page in a real browser (Debian chromium via playwright): upload PNG and DICOM, compare with the API.

Needs /usr/bin/chromium. With CI=true a missing browser FAILS the test; locally it is skipped.
"""

import os
import shutil
import socket
import threading
import time

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("MEDSIGHT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]


def _need_browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright package is not installed"
    else:
        missing = None if (os.path.isfile(CHROMIUM) or shutil.which(CHROMIUM)) else f"{CHROMIUM} not found"
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser test cannot run: {missing} (apt-get install chromium; pip install playwright)")
        pytest.skip(missing)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_bundle):
    import httpx
    import uvicorn

    from medsight.serve import create_app

    _need_browser()
    port = _free_port()
    app = create_app(served_bundle, api_key="browser-key", backend="onnx")
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        pytest.fail("uvicorn did not start")
    yield url
    srv.should_exit = True
    t.join(timeout=10)


def test_page_shows_the_api_prediction(server, breast_files):
    import httpx
    from playwright.sync_api import sync_playwright

    files = [breast_files["png"][0], breast_files["dcm"][1], breast_files["png"][2]]
    expected = []
    for f in files:
        r = httpx.post(server + "/v1/predict", files={"file": (f.name, f.read_bytes())},
                       headers={"X-API-Key": "browser-key"}, timeout=30)
        assert r.status_code == 200
        expected.append(r.json())

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            external = []
            page.on("request", lambda req: None if req.url.startswith((server, "data:")) else external.append(req.url))
            page.goto(server + "/")
            page.wait_for_selector("#key-row:not([hidden])")
            page.fill("#api-key", "browser-key")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.getElementById('model-info').textContent.includes('simple_cnn')")
            for f, exp in zip(files, expected):
                page.set_input_files("#file", str(f))
                page.wait_for_function(f"document.getElementById('result').dataset.state === 'done' && "
                                       f"document.getElementById('result').dataset.file === '{f.name}'")
                assert page.text_content("#pred-class") == exp["predicted"]
                rows = page.query_selector_all(".prob-row")
                shown = {r.get_attribute("data-class"): (r.query_selector(".prob-text").text_content(),
                                                        float(r.get_attribute("data-prob"))) for r in rows}
                assert set(shown) == set(exp["probabilities"])
                for name, p_api in exp["probabilities"].items():
                    text, value = shown[name]
                    assert text == f"{p_api:.4f}"
                    assert value == pytest.approx(p_api, abs=1e-9)
                assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
                assert page.get_attribute("#image", "src").startswith("data:image/png;base64,")
            page.fill("#opacity", "80")
            page.dispatch_event("#opacity", "input")
            assert page.eval_on_selector("#heatmap", "e => e.style.opacity") == "0.8"
            # a bad file shows the API's error, not a crash
            bad = breast_files["root"] / "bad.png"
            bad.write_bytes(b"\x89PNG broken")
            page.set_input_files("#file", str(bad))
            page.wait_for_function("document.getElementById('result').dataset.state === 'error'")
            assert "422" in page.text_content("#status")
            assert external == []
        finally:
            browser.close()
