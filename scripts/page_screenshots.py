"""Render docs/page-{normal,positive,review,ood}.png: the web page after uploading a normal, a positive, a
near-threshold and an out-of-distribution scan, from the merged code, in headless Debian Chromium.

    PYTHONPATH=src MEDSIGHT_DATA_DIR=../shared/data/medmnist python scripts/page_screenshots.py [WORK_DIR]

The bundle is a short BreastMNIST run (the plain defaults, simple_cnn, at most 15 epochs: a CPU-minute or two);
the four scans are chosen by what that bundle's Predictor says of them (the same fields the page shows): the test
image with the lowest and the highest probability that is not flagged, the first image flagged as too close to call
(test split first, then validation and training images), and a CT
slice from pydicom's test files, which the OOD detector flags.
"""

from __future__ import annotations

import io
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def main(work: str = "/tmp/medsight-page-shots") -> list[Path]:
    import httpx
    import uvicorn
    from playwright.sync_api import sync_playwright
    from pydicom.data import get_testdata_file

    from medsight.config import load_config
    from medsight.pipeline import load_data_for, run_training
    from medsight.predict import Predictor
    from medsight.serve import create_app

    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, {"data.name": "breastmnist", "train.epochs": 15, "train.device": "cpu",
                             "data.download": False, "train.n_boot": 200})
    data = load_data_for(cfg)
    bundle, _, _ = run_training(cfg, work_dir / "bundle", data=data, overwrite=True)
    pred = Predictor(bundle, backend="onnx" if (Path(bundle) / "model.onnx").exists() else "torch")
    files = []
    import os

    raw = np.load(Path(os.environ["MEDSIGHT_DATA_DIR"]) / "breastmnist.npz")  # the released uint8 images
    for split in ("test", "val", "train"):  # the test images first; the others only to find a flagged one
        for i, img in enumerate(raw[f"{split}_images"]):
            f = work_dir / f"{split}-{i:03d}.png"
            f.write_bytes(_png(img))
            files.append(f)
    rows = [pred.predict_file(f) for f in files]
    pos = pred.bundle.positive_class
    calm = [r for r in rows if r.ok and not r.review and Path(r.file).name.startswith("test-")]
    picks = {
        "normal": min(calm, key=lambda r: r.probabilities[pos]),
        "positive": max(calm, key=lambda r: r.probabilities[pos]),
        "review": next(r for r in rows if r.ok and r.review and not r.ood_flag),
    }
    ct = work_dir / "ct-slice.dcm"
    ct.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    ood = pred.predict_file(ct)
    assert ood.ood_flag, "the CT slice was not flagged out of distribution by this bundle"
    picks["ood"] = ood

    app = create_app(bundle, backend="torch")
    port = 8765
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    threading.Thread(target=srv.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        for name, r in picks.items():
            f = Path(r.file)
            page.set_input_files("#file", str(f))
            page.wait_for_function(f"() => document.getElementById('result').dataset.file === '{f.name}' && "
                                   "document.getElementById('result').dataset.state === 'done'")
            page.wait_for_function("() => document.getElementById('image').complete")
            page.evaluate("() => document.activeElement.blur()")
            png = REPO / "docs" / f"page-{name}.png"
            page.screenshot(path=str(png), full_page=True)
            out.append(png)
            print(f"{png.name}: {f.name} p({pos})={r.probabilities[pos]:.3f} review={r.review} ood={r.ood_flag}",
                  file=sys.stderr)
        browser.close()
    srv.should_exit = True
    from PIL import Image

    for png in out:
        Image.open(png).convert("RGB").quantize(colors=256).save(png, optimize=True)
    return out


if __name__ == "__main__":
    for path in main(*sys.argv[1:]):
        print(path)
