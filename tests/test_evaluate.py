"""Clinician-grade evaluation wired end to end: operating point on val, temperature scaling, report, explain."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from medsight.bundle import load_bundle
from medsight.cli import main
from medsight.config import load_config
from medsight.errors import ConfigError
from medsight.evaluate import calibration_report, split_probs
from medsight.pipeline import run_training


@pytest.fixture(scope="module")
def breast_run(tmp_path_factory, breast):
    out = tmp_path_factory.mktemp("breast") / "run"
    cfg = load_config(None, {"data.name": "breastmnist", "train.epochs": 3, "train.operating_point": "youden",
                             "train.n_boot": 200})
    run_training(cfg, out, data=breast)
    return out


def test_operating_point_chosen_on_val_and_stored(breast_run, breast):
    from medsight.metrics import choose_threshold

    b = load_bundle(breast_run)
    assert b.meta.threshold_rule == "youden" and 0 < b.threshold < 1
    val_probs = split_probs(b, breast, "val")
    assert b.threshold == pytest.approx(float(choose_threshold(breast.splits["val"].labels, val_probs, "youden")))
    m = json.loads((breast_run / "metrics.json").read_text())
    lo, hi = m["test"]["auc"]["ci"]
    assert lo <= m["test"]["auc"]["value"] <= hi
    for k in ("accuracy", "auc", "sensitivity", "specificity", "ppv", "npv", "f1"):
        assert k in m["test"] and len(m["test"][k]["ci"]) == 2


def test_evaluate_rechooses_operating_point_and_writes_report(breast_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(breast_run, run)
    assert main(["evaluate", str(run), "--split", "test", "--operating-point", "sens=0.95", "--n-boot", "100"]) == 0
    # the bundle is not changed: the re-chosen threshold is reported beside it
    before = json.loads((breast_run / "bundle.json").read_text())
    meta = json.loads((run / "bundle.json").read_text())
    assert meta == before and meta["threshold_rule"] == "youden"
    m = json.loads((run / "metrics_op-sens_0.95.json").read_text())
    assert m["val"]["sensitivity"]["value"] >= 0.95  # chosen on val to reach the target sensitivity there
    assert json.loads((run / "metrics.json").read_text()) == json.loads((breast_run / "metrics.json").read_text())
    html = (run / "report_op-sens_0.95.html").read_text()
    assert "<img" in html and "http://" not in html and "https://" not in html
    assert "<img" in html and "http://" not in html and "https://" not in html


def test_bad_operating_point_is_a_config_error():
    with pytest.raises(ConfigError, match="operating_point"):
        load_config(None, {"train.operating_point": "sens=2"})


def test_report_renders_in_chromium_without_missing_images(breast_run, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists("/usr/bin/chromium"):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("chromium not installed")
    assert main(["evaluate", str(breast_run), "--split", "test", "--n-boot", "50"]) == 0
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((breast_run / "report.html").as_uri())
        page.wait_for_load_state("load")
        n, broken = page.evaluate(
            "() => { const im = [...document.images]; return [im.length, im.filter(i => !i.complete || i.naturalWidth === 0).length]; }")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert n >= 6 and broken == 0
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_explain_cli_on_png_and_bad_file(breast_run, breast, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "case.png"
    Image.fromarray(breast.splits["test"].images[0, 0]).save(png)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "expl"
    assert main(["explain", str(breast_run), str(png), "--out", str(out)]) == 0
    heat = np.load(out / "case_heatmap.npy")
    assert heat.shape == (28, 28) and 0 <= heat.min() and heat.max() <= 1
    assert (out / "case_overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["explain", str(breast_run), str(png), "--out", str(out), "--method", "occlusion"]) == 0
    assert main(["explain", str(breast_run), str(bad), "--out", str(out)]) == 1
    assert "bad.png" in capsys.readouterr().err


@pytest.mark.slow
def test_temperature_scaling_on_pneumoniamnist_never_worsens_val_ece(tmp_path, medmnist_dir):
    """T is fitted on val by NLL and kept only when it lowers val ECE; ECE is reported for val and test.

    The baseline CNN is already close to calibrated on val (ECE ~0.02), so T often stays 1; the test split's ECE
    (~0.13) comes from its different prevalence, which a temperature cannot fix (see the closing note)."""
    from medsight.data.sources import load_medmnist

    data = load_medmnist("pneumoniamnist", 28, root=medmnist_dir, download_missing=False)
    cfg = load_config(None, {"data.name": "pneumoniamnist", "train.epochs": 4, "train.batch_size": 64,
                             "train.n_boot": 0})
    out, _, _ = run_training(cfg, tmp_path / "pneu", data=data)
    rep = calibration_report(load_bundle(out), data, ("val", "test"))
    print({k: v for k, v in rep.items() if k.startswith("ece")}, "T =", rep["temperature"])
    assert rep["ece_after_val"] <= rep["ece_before_val"]
    if rep["temperature"] != 1.0:
        assert rep["ece_after_val"] < rep["ece_before_val"]
    for k in ("ece_before_test", "ece_after_test"):
        assert 0 <= rep[k] <= 1


def test_evaluate_shift_and_ood_detector_in_bundle(breast_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(breast_run, run)
    meta = json.loads((run / "bundle.json").read_text())
    assert meta["ood"]["score"] == "combined" and (run / "ood.npz").is_file()
    assert main(["evaluate", str(run), "--split", "test", "--shift", "--shift-severities", "1,5",
                 "--shift-corruptions", "gaussian_noise,contrast", "--n-boot", "0"]) == 0
    res = json.loads((run / "shift_test.json").read_text())
    assert set(res["corruptions"]) == {"gaussian_noise", "contrast"}
    assert [r["severity"] for r in res["corruptions"]["contrast"]] == [1, 5]
    assert "Robustness to distribution shift" in (run / "report.html").read_text()
    assert main(["evaluate", str(run), "--shift", "--shift-corruptions", "sunburn", "--n-boot", "0"]) == 2
    assert "sunburn" in capsys.readouterr().err
