"""Image + clinical fusion: the tabular encoder (imputation, indicators, one-hot + unknown, errors naming the
column), the fusion model (modes, Grad-CAM reachability, bound tabular vector), and a synthetic task where the
label needs BOTH modalities, on which fusion must beat image-only and tabular-only models."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from medsight.config import load_config
from medsight.errors import ConfigError, DataError
from fusion_training import fit_fusion, fit_tabular, fusion_logits, synthetic_xor
from medsight.fusion import FUSION_MODES, FusionClassifier, TabularEncoder, encode_tabular, fusion_meta, model_with_tab
from medsight.models import create_model
from medsight.tasks import Task

ROWS = [{"age": 50, "sex": "F", "smoker": 1}, {"age": "70", "sex": "M", "smoker": 0},
        {"age": None, "sex": "F", "smoker": 1}, {"age": 90.0, "sex": None, "smoker": 0}]


def test_encoder_imputes_standardises_and_one_hots():
    enc = TabularEncoder.fit(ROWS, numeric=["age"], categorical=["sex", "smoker"])
    assert enc.numeric[0]["median"] == 70 and enc.numeric[0]["mean"] == pytest.approx(70)
    assert enc.feature_names == ["age", "age__missing", "sex=F", "sex=M", "sex=unknown", "smoker=0", "smoker=1",
                                 "smoker=unknown"]
    x = enc.transform(ROWS + [{"age": "", "sex": "X", "smoker": "2"}])
    std = np.std([50, 70, 90])
    np.testing.assert_allclose(x[:, 0], [(50 - 70) / std, 0, 0, (90 - 70) / std, 0], rtol=1e-6)
    assert x[:, 1].tolist() == [0, 0, 1, 0, 1]  # missing indicators
    assert x[3, 2:5].tolist() == [0, 0, 1] and x[4, 2:5].tolist() == [0, 0, 1]  # missing / unseen -> unknown
    assert x[4, 5:8].tolist() == [0, 0, 1]
    assert x.dtype == np.float32 and x.shape == (5, enc.n_features)


def test_rows_and_columns_agree_and_spec_roundtrips_through_json():
    spec = fit_tabular(ROWS, numeric=["age"], categorical=["sex"])
    spec = json.loads(json.dumps(spec))
    cols = {"age": [r["age"] for r in ROWS], "sex": [r["sex"] for r in ROWS], "unused": [1, 2, 3, 4]}
    np.testing.assert_array_equal(encode_tabular(ROWS, spec), encode_tabular(cols, spec))
    enc = TabularEncoder.from_dict(spec)
    np.testing.assert_array_equal(encode_tabular(ROWS, enc), encode_tabular(ROWS, spec))
    assert spec["feature_names"] == enc.feature_names


@pytest.mark.parametrize("case", range(17), ids=['column-age-expected-a-number-got-abc-row', 'column-age-expected-a-number-got-true', 'column-age-expected-a-finite-number', 'column-age-expected-a-number-got-list', 'column-sex-expected-a-category', 'column-sex-is-missing-in-row-0-required-', 'column-sex-is-missing-required-age-sex', 'column-sex-has-2-values-but-column-age-h', 'column-age-expected-a-list-of-values-got', 'row-0-expected-a-dict', 'list-of-row-dicts-or-a-dict-of-columns', 'column-age-has-no-numeric-values', 'no-training-rows', 'at-least-one-numeric-or-categorical-colu', 'listed-twice-age', 'not-a-tabular-encoder-spec', 'spec-is-malformed'])
def test_encoder_refusals_name_the_column(case):
    enc = TabularEncoder.fit(ROWS, numeric=["age"], categorical=["sex"])
    refusals = [
        (DataError, r"column 'age': expected a number, got 'abc' \(row 1\)",
         lambda: enc.transform([{"age": 3, "sex": "F"}, {"age": "abc", "sex": "F"}])),
        (DataError, "column 'age': expected a number, got True",
         lambda: enc.transform([{"age": True, "sex": "F"}])),
        (DataError, "column 'age': expected a finite number",
         lambda: enc.transform([{"age": float("inf"), "sex": "F"}])),
        (DataError, "column 'age': expected a number, got list",
         lambda: enc.transform([{"age": [1], "sex": "F"}])),
        (DataError, "column 'sex': expected a category",
         lambda: enc.transform([{"age": 1, "sex": 2.5}])),
        (DataError, r"column 'sex' is missing in row 0 \(required: age, sex\)",
         lambda: enc.transform([{"age": 1}])),
        (DataError, r"column 'sex' is missing \(required: age, sex\)",
         lambda: enc.transform({"age": [1]})),
        (DataError, "column 'sex' has 2 values, but column 'age' has 1",
         lambda: enc.transform({"age": [1], "sex": ["F", "M"]})),
        (DataError, "column 'age': expected a list of values, got str",
         lambda: enc.transform({"age": "12", "sex": ["F"]})),
        (DataError, "row 0: expected a dict",
         lambda: enc.transform([[1, "F"]])),
        (DataError, "list of row dicts or a dict of columns",
         lambda: enc.transform("age=1")),
        (DataError, "column 'age' has no numeric values",
         lambda: TabularEncoder.fit([{"age": None}], numeric=["age"])),
        (DataError, "no training rows",
         lambda: TabularEncoder.fit([], numeric=["age"])),
        (ConfigError, "at least one numeric or categorical column",
         lambda: TabularEncoder.fit(ROWS)),
        (ConfigError, "listed twice: age",
         lambda: TabularEncoder.fit(ROWS, numeric=["age"], categorical=["age"])),
        (DataError, "not a tabular encoder spec",
         lambda: encode_tabular(ROWS, {"numeric": []})),
        (DataError, "spec is malformed",
         lambda: TabularEncoder.from_dict({"format": "medsight-tabular/1", "numeric": [{"name": "age"}]})),
    ]
    error, message, call = refusals[case]
    with pytest.raises(error, match=message):
        call()


def _image_model(width=0.5, side=16):
    return create_model("simple_cnn", input_size=side, num_outputs=1, width=width)


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_fusion_modes_forward_and_gradcam_reachability(mode):
    torch.manual_seed(0)
    m = FusionClassifier(None if mode == "tabular" else _image_model(), 5, 3, mode)
    x, tab = torch.rand(4, 1, 16, 16), torch.randn(4, 5)
    assert m(x, tab).shape == (4, 3)
    if mode == "tabular":
        return
    convs = [mod for mod in m.image.modules() if isinstance(mod, nn.Conv2d)]
    assert convs and not isinstance(list(m.image.modules())[-1], nn.Linear)  # last Linear became Identity
    bound = m.model_with_tab(tab[0].numpy())
    np.testing.assert_allclose(bound(x).detach(), m(x, tab[:1].expand(4, -1)).detach(), atol=1e-6)
    np.testing.assert_allclose(model_with_tab(m, tab).forward(x).detach(), m(x, tab).detach(), atol=1e-6)
    # Grad-CAM: the last conv is reachable through the bound, image-only callable, and gradients reach it
    last_conv = [mod for mod in bound.modules() if isinstance(mod, nn.Conv2d)][-1]
    acts = []
    h = last_conv.register_forward_hook(lambda mod, i, o: acts.append(o.shape))
    bound.zero_grad()
    bound(x)[:, 0].sum().backward()
    h.remove()
    assert acts == [(4, last_conv.out_channels, 5, 5)]  # 16 -> conv 14 -> pool 7 -> conv 5
    assert last_conv.weight.grad is not None and last_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("case", range(15), ids=['unknown-fusion-mode-sum', 'needs-n-tab-1', 'needs-an-image-model', 'no-final-nn-linear', 'num-outputs-and-hidden', 'tabular-input-must-have-shape-n-3', 'tabular-vector-must-have-3-features', 'bound-tabular-input-has-2-rows-the-image', 'needs-images', 'needs-the-encoded-tabular-rows', 'needs-a-medsight-tasks-task', 'needs-3-outputs-the-model-has-1', 'train-3-images-but-4-labels', 'val-2-tabular-rows-but-4-labels', 'tabular-array-must-be-n-3'])
def test_fusion_model_refusals(case):
    m = FusionClassifier(_image_model(), 3, 1)
    task = Task("binary", 2)
    x, t, y = np.zeros((4, 1, 16, 16), np.uint8), np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1])
    refusals = [
        (ConfigError, "unknown fusion mode 'sum'",
         lambda: FusionClassifier(_image_model(), 3, 1, "sum")),
        (ConfigError, "needs n_tab >= 1",
         lambda: FusionClassifier(_image_model(), 0, 1, "concat")),
        (ConfigError, "needs an image model",
         lambda: FusionClassifier(None, 3, 1, "film")),
        (ConfigError, "no final nn.Linear",
         lambda: FusionClassifier(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), 3, 1)),
        (ConfigError, "num_outputs and hidden",
         lambda: FusionClassifier(_image_model(), 3, 0)),
        (DataError, r"tabular input must have shape \(N, 3\)",
         lambda: m(torch.rand(2, 1, 16, 16), torch.rand(2, 4))),
        (DataError, "tabular vector must have 3 features",
         lambda: m.model_with_tab(np.zeros(4))),
        (DataError, "bound tabular input has 2 rows; the image batch has 3",
         lambda: m.model_with_tab(np.zeros((2, 3)))(torch.rand(3, 1, 16, 16))),
        (DataError, "needs images",
         lambda: fusion_logits(m, None, np.zeros((2, 3)))),
        (DataError, "needs the encoded tabular rows",
         lambda: fusion_logits(m, np.zeros((2, 1, 16, 16), np.uint8), None)),
        (ConfigError, "needs a medsight.tasks.Task",
         lambda: fit_fusion(m, "binary", (x, t, y), (x, t, y))),
        (ConfigError, "needs 3 outputs, the model has 1",
         lambda: fit_fusion(m, Task("multiclass", 3), (x, t, y), (x, t, y))),
        (DataError, "train: 3 images but 4 labels",
         lambda: fit_fusion(m, task, (x[:3], t, y), (x, t, y))),
        (DataError, "val: 2 tabular rows but 4 labels",
         lambda: fit_fusion(m, task, (x, t, y), (x, t[:2], y))),
        (DataError, r"tabular array must be \(N, 3\)",
         lambda: fit_fusion(m, task, (x, t[:, :2], y), (x, t, y))),
    ]
    error, message, call = refusals[case]
    with pytest.raises(error, match=message):
        call()


make_xor = synthetic_xor


@pytest.mark.slow
def test_fusion_beats_each_single_modality_on_synthetic_data():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr, va, te = make_xor(1200, 0), make_xor(300, 1), make_xor(500, 2)
        enc = TabularEncoder.fit(tr[1], numeric=["age", "bmi"], categorical=["sex"])
        tabs = [encode_tabular(s[1], enc.to_dict()) for s in (tr, va, te)]
        cfg = load_config(None, {"train.epochs": 12, "train.batch_size": 64, "train.lr": 3e-3, "train.seed": 0,
                                 "train.device": "cpu"})
        auc = {}
        for mode in ("tabular", "image", "concat", "film", "gated"):
            torch.manual_seed(0)
            m = FusionClassifier(None if mode == "tabular" else _image_model(), enc.n_features, 1, mode)
            r = fit_fusion(m, Task("binary", 2), (tr[0], tabs[0], tr[2]), (va[0], tabs[1], va[2]), cfg=cfg)
            assert len(r.history) == 12 and 1 <= r.best_epoch <= 12
            auc[mode] = roc_auc_score(te[2], fusion_logits(r.model, te[0], tabs[2]).reshape(-1).numpy())
    finally:
        torch.set_num_threads(threads)
    single = max(auc["image"], auc["tabular"])
    assert single < 0.65, auc
    for mode in ("concat", "film", "gated"):
        assert auc[mode] > 0.9 and auc[mode] > single + 0.2, auc


def test_fusion_meta_rebuilds_the_same_model():
    enc = TabularEncoder.fit(ROWS, numeric=["age"], categorical=["sex"])
    torch.manual_seed(0)
    m = FusionClassifier(_image_model(), enc.n_features, 1, "film", hidden=16, dropout=0.1).eval()
    meta = json.loads(json.dumps(fusion_meta(m, enc)))
    assert meta["columns"] == ["age", "sex"] and meta["mode"] == "film"
    from medsight.fusion import build_fusion

    back = build_fusion(meta, _image_model())
    back.load_state_dict(m.state_dict())
    back.eval()
    x, tab = torch.rand(2, 1, 16, 16), torch.as_tensor(encode_tabular(ROWS[:2], meta["tabular"]))
    assert torch.allclose(back(x, tab), m(x, tab))
    with pytest.raises(DataError, match="fusion metadata is malformed"):
        build_fusion({"mode": "concat"}, _image_model())
    with pytest.raises(ConfigError, match="encoder yields 5 features, the fusion model expects 3"):
        fusion_meta(FusionClassifier(_image_model(), 3, 1), enc)


def _xor_manifest(root, n_train=800, n_val=200, n_test=200):
    """The XOR task written out as PNG files + a CSV manifest with clinical columns (age numeric, site categorical)."""
    import csv

    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", n_test, 3)):
        imgs, clin, y = make_xor(n, seed)
        for i in range(n):
            p = root / f"{split}_{i:04d}.png"
            Image.fromarray(imgs[i, 0]).save(p)
            age = clin[i]["age"]
            rows.append({"path": p.name, "label": int(y[i]), "split": split, "age": "" if age is None else age,
                         "site": clin[i]["sex"]})
    man = root / "manifest.csv"
    with open(man, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return man


@pytest.mark.slow
def test_fusion_end_to_end_from_a_manifest(tmp_path):
    """--data manifest.csv with data.clinical_columns trains a fusion bundle that reloads to the same logits."""
    from medsight.bundle import load_bundle
    from medsight.config import load_config
    from medsight.data.sources import load_dataset
    from medsight.errors import MedsightError
    from medsight.evaluate import split_logits
    from medsight.pipeline import run_training

    man = _xor_manifest(tmp_path / "xor")
    cfg = load_config(None, {"data.name": str(man), "data.size": 16, "data.clinical_columns": ["age", "site"],
                             "model.fusion": "concat", "model.width": 0.5, "train.epochs": 12, "train.batch_size": 64, "train.lr": 3e-3,
                             "train.n_boot": 0})
    data = load_dataset(str(man), size=16, clinical_columns=["age", "site"])
    assert data.splits["train"].clinical[0].keys() >= {"age", "site"}
    out, result, metrics = run_training(cfg, tmp_path / "run", data=data)
    b = load_bundle(out)
    assert b.fusion["columns"] == ["age", "site"] and b.fusion["tabular"]
    logits = split_logits(b, data, "test")
    from medsight.fusion import encode_tabular

    again = fusion_logits(result.model, data.splits["test"].images,
                          encode_tabular(data.splits["test"].clinical, b.fusion["tabular"]))
    torch.testing.assert_close(logits, again, rtol=0, atol=1e-5)
    assert metrics["test"]["auc"]["value"] > 0.85
    no_clin = load_dataset(str(man), size=16)
    with pytest.raises(MedsightError, match="clinical columns"):
        split_logits(b, no_clin, "test")


def test_fusion_bundle_in_predictor_cli_and_service(tmp_path):
    """Clinical values are required at prediction (Predictor, `medsight predict --clinical-csv`, REST form field)."""
    import csv

    from fastapi.testclient import TestClient

    from medsight.cli import main
    from medsight.config import load_config
    from medsight.errors import DataError
    from medsight.pipeline import run_training
    from medsight.predict import Predictor
    from medsight.serve.app import create_app

    man = _xor_manifest(tmp_path / "xor", n_train=200, n_val=60, n_test=20)
    cfg = load_config(None, {"data.name": str(man), "data.size": 16, "data.clinical_columns": ["age", "site"],
                             "model.fusion": "film", "model.width": 0.5, "train.epochs": 2, "train.n_boot": 0})
    out, _, _ = run_training(cfg, tmp_path / "run")
    png = tmp_path / "xor" / "test_0000.png"
    p = Predictor(out, backend="torch")
    r = p.predict_file(png, clinical={"age": 70, "site": "F"}, explain=True)
    assert set(r.probabilities) == {"0", "1"} and r.heatmap.shape == (16, 16)
    assert isinstance(r.ood_flag, bool) and r.ood_score is not None  # image + clinical bundles carry a detector too
    with pytest.raises(DataError, match="age"):
        p.predict_file(png)
    with pytest.raises(DataError, match="column 'age'"):
        p.predict_file(png, clinical={"age": "old", "site": "F"})
    onnx = Predictor(out, backend="onnx")  # two inputs: the image and the encoded clinical row
    ro = onnx.predict_file(png, clinical={"age": 70, "site": "F"})
    assert ro.probabilities["1"] == pytest.approx(r.probabilities["1"], abs=1e-5)
    assert ro.ood_score == pytest.approx(r.ood_score, rel=1e-4)

    clin = tmp_path / "clin.csv"
    with open(clin, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "age", "site"])
        w.writerow(["test_0000.png", "70", "F"])
    assert main(["predict", str(out), str(png), "--clinical-csv", str(clin), "--out", str(tmp_path / "p.json")]) == 0
    rows = json.loads((tmp_path / "p.json").read_text())
    assert rows[0]["error"] is None and rows[0]["probabilities"]["1"] == pytest.approx(r.probabilities["1"], abs=1e-6)

    client = TestClient(create_app(out, backend="torch"))
    assert client.get("/v1/model").json()["clinical_columns"] == ["age", "site"]
    files = {"file": ("x.png", png.read_bytes(), "image/png")}
    ok = client.post("/v1/predict", files=files, data={"clinical": json.dumps({"age": 70, "site": "F"})})
    assert ok.status_code == 200 and ok.json()["probabilities"]["1"] == pytest.approx(r.probabilities["1"], abs=1e-6)
    missing = client.post("/v1/predict", files=files)
    assert missing.status_code == 422 and "age" in missing.json()["detail"]
    bad = client.post("/v1/predict", files=files, data={"clinical": "{not json"})
    assert bad.status_code == 422 and "clinical" in bad.json()["detail"]
