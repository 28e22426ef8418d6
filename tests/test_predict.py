"""Predictor: bundle preprocessing + temperature + threshold, PyTorch and ONNX Runtime backends, batches, errors."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medsight.bundle import load_bundle, write_meta
from medsight.cli import main
from medsight.errors import ConfigError, DataError
from medsight.evaluate import split_logits
from medsight.predict import Predictor, expand_inputs


@pytest.fixture(scope="module")
def reference_probs(served_bundle, breast):
    b = load_bundle(served_bundle)
    logits = split_logits(b, breast, "test")
    return b.task.probabilities(logits, b.temperature).numpy()


@pytest.fixture(scope="module")
def predictors(served_bundle):
    return {"torch": Predictor(served_bundle, backend="torch"), "onnx": Predictor(served_bundle, backend="onnx")}


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_png_folder_matches_split_logits(predictors, breast_files, reference_probs, backend):
    p = predictors[backend]
    results = p.predict_paths([breast_files["root"] / "png"], batch_size=7)
    assert [r.file for r in results] == [str(f) for f in breast_files["png"]]
    assert all(r.ok for r in results)
    got = np.array([r.probabilities[p.classes[1]] for r in results])
    np.testing.assert_allclose(got, reference_probs[: len(got)], atol=1e-5)
    for r in results:
        assert r.probabilities[p.classes[0]] == pytest.approx(1 - r.probabilities[p.classes[1]])
        assert r.threshold == 0.5 and r.calibrated is (p.temperature != 1.0)
        assert r.predicted == p.classes[int(r.probabilities[p.classes[1]] >= 0.5)]
        assert r.model_version.startswith("simple_cnn-")


def test_dicom_equals_png(predictors, breast_files):
    p = predictors["torch"]
    a = p.predict_paths(breast_files["png"])
    b = p.predict_paths(breast_files["dcm"])
    for x, y in zip(a, b):
        assert y.ok, y.error
        for c in p.classes:
            assert y.probabilities[c] == pytest.approx(x.probabilities[c], abs=1e-6)


def test_onnx_torch_parity(predictors, breast_files):
    t = predictors["torch"].predict_paths(breast_files["png"] + breast_files["dcm"])
    o = predictors["onnx"].predict_paths(breast_files["png"] + breast_files["dcm"])
    diff = max(abs(a.probabilities[c] - b.probabilities[c]) for a, b in zip(t, o) for c in a.probabilities)
    assert diff <= 1e-4
    assert not (predictors["onnx"].bundle.path / "model.onnx").exists()  # a predictor never writes the bundle
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(predictors["onnx"].logits(x), predictors["torch"].logits(x), atol=1e-4)


def test_single_file_and_bytes(predictors, breast_files):
    p = predictors["onnx"]
    f = breast_files["png"][0]
    a = p.predict_file(f)
    b = p.predict_bytes(f.read_bytes(), "upload.png", explain=True)
    assert a.probabilities == pytest.approx(b.probabilities)
    assert b.heatmap.shape == (28, 28) and 0 <= b.heatmap.min() and b.heatmap.max() <= 1
    with pytest.raises(DataError, match="upload.png"):
        p.predict_bytes(b"not an image", "upload.png")


def test_bad_files_do_not_stop_the_batch(predictors, breast_files, tmp_path):
    good = breast_files["png"][:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:50])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    missing = tmp_path / "missing.png"
    results = predictors["torch"].predict_paths([good[0], broken, text, missing, good[1]])
    assert [r.ok for r in results] == [True, False, False, False, True]
    for r, name in zip(results[1:4], ["broken.png", "notes.txt", "missing.png"]):
        assert name in r.error and "\n" not in r.error and r.probabilities == {}


def test_temperature_and_threshold_come_from_the_bundle(served_bundle, breast_files, tmp_path, reference_probs):
    copy = tmp_path / "calibrated"
    shutil.copytree(served_bundle, copy)
    meta = json.loads((copy / "bundle.json").read_text())
    meta["temperature"], meta["threshold"] = 2.0, 0.0
    write_meta(copy, meta)  # re-published with these values (a hand edit would be refused)
    p = Predictor(copy)
    results = p.predict_paths(breast_files["png"])
    b = load_bundle(copy)
    x = torch.as_tensor(breast_files["images"]).float().reshape(-1, 1, 28, 28) / 255
    with torch.inference_mode():
        expect = torch.sigmoid(b.model(x).reshape(-1) / 2.0).numpy()
    got = np.array([r.probabilities[p.classes[1]] for r in results])
    np.testing.assert_allclose(got, expect, atol=1e-5)
    assert all(r.calibrated and r.threshold == 0.0 and r.predicted == p.classes[1] for r in results)


def test_heatmaps_dir(predictors, breast_files, tmp_path):
    from PIL import Image

    out = tmp_path / "heat"
    results = predictors["onnx"].predict_paths(breast_files["png"][:3] + breast_files["dcm"][:1], heatmaps_dir=out)
    files = sorted(out.glob("*.png"))
    assert len(files) == 4 and all(r.ok for r in results)
    assert Image.open(files[0]).size == (28, 28)


def test_unknown_backend(served_bundle):
    with pytest.raises(ConfigError, match="backend"):
        Predictor(served_bundle, backend="tensorrt")


def test_expand_inputs(breast_files, tmp_path):
    (tmp_path / "sub").mkdir()
    shutil.copy(breast_files["png"][0], tmp_path / "sub" / "a.png")
    shutil.copy(breast_files["dcm"][0], tmp_path / "b.dcm")
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / ".hidden.png").write_text("x")
    assert [f.name for f in expand_inputs([tmp_path])] == ["b.dcm", "a.png"]


def test_cli_predict_csv_json_table(served_bundle, breast_files, tmp_path, capsys, reference_probs):
    csv_out = tmp_path / "preds.csv"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    assert main(["predict", str(served_bundle), str(breast_files["root"] / "png"), str(bad),
                 "--out", str(csv_out), "--backend", "onnx"]) == 1  # a file failed: exit 1, every row written
    rows = list(csv.DictReader(csv_out.open()))
    assert len(rows) == len(breast_files["png"]) + 1
    classes = load_bundle(served_bundle).classes
    np.testing.assert_allclose([float(r[f"p_{classes[1]}"]) for r in rows[:-1]],
                               reference_probs[: len(rows) - 1], atol=1e-5)
    assert rows[-1]["error"] and "bad.png" in rows[-1]["error"] and rows[-1][f"p_{classes[1]}"] == ""
    json_out = tmp_path / "preds.json"
    heat = tmp_path / "heat"
    assert main(["predict", str(served_bundle), str(breast_files["dcm"][0]), "--out", str(json_out),
                 "--heatmaps", str(heat)]) == 0
    data = json.loads(json_out.read_text())
    assert data[0]["error"] is None and set(data[0]["probabilities"]) == set(classes)
    assert len(list(heat.glob("*.png"))) == 1
    capsys.readouterr()
    assert main(["predict", str(served_bundle), str(breast_files["png"][0])]) == 0
    shown = capsys.readouterr().out
    assert any(c in shown for c in classes) and "error" in shown
    assert main(["predict", str(served_bundle), str(breast_files["png"][0]), "--out", str(tmp_path / "x.xlsx")]) == 2
    assert main(["predict", str(tmp_path), str(breast_files["png"][0])]) == 2


def test_onnx_from_other_weights_is_not_served(tmp_path):
    """model.onnx records the sha256 of the model.pt it came from: a foreign or stale file is never served."""
    from test_export import make_bundle

    from medsight.errors import MedsightError
    from medsight.export import export_onnx, source_sha256
    from medsight.utils import sha256_file

    b = make_bundle(tmp_path / "b")
    other = make_bundle(tmp_path / "other", seed=1)
    export_onnx(other)
    assert source_sha256((other / "model.onnx").read_bytes()) == sha256_file(other / "model.pt")
    (b / "model.onnx").write_bytes((other / "model.onnx").read_bytes())  # a foreign model.onnx in the bundle
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    p = Predictor(b, backend="onnx")
    np.testing.assert_allclose(p.logits(x), Predictor(b).logits(x), atol=1e-4)  # the bundle's own weights
    assert not np.allclose(Predictor(other).logits(x), Predictor(b).logits(x), atol=1e-3)
    with pytest.raises(MedsightError, match="was not exported from"):
        Predictor(b, backend="onnx", onnx_path=b / "model.onnx")


def test_ood_score_flags_foreign_images(served_bundle, medmnist_dir, tmp_path):
    """BreastMNIST model: PneumoniaMNIST chest X-rays score as more out-of-distribution than breast ultrasound."""
    from PIL import Image

    from medsight.data.sources import load_medmnist

    p = Predictor(served_bundle, backend="onnx")
    assert p.ood is not None
    pneu = load_medmnist("pneumoniamnist", 28, root=medmnist_dir, download_missing=False).splits["test"].images[:40]
    breast = load_medmnist("breastmnist", 28, root=medmnist_dir, download_missing=False).splits["test"].images[:40]
    s_in = [p.predict_array(x.astype(np.float32) / 255).ood_score for x in breast]
    s_out = [p.predict_array(x.astype(np.float32) / 255).ood_score for x in pneu]
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score([0] * len(s_in) + [1] * len(s_out), s_in + s_out)
    assert auroc >= 0.9, auroc
    f = tmp_path / "x.png"
    Image.fromarray(pneu[0, 0]).save(f)
    r = p.predict_paths([f])[0]
    assert isinstance(r.ood_score, float) and isinstance(r.ood_flag, bool)


def test_onnx_and_torch_agree_on_ood_scores_in_one_pass(served_bundle, breast_files):
    """model.onnx carries the penultimate features, so ONNX Runtime alone gives the Mahalanobis score."""
    t, o = Predictor(served_bundle, backend="torch"), Predictor(served_bundle, backend="onnx")
    assert o._feat is not None
    for f in breast_files["png"][:5]:
        a, b = t.predict_file(f), o.predict_file(f)
        assert b.ood_score == pytest.approx(a.ood_score, rel=1e-3, abs=1e-3) and a.ood_flag == b.ood_flag
    batch = np.stack([o.load_file(f) for f in breast_files["png"][:6]])
    _, s_onnx, _ = o.predict_batch(batch)
    _, s_torch, _ = t.predict_batch(batch)
    np.testing.assert_allclose(s_onnx, s_torch, rtol=1e-3, atol=1e-3)


def test_write_predictions_streams_rows_before_a_crash(predictors, breast_files, tmp_path):
    """Each row is on disk when the next file is read: a crash mid-run keeps the rows already written."""
    from medsight.predict import write_predictions

    p = predictors["torch"]
    seen: list[int] = []

    def produce():
        for pred in p.iter_predictions(breast_files["png"][:3], batch_size=1):
            yield pred
        raise RuntimeError("crash after three files")

    for suffix in (".csv", ".jsonl"):
        out = tmp_path / f"rows{suffix}"
        with pytest.raises(RuntimeError, match="crash after three files"):
            write_predictions(produce(), out, p.classes, on_row=lambda r, out=out: seen.append(len(out.read_text().splitlines())))
        lines = out.read_text().splitlines()
        if suffix == ".csv":
            assert [Path(r["file"]).name for r in csv.DictReader(lines)] == [f.name for f in breast_files["png"][:3]]
            assert seen[-3:] == [2, 3, 4]  # header + one more line on disk after each row
        else:
            assert [Path(json.loads(line)["file"]).name for line in lines] == [f.name for f in breast_files["png"][:3]]
            assert seen[-3:] == [1, 2, 3]


def test_cli_predict_escapes_markup_in_paths_and_exits_1_on_failures(served_bundle, breast_files, tmp_path, capsys):
    d = tmp_path / "in[put]"
    d.mkdir()
    shutil.copy(breast_files["png"][0], d / "[bold]a[1].png")
    (d / "[red]bad[x].png").write_bytes(b"\x89PNG broken")
    capsys.readouterr()
    assert main(["predict", str(served_bundle), str(d)]) == 1
    got = capsys.readouterr()
    assert "[red]bad[x].png" in got.err and got.err.count("error:") == 1 and "Traceback" not in got.err
    assert "1 of 2 files could not be used" in got.out
    assert main(["predict", str(served_bundle), str(d / "[bold]a[1].png"), "--out", str(tmp_path / "ok[1].jsonl")]) == 0
    assert "1 prediction written to " + str(tmp_path / "ok[1].jsonl") in capsys.readouterr().out
