"""ONNX export: dynamic batch axis, parity with PyTorch, atomic write, registry models in 2D and 3D."""

import numpy as np
import pytest
import torch

from medsight.bundle import make_meta, save_bundle
from medsight.data.preprocess import make_recipe
from medsight.cli import main
from medsight.errors import MedsightError
from medsight.models import create_model


def make_bundle(out, name="simple_cnn", dims=2, size=28, channels=1, classes=("neg", "pos"), task="binary", seed=0):
    n_out = 1 if task == "binary" else len(classes)
    torch.manual_seed(seed)
    model = create_model(name, spatial_dims=dims, in_channels=channels, num_outputs=n_out, input_size=size)
    model.set_input_stats([0.3] * channels, [0.2] * channels)
    spec = {"name": name, "spatial_dims": dims, "in_channels": channels, "num_outputs": n_out,
            "input_size": [size] * dims, "stem": "auto", "width": 1.0, "dropout": 0.0}
    recipe = make_recipe(size=[size] * dims, spatial_dims=dims, channels=channels, intensity="range",
                         value_range=(0.0, 255.0))
    meta = make_meta(model_spec=spec, task=task, classes=list(classes), recipe=recipe, data_name="synthetic",
                     best_epoch=1, monitor="auc")
    return save_bundle(out, model.eval(), meta)


@pytest.mark.parametrize("name,dims,size", [("simple_cnn", 2, 28), ("resnet18", 2, 28), ("simple_cnn", 3, 16)])
def test_export_parity_dynamic_batch(tmp_path, name, dims, size):
    import onnx
    import onnxruntime as ort

    from medsight.bundle import load_bundle
    from medsight.export import export_onnx

    b = make_bundle(tmp_path / name, name, dims, size)
    path = export_onnx(b)
    assert path == b / "model.onnx" and path.is_file()
    onnx.checker.check_model(str(path))
    assert not list(b.glob(".model.onnx.*"))  # no temp files left
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = load_bundle(b).model
    for n in (1, 3):
        x = np.random.default_rng(n).random((n, 1, *([size] * dims)), dtype=np.float32)
        got = sess.run(None, {"input": x})[0]
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        assert got.shape == ref.shape == (n, 1)
        assert np.abs(got - ref).max() <= 1e-4


def test_export_multiclass_rgb_to_custom_path(tmp_path):
    from medsight.export import export_onnx

    b = make_bundle(tmp_path / "b", channels=3, classes=("a", "b", "c"), task="multiclass")
    out = export_onnx(b, out=tmp_path / "elsewhere.onnx")
    assert out == tmp_path / "elsewhere.onnx" and out.is_file() and not (b / "model.onnx").exists()


def test_export_refuses_when_parity_fails(tmp_path, monkeypatch):
    from medsight import export

    b = make_bundle(tmp_path / "b")
    monkeypatch.setattr(export, "parity_error", lambda *a, **k: 0.5)
    with pytest.raises(MedsightError, match="does not match PyTorch"):
        export.export_onnx(b)
    assert not (b / "model.onnx").exists()


def test_export_not_a_bundle(tmp_path):
    from medsight.export import export_onnx

    with pytest.raises(MedsightError, match="not a medsight bundle"):
        export_onnx(tmp_path)


def test_cli_export(tmp_path, capsys):
    b = make_bundle(tmp_path / "b")
    assert main(["export", str(b), "--format", "onnx"]) == 0
    assert (b / "model.onnx").is_file()
    assert main(["export", str(b), "--format", "tflite"]) == 2
    assert "tflite" in capsys.readouterr().err
