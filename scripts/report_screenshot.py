"""Render docs/report.png: a short BreastMNIST run's report.html as headless Chromium shows it.

    PYTHONPATH=src MEDSIGHT_DATA_DIR=../shared/data/medmnist python scripts/report_screenshot.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from medsight.bundle import load_bundle
from medsight.config import load_config
from medsight.evaluate import write_bundle_report
from medsight.pipeline import load_data_for, run_training
from medsight.summary import describe_training

REPO = Path(__file__).resolve().parents[1]


def main(out_dir: str = "/tmp/medsight-report-shot") -> Path:
    cfg = load_config(None, {"data.name": "breastmnist", "train.epochs": 5, "train.n_boot": 200,
                             "train.device": "cpu", "data.download": False})
    data = load_data_for(cfg)
    out, _, metrics = run_training(cfg, Path(out_dir) / "bundle", data=data)
    facts = describe_training(data, cfg, "cpu", torch.get_num_threads())
    html = write_bundle_report(load_bundle(out), data, metrics, facts=facts)
    from playwright.sync_api import sync_playwright

    png = REPO / "docs" / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(html.as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(png), full_page=True)
        browser.close()
    from PIL import Image

    Image.open(png).convert("RGB").quantize(colors=256).save(png, optimize=True)  # ~3x smaller, reads the same
    return png


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
