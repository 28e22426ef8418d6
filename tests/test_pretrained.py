"""Pretrained weights through the real download code, pointed at file:// sources this test creates (no network
here): hash checked, cached and used offline, RGB first conv adapted to one channel, head left alone, unsafe
pickles refused, and a fine-tuning run records what it loaded and trains the backbone at a lower rate."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from medsight import pretrained as P
from medsight.config import load_config
from medsight.errors import ConfigError, DataError
from medsight.models import create_model


def weights_file(tmp_path, *, spatial_dims=2, name="resnet18"):
    """A torchvision-layout ResNet-18 state dict (3 input channels, ImageNet stem, 1000 classes), saved under a
    name carrying its sha256 prefix, as torchvision names its files."""
    torch.manual_seed(1)
    src = create_model(name, spatial_dims=spatial_dims, in_channels=3, num_outputs=1000, input_size=64,
                       stem="standard").net
    state = {k: v.clone() for k, v in src.state_dict().items()}
    tmp = tmp_path / "src" / "weights.pth"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    final = tmp.with_name(f"{name}-{digest[:8]}.pth")
    tmp.rename(final)
    return final, digest, state


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSIGHT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def test_imagenet_weights_download_verify_adapt_and_work_offline(tmp_path, cache, monkeypatch):
    f, digest, state = weights_file(tmp_path)
    monkeypatch.setitem(P.WEIGHTS, ("resnet18", "imagenet"), (f.as_uri(), digest[:8], 2))
    model = create_model("resnet18", in_channels=1, num_outputs=1, input_size=64, stem="standard")
    head_before = model.net.fc.weight.clone()
    rep = P.apply_pretrained(model, "resnet18", "imagenet", 2)
    assert rep["sha256"] == digest and rep["adapted"] == ["conv1.weight"] and rep["head"] == "fc"
    assert rep["filled"] == rep["weight_tensors"]  # every backbone weight tensor came from the file
    net = model.net.state_dict()
    torch.testing.assert_close(net["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(net["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    torch.testing.assert_close(net["layer2.0.bn1.running_var"], state["layer2.0.bn1.running_var"])
    assert torch.equal(model.net.fc.weight, head_before)  # the head is the new task's, not ImageNet's
    cached = cache / "imagenet" / f.name
    assert cached.is_file() and not list(cache.rglob("*.part"))
    # offline: the source is gone, the cached file is used (and checked again)
    f.unlink()
    model2 = create_model("resnet18", in_channels=1, num_outputs=1, input_size=64, stem="standard")
    assert P.apply_pretrained(model2, "resnet18", "imagenet", 2)["sha256"] == digest
    # a cached file that was changed afterwards is refused
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataError, match="sha256"):
        P.apply_pretrained(model2, "resnet18", "imagenet", 2)


def test_a_download_with_the_wrong_hash_is_refused_and_not_cached(tmp_path, cache, monkeypatch):
    f, digest, _ = weights_file(tmp_path)
    monkeypatch.setitem(P.WEIGHTS, ("resnet18", "imagenet"), (f.as_uri(), "00000000", 2))
    model = create_model("resnet18", in_channels=1, num_outputs=1, input_size=64, stem="standard")
    with pytest.raises(DataError, match="sha256"):
        P.apply_pretrained(model, "resnet18", "imagenet", 2)
    assert not list(cache.rglob("*.pth"))


def test_medicalnet_has_no_published_digest_so_the_first_one_is_pinned(tmp_path, cache, monkeypatch):
    f, digest, state = weights_file(tmp_path, spatial_dims=3)
    monkeypatch.setitem(P.WEIGHTS, ("resnet18", "medicalnet"), (f.as_uri(), None, 3))
    model = create_model("resnet18", spatial_dims=3, in_channels=1, num_outputs=1, input_size=28, stem="standard")
    rep = P.apply_pretrained(model, "resnet18", "medicalnet", 3)
    assert (cache / "medicalnet" / (f.name + ".sha256")).read_text().strip() == digest == rep["sha256"]
    torch.testing.assert_close(model.net.state_dict()["layer4.1.conv1.weight"], state["layer4.1.conv1.weight"])
    (cache / "medicalnet" / f.name).write_bytes(b"not the same file")
    with pytest.raises(DataError, match="sha256"):
        P.apply_pretrained(model, "resnet18", "medicalnet", 3)
    with pytest.raises(ConfigError, match="3D"):
        P.apply_pretrained(create_model("resnet18"), "resnet18", "medicalnet", 2)


def test_weights_for_another_architecture_and_unsafe_pickles_are_refused(tmp_path, cache):
    f, _, _ = weights_file(tmp_path)
    with pytest.raises(DataError, match="fit only"):
        P.apply_pretrained(create_model("densenet121", input_size=64), "densenet121", str(f), 2)

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": Boom()}, bad)
    with pytest.raises(DataError, match="only plain tensor state dicts"):
        P.apply_pretrained(create_model("resnet18"), "resnet18", str(bad), 2)
    with pytest.raises(ConfigError, match="neither"):
        P.apply_pretrained(create_model("resnet18"), "resnet18", str(tmp_path / "missing.pth"), 2)
    with pytest.raises(ConfigError, match="no imagenet weights"):
        P.apply_pretrained(create_model("cnn6"), "cnn6", "imagenet", 2)


def test_fine_tuning_run_records_the_weights_and_trains_the_backbone_slower(tmp_path, cache):
    from medsight.data.sources import load_dataset
    from medsight.pipeline import run_training
    from medsight.train import build_optimizer
    from tests.conftest import make_npz

    f, digest, _ = weights_file(tmp_path)
    npz = make_npz(tmp_path / "t.npz", n=(32, 16, 8), shape=(32, 32))
    cfg = load_config(None, {"data.name": str(npz), "model.name": "resnet18", "model.stem": "standard",
                             "model.pretrained": str(f), "model.pretrained_sha256": digest, "train.epochs": 1,
                             "train.batch_size": 16, "train.n_boot": 0, "train.threads": 1, "train.warmup_epochs": 1,
                             "train.backbone_lr": 0.1})
    model = create_model("resnet18", input_size=32, stem="standard")
    groups = {g["name"]: g for g in build_optimizer(cfg, model).param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4) and groups["head"]["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in groups["head"]["params"]} == {id(model.net.fc.weight), id(model.net.fc.bias)}
    out, _, _ = run_training(cfg, tmp_path / "bundle", data=load_dataset(str(npz)))
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["pretrained"]["sha256"] == digest and meta["pretrained"]["adapted"] == ["conv1.weight"]
