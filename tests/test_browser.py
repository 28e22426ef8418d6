"""The web page in a real browser (Debian chromium via playwright): upload PNG and DICOM, compare with the API;
keyboard-only use, no stale result, no verdict for results that need review.

Needs /usr/bin/chromium. With CI=true a missing browser FAILS the test; locally it is skipped.
MEDSIGHT_SCREENSHOT_DIR=docs also writes page-1280.png and page-390.png there.
"""

import os
import shutil
import threading
import time

import pytest

from _subproc import free_port

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


@pytest.fixture(scope="module")
def server(served_bundle):
    import httpx
    import uvicorn

    from medsight.serve import create_app

    _need_browser()
    port = free_port()
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


KEY = "browser-key"


def _api(server, path_or_bytes, name="x.png"):
    import httpx

    data = path_or_bytes.read_bytes() if hasattr(path_or_bytes, "read_bytes") else path_or_bytes
    r = httpx.post(server + "/v1/predict", files={"file": (name, data)}, headers={"X-API-Key": KEY}, timeout=30)
    assert r.status_code == 200
    return r.json()


def _png_bytes(arr) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            pg = browser.new_page()
            pg.external = []
            pg.choosers = []  # file choosers the page opened (interception on from the start: no race)
            pg.on("filechooser", lambda fc: pg.choosers.append(fc))
            pg.on("request", lambda req: None if req.url.startswith((server, "data:")) else pg.external.append(req.url))
            pg.goto(server + "/")
            pg.wait_for_selector("#key-row:not([hidden])")
            yield pg
        finally:
            browser.close()


def _unlock(page):
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.getElementById('model-info').textContent.includes('simple_cnn')")


def _upload(page, path):
    page.set_input_files("#file", str(path))
    page.wait_for_function(f"() => document.getElementById('result').dataset.file === '{path.name}' && "
                           f"document.getElementById('result').dataset.state === 'done'")


def _prominent_texts(page) -> list[str]:
    """Visible text drawn bold or large inside the result panel."""
    return page.evaluate("""() => [...document.querySelectorAll('#result *')].filter(e => {
        const s = getComputedStyle(e); const r = e.getBoundingClientRect();
        return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && e.childElementCount === 0 &&
               (parseInt(s.fontWeight) >= 600 || parseFloat(s.fontSize) >= 20);
    }).map(e => e.textContent)""")


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
            page.wait_for_function("() => document.getElementById('model-info').textContent.includes('simple_cnn')")
            for f, exp in zip(files, expected):
                page.set_input_files("#file", str(f))
                page.wait_for_function(f"() => document.getElementById('result').dataset.state === 'done' && "
                                       f"document.getElementById('result').dataset.file === '{f.name}'")
                if exp["review"]:  # near the threshold: no verdict, the reasons instead
                    assert not page.is_visible("#verdict") and page.is_visible("#review")
                    assert page.text_content("#pred-class") == ""
                    assert page.text_content("#review-reasons") == "".join(exp["review_reasons"])
                else:
                    assert page.is_visible("#verdict") and not page.is_visible("#review")
                    assert page.text_content("#pred-class") == exp["predicted"]
                assert page.get_attribute("#result", "data-predicted") == (exp["predicted"] or "no verdict")
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
            bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")  # a PNG signature, then garbage
            page.set_input_files("#file", str(bad))
            page.wait_for_function("() => document.getElementById('result').dataset.state === 'error'")
            assert "422" in page.text_content("#status")
            assert external == []
        finally:
            browser.close()


def test_before_any_upload_no_result_is_visible(page):
    _unlock(page)
    assert not page.is_visible("#result") and page.query_selector("#result").bounding_box() is None
    for sel in ("#verdict", "#review", "#probs", "#image", "#heatmap"):
        assert not page.is_visible(sel), sel
    assert page.is_visible("label[for=file]") and page.text_content("#status") == ""
    assert page.external == []


def _wait_chooser(page, n: int) -> None:
    for _ in range(100):
        if len(page.choosers) >= n:
            return
        page.wait_for_timeout(100)
    pytest.fail(f"no file chooser opened ({len(page.choosers)} of {n})")


def test_keyboard_only_upload(page, breast_files):
    # API key by keyboard: Tab to the field, type it, Tab away (change event)
    for _ in range(10):
        if page.evaluate("document.activeElement.id") == "api-key":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.keyboard.type(KEY)
    page.keyboard.press("Tab")
    page.wait_for_function("() => document.getElementById('model-info').textContent.includes('simple_cnn')")
    for _ in range(10):
        if page.evaluate("document.activeElement.id") == "file":
            break
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    # the focused control is visibly marked (focus ring on its label)
    assert page.evaluate("getComputedStyle(document.querySelector('label[for=file]')).outlineStyle") == "solid"
    # and announced with a name: its label
    assert page.evaluate("document.getElementById('file').labels[0].textContent").startswith("Choose a scan")
    f = breast_files["png"][3]
    page.keyboard.press("Enter")
    _wait_chooser(page, 1)
    page.choosers[0].set_files(str(f))
    page.wait_for_function(f"() => document.getElementById('result').dataset.file === '{f.name}'")
    assert page.is_visible("#result") and page.get_attribute("#status", "aria-live") == "polite"
    assert f.name in page.text_content("#status")
    page.focus("#file")
    page.keyboard.press(" ")  # Space opens it too
    _wait_chooser(page, 2)


def test_failed_upload_after_a_good_one_shows_no_prediction(page, breast_files):
    _unlock(page)
    good = breast_files["png"][2]
    _upload(page, good)
    shown = page.get_attribute("#result", "data-predicted")
    assert page.is_visible("#result") and shown
    bad = breast_files["root"] / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("() => document.getElementById('result').dataset.state === 'error'")
    assert "422" in page.text_content("#status") and "broken.png" in page.text_content("#status")
    assert not page.is_visible("#result") and page.query_selector("#result").bounding_box() is None
    assert page.text_content("#pred-class") == "" and page.query_selector_all(".prob-row") == []
    assert page.get_attribute("#image", "src") is None
    body = page.inner_text("main")  # (the header names the classes)
    assert "Prediction" not in body and shown not in body and "malignant" not in body


def test_ood_scan_gets_no_verdict(page, server, breast_files):
    import numpy as np

    _unlock(page)
    noise = breast_files["root"] / "noise.png"
    noise.write_bytes(_png_bytes(np.random.default_rng(0).integers(0, 255, (28, 28))))
    exp = _api(server, noise)
    assert exp["ood_flag"] is True and exp["review"] is True
    _upload(page, noise)
    assert not page.is_visible("#verdict") and page.is_visible("#review")
    assert "does not look like the training data" in page.text_content("#review")
    for text in _prominent_texts(page):  # nothing bold or large names a class
        assert not any(c in text for c in exp["probabilities"]), text
    assert "needs review" in page.text_content("#status")
    assert exp["predicted"] is None  # no class verdict anywhere: the API gives none, the page says so
    assert page.get_attribute("#result", "data-predicted") == "no verdict"
    assert page.text_content("#review-reasons") == "".join(exp["review_reasons"])


def test_scan_shown_at_its_own_resolution_with_colour_scale(page, server, breast_files):
    import numpy as np
    from PIL import Image

    _unlock(page)
    img = Image.fromarray(breast_files["images"][5].reshape(28, 28).astype(np.uint8)).resize((200, 150))
    wide = breast_files["root"] / "wide.png"
    wide.write_bytes(_png_bytes(np.asarray(img)))
    _upload(page, wide)
    natural = page.evaluate("[document.getElementById('image').naturalWidth, document.getElementById('image').naturalHeight]")
    heat = page.evaluate("[document.getElementById('heatmap').naturalWidth, document.getElementById('heatmap').naturalHeight]")
    assert natural == heat == [200, 150]
    box, hbox = page.query_selector("#image").bounding_box(), page.query_selector("#heatmap").bounding_box()
    assert box == hbox and box["width"] / box["height"] == pytest.approx(200 / 150, rel=0.02)
    assert page.is_visible("#colorbar") and page.text_content("#colorbar-box figcaption").startswith("0")
    assert page.text_content("#colorbar-box figcaption").endswith("1")
    assert "own 200\u00d7150 px" in page.text_content("#image-note") and "resized to 28\u00d728" in page.text_content("#image-note")
    pos = page.text_content("#positive")
    classes = list(_api(server, wide)["probabilities"])
    assert pos.startswith(f"Probability of \u201c{classes[1]}\u201d")
    import httpx

    model = httpx.get(server + "/v1/model", headers={"X-API-Key": "browser-key"}, timeout=10).json()
    rule = page.text_content("#rule")  # the review rule in the bundle's own words (medsight.review)
    assert "too close to its threshold to call" in rule and model["review"]["description"] in rule
    assert "within 0.1" not in rule
    assert f"threshold {model['threshold_display']} " in page.text_content("#model-info")
    assert f"(threshold {model['threshold_display']})" in pos  # 3 significant digits, as the CLI shows it


def test_screenshots(page, breast_files, medmnist_dir):
    """Screenshots of the page after a prediction, at 1280 and 390 px wide (MEDSIGHT_SCREENSHOT_DIR to keep them)."""
    import numpy as np

    out = os.environ.get("MEDSIGHT_SCREENSHOT_DIR")
    _unlock(page)
    scan = np.load(medmnist_dir / "breastmnist_64.npz")["test_images"][2]
    f = breast_files["root"] / "breast_64.png"
    f.write_bytes(_png_bytes(scan))
    for width, height in ((1280, 900), (390, 1200)):
        page.set_viewport_size({"width": width, "height": height})
        _upload(page, f)
        page.wait_for_function("() => document.getElementById('image').complete && document.getElementById('heatmap').complete")
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"horizontal scroll at {width} px"
        if out:
            page.evaluate("() => document.activeElement.blur()")
            page.screenshot(path=os.path.join(out, f"page-{width}.png"), full_page=True)
