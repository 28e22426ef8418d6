"""One bundle, one answer: `evaluate`'s per-case output, Predictor (PyTorch), Predictor (ONNX Runtime) and the REST
service give the same probabilities for the same test files, for every kind of bundle."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from medsight.cli import main
from medsight.config import load_config
from medsight.pipeline import run_training
from medsight.predict import Predictor

ATOL = 1e-5
N = {"train": 48, "val": 24, "test": 8}


def _images(kind: str, n: int, rng) -> np.ndarray:
    side = 12 if kind == "3d" else 16
    shape = (n, side, side, side) if kind == "3d" else (n, side, side)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _manifest(root, kind: str, seed: int = 0):
    """Files + CSV manifest for one bundle kind; returns (manifest, test file paths, clinical rows by file)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows, test_files, clinical = [], [], {}
    k = {"multiclass": 3, "ordinal": 3}.get(kind, 2)
    for split, n in N.items():
        imgs = _images(kind, n, rng)
        for i in range(n):
            if kind == "3d":
                import nibabel as nib

                name = f"{split}_{i:03d}.nii.gz"
                nib.save(nib.Nifti1Image(imgs[i], np.eye(4)), str(root / name))
            else:
                name = f"{split}_{i:03d}.png"
                Image.fromarray(imgs[i]).save(root / name)
            row = {"path": name, "split": split}
            if kind == "multilabel":
                lab = [int(v) for v in rng.integers(0, 2, 3)]
                lab[i % 3] = 1  # every label present
                row.update({"a": lab[0], "b": lab[1], "c": lab[2]})
            else:
                row["label"] = f"c{i % k}"
            if kind == "fusion":
                row.update({"age": int(rng.integers(20, 90)), "site": "FM"[i % 2]})
                clinical[name] = {"age": row["age"], "site": row["site"]}
            rows.append(row)
            if split == "test":
                test_files.append(root / name)
    man = root / "manifest.csv"
    with open(man, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return man, test_files, clinical


CASES = {
    "2d-binary": ("2d", {}),
    "2d-binary-tta-lr": ("2d", {"train.tta_flip": [2]}),
    "2d-binary-no-temperature": ("2d", {"train.calibrate": False, "train.tta_flip": [1, 2]}),
    "3d-binary-tta": ("3d", {"train.tta_flip": [1]}),
    "multiclass": ("multiclass", {"train.tta_flip": [2]}),
    "multilabel": ("multilabel", {"data.label_columns": ["a", "b", "c"]}),
    "ordinal": ("ordinal", {"data.task": "ordinal"}),
    "2d-binary-ensemble": ("2d", {"train.ensemble": 2, "train.tta_flip": [2]}),
    "3d-binary-ensemble": ("3d", {"train.ensemble": 2}),
    "multiclass-ensemble": ("multiclass", {"train.ensemble": 3, "model.name": "cnn6"}),
    # fine-tuned from local weights in torchvision's layout (3-channel stem summed to 1 channel, new head): the
    # bundle must not need the weights file again, and every path must agree
    "2d-binary-pretrained": ("2d", {"model.name": "resnet18", "model.width": 1.0, "model.stem": "standard",
                                    "model.pretrained": "<local file>", "train.tta_flip": [2]}),
    "image+clinical": ("fusion", {"data.clinical_columns": ["age", "site"], "model.fusion": "concat",
                                  "train.tta_flip": [2]}),
}


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    return _train(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def clinical_bundle(tmp_path_factory):
    return _train("image+clinical", tmp_path_factory)


def _train(case: str, tmp_path_factory):
    kind, extra = CASES[case]
    root = tmp_path_factory.mktemp(case)
    man, files, clinical = _manifest(root / "data", kind)
    size = 12 if kind == "3d" else 16
    if extra.get("model.pretrained") == "<local file>":
        extra = {**extra, **_local_weights(root)}
    cfg = load_config(None, {"data.name": str(man), "data.size": size, "model.name": "simple_cnn",
                             "model.width": 0.25, "train.epochs": 1, "train.batch_size": 16, "train.n_boot": 0,
                             "train.threads": 1, "train.device": "cpu", **extra})
    out, _, _ = run_training(cfg, root / "bundle")
    if cfg.model.pretrained:
        import shutil

        assert json.loads((out / "bundle.json").read_text())["pretrained"]["sha256"] == cfg.model.pretrained_sha256
        shutil.rmtree(root / "weights")  # the bundle alone must serve
    return case, out, files, clinical


def _local_weights(root) -> dict:
    """A ResNet-18 state dict as torchvision ships it (3 channels, 1000 classes) in ``root/weights/src``; the
    caller removes ``root/weights`` after training: prediction must use the bundle's weights alone."""
    from test_pretrained import weights_file

    f, digest, _ = weights_file(root / "weights")
    return {"model.pretrained": str(f), "model.pretrained_sha256": digest}


def _rows(probabilities: dict, classes) -> np.ndarray:
    return np.array([probabilities[c] for c in classes])


def test_every_path_gives_the_same_probabilities(trained):
    from fastapi.testclient import TestClient

    from medsight.serve.app import create_app

    name, out, files, clinical = trained
    assert main(["evaluate", str(out), "--split", "test", "--n-boot", "0", "--no-report"]) == 0
    with open(out / "cases_test.csv", newline="") as fh:
        cases = {r["case"]: r for r in csv.DictReader(fh)}
    torch_p = Predictor(out, backend="torch")
    onnx_p = Predictor(out, backend="onnx")
    classes = torch_p.classes
    client = TestClient(create_app(out, backend="onnx"))
    compared = 0
    for f in files:
        row = clinical.get(f.name)
        evaluated = np.array([float(cases[f.name][f"p_{c}"]) for c in classes])
        a = torch_p.predict_file(f, clinical=row)
        b = onnx_p.predict_file(f, clinical=row)
        data = {"clinical": json.dumps(row)} if row is not None else None
        r = client.post("/v1/predict", files={"file": (f.name, f.read_bytes(), "application/octet-stream")}, data=data)
        assert r.status_code == 200, r.text
        served = r.json()
        for got in (_rows(a.probabilities, classes), _rows(b.probabilities, classes),
                    _rows(served["probabilities"], classes)):
            np.testing.assert_allclose(got, evaluated, atol=ATOL, err_msg=f"{name}: {f.name}")
        assert a.predicted == b.predicted == served["predicted"]
        # one needs-review decision, with the same words, on every path (medsight.review)
        assert a.review == b.review == served["review"], f"{name}: {f.name}"
        assert a.review_reasons == b.review_reasons == served["review_reasons"], f"{name}: {f.name}"
        if torch_p.members:  # seed ensembles: the members' spread agrees too, and is the spread of real members
            spreads = [a.member_spread, b.member_spread, served["member_spread"]]
            assert all(s is not None for s in spreads), spreads
            flat = [np.atleast_1d(list(s.values()) if isinstance(s, dict) else s) for s in spreads]
            for got in flat[1:]:
                np.testing.assert_allclose(got, flat[0], atol=1e-4, err_msg=f"{name}: {f.name} spread")
            assert float(np.max(flat[0])) > 0  # members trained from different seeds disagree somewhat
        else:
            assert a.member_spread is None and "member_spread" not in served
        if a.ood_score is not None:  # the OOD score comes from the same pass on every backend
            assert b.ood_score == pytest.approx(a.ood_score, rel=1e-4, abs=1e-3)
            assert served["ood_flag"] == a.ood_flag
        compared += 1
    assert compared == len(files) == N["test"]
    if torch_p.members:  # the bundle says how the members did beside the ensemble, in its summary and numbers
        meta = json.loads((out / "bundle.json").read_text())
        ens = meta["ensemble"]
        assert ens["members"] == torch_p.members == len(ens["splits"]["test"]["members"])
        assert ens["seeds"] == list(range(ens["members"]))
        assert any(line.startswith("seed ensemble of") for line in meta["training_summary"])


def test_left_right_tta_makes_mirror_images_agree(tmp_path_factory):
    """With tta_flip=[2] an image and its left-right mirror get identical probabilities from predict and the
    service."""
    from fastapi.testclient import TestClient

    from medsight.serve.app import create_app

    root = tmp_path_factory.mktemp("mirror")
    man, files, _ = _manifest(root / "data", "2d", seed=3)
    cfg = load_config(None, {"data.name": str(man), "data.size": 16, "model.width": 0.25, "train.epochs": 1,
                             "train.n_boot": 0, "train.threads": 1, "train.tta_flip": [2]})
    out, _, _ = run_training(cfg, root / "bundle")
    img = np.asarray(Image.open(files[0]))
    mirror = root / "mirror.png"
    Image.fromarray(np.ascontiguousarray(img[:, ::-1])).save(mirror)
    assert not np.array_equal(img, img[:, ::-1])
    for backend in ("torch", "onnx"):
        p = Predictor(out, backend=backend)
        a, b = p.predict_file(files[0]), p.predict_file(mirror)
        assert a.probabilities == b.probabilities
    client = TestClient(create_app(out))
    got = [client.post("/v1/predict", files={"file": (f.name, f.read_bytes(), "image/png")}).json()["probabilities"]
           for f in (files[0], mirror)]
    assert got[0] == got[1]
    # without TTA the same model would tell them apart: the agreement is the TTA's doing
    from medsight.bundle import load_bundle
    from medsight.inference import run_logits

    b = load_bundle(out)
    x = np.stack([img, img[:, ::-1]])[:, None]
    plain = run_logits(b.model, x).numpy()
    assert not np.allclose(plain[0], plain[1], atol=1e-7)
    tta = run_logits(b.model, x, tta_flip=[2]).numpy()
    np.testing.assert_array_equal(tta[0], tta[1])


def test_every_command_on_an_image_plus_clinical_bundle(clinical_bundle, tmp_path, capsys):
    name, out, files, clinical = clinical_bundle
    clin = tmp_path / "clin.csv"
    with open(clin, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "age", "site"])
        for f in files:
            w.writerow([f.name, clinical[f.name]["age"], clinical[f.name]["site"]])
    assert main(["evaluate", str(out), "--n-boot", "0", "--shift", "--shift-severities", "1",
                 "--shift-corruptions", "gamma"]) == 0
    assert "Grad-CAM" in (out / "report.html").read_text() or "<img" in (out / "report.html").read_text()
    assert main(["explain", str(out), str(files[0]), "--clinical-csv", str(clin), "--out", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / f"{files[0].name.split('.')[0]}_overlay.png").is_file()
    assert main(["predict", str(out), str(files[0]), "--clinical-csv", str(clin), "--out", str(tmp_path / "p.csv")]) == 0
    assert main(["export", str(out), "--format", "onnx"]) == 0
    import onnx

    m = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in m.graph.input] == ["input", "clinical"]
    # without the clinical values: one line, exit non-zero, no traceback
    capsys.readouterr()
    rc = main(["explain", str(out), str(files[0]), "--out", str(tmp_path / "e2")])
    err = capsys.readouterr().err
    assert rc != 0 and "age" in err and "Traceback" not in err
