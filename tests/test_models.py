import numpy as np
import pytest
import torch

from medsight.errors import ConfigError
from medsight.models import SimpleCNN, create_model, list_models, model_dims


@pytest.mark.parametrize("name", sorted(list_models()))
@pytest.mark.parametrize("dims,size", [(2, 28), (3, 16)])
def test_every_registered_model_builds_and_runs(name, dims, size):
    if dims not in model_dims(name):  # a 2D-only model (EfficientNet-Lite) refuses 3D data in one line
        with pytest.raises(ConfigError, match=f"{name} is 2D only; this data is 3D"):
            create_model(name, spatial_dims=dims, in_channels=1, num_outputs=3, input_size=size)
        return
    m = create_model(name, spatial_dims=dims, in_channels=1, num_outputs=3, input_size=size).eval()
    with torch.no_grad():
        y = m(torch.rand(2, 1, *(size,) * dims))
    assert y.shape == (2, 3) and torch.isfinite(y).all()


def test_simple_cnn_is_the_baseline_architecture():
    m = create_model("simple_cnn", in_channels=1, num_outputs=1, input_size=28)
    net = m.net
    assert isinstance(net, SimpleCNN)
    kinds = [type(layer).__name__ for layer in net]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    assert net[0].out_channels == 32 and net[0].kernel_size == (3, 3)
    assert net[3].out_channels == 64 and net[7].out_features == 64
    assert net[7].in_features == 64 * 5 * 5  # 28 -> 26 -> 13 -> 11 -> 5


def test_small_stem_for_small_inputs():
    small = create_model("resnet18", input_size=28, stem="auto").net
    std = create_model("resnet18", input_size=224, stem="auto").net
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert std.conv1.kernel_size == (7, 7) and std.conv1.stride == (2, 2)


def test_standardize_is_inside_the_model():
    m = create_model("simple_cnn", input_size=28)
    m.set_input_stats([0.5], [0.25])
    x = torch.full((1, 1, 28, 28), 0.5)
    assert torch.allclose(m.standardize(x), torch.zeros_like(x))
    assert "standardize.mean" in m.state_dict()


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        create_model("vgg99")
    assert "vgg99" in str(e.value) and "resnet18" in str(e.value) and "simple_cnn" in str(e.value)


@pytest.mark.parametrize("kw", [{"spatial_dims": 4}, {"stem": "huge"}, {"width": 0}, {"input_size": 6},
                                {"input_size": (28, 28, 28)}, {"num_outputs": 0}])
def test_invalid_model_arguments(kw):
    with pytest.raises(ConfigError):
        create_model("simple_cnn", **kw)


def test_cnn6_is_six_conv_batchnorm_layers_with_global_pooling():
    from medsight.models import CNN6

    net = create_model("cnn6", in_channels=1, num_outputs=1, input_size=28, dropout=0.3).net
    assert isinstance(net, CNN6)
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128] and len(bns) == 6
    assert convs[0].stride == (1, 1) and isinstance(net[-2], torch.nn.Dropout) and net[-1].in_features == 128
    net3 = create_model("cnn6", spatial_dims=3, input_size=28, width=0.5, stem="standard").net
    convs3 = [m for m in net3 if isinstance(m, torch.nn.Conv3d)]
    assert convs3[0].stride == (2, 2, 2) and [c.out_channels for c in convs3] == [16, 16, 32, 32, 64, 64]
    with pytest.raises(ConfigError):
        create_model("cnn6", input_size=6, stem="standard")


def test_ensemble_returns_the_mean_of_member_logits_and_their_spread():
    from medsight.inference import run_model
    from medsight.models import Ensemble, member_spread
    from medsight.tasks import Task

    torch.manual_seed(0)
    members = [create_model("simple_cnn", input_size=16, num_outputs=1, width=0.25) for _ in range(3)]
    ens = Ensemble(members).eval()
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        each = torch.stack([m.eval()(x) for m in members], dim=1)  # (5, 3, 1)
        assert torch.allclose(ens(x), each.mean(1), atol=1e-6)
    out = run_model(ens, x, members=True, tta_flip=[2])
    flipped = x.flip(3)
    with torch.no_grad():
        each_tta = (each + torch.stack([m(flipped) for m in members], dim=1)) / 2
    assert torch.allclose(out.members, each_tta, atol=1e-5)
    assert torch.allclose(out.logits, each_tta.mean(1), atol=1e-5)
    p = torch.sigmoid(each_tta.reshape(5, 3) / 2.0)
    np.testing.assert_allclose(member_spread(out.members, Task("binary", 2), 2.0), p.std(1, unbiased=False).numpy(),
                               atol=1e-6)
    with pytest.raises(ConfigError):
        run_model(members[0], x, members=True)  # one model has no member logits


def test_ensemble_members_are_trained_from_consecutive_seeds(tmp_path):
    """Member k is exactly the single model trained with seed + k (sequentially here; in processes where cores
    allow, as the consistency tests exercise)."""
    from medsight.config import load_config
    from medsight.data.sources import load_dataset
    from medsight.train import fit, fit_ensemble
    from tests.conftest import make_npz

    data = load_dataset(str(make_npz(tmp_path / "t.npz", n=(32, 16, 8))))
    over = {"model.width": 0.25, "train.epochs": 1, "train.batch_size": 16, "train.threads": 1,
            "train.device": "cpu", "train.seed": 5}
    res = fit_ensemble(load_config(None, {**over, "train.ensemble": 2}), data, workers=1)
    assert res.extra["ensemble"]["seeds"] == [5, 6] and len(res.model.members) == 2
    single = fit(load_config(None, {**over, "train.seed": 6}), data)
    for a, b in zip(res.model.members[1].state_dict().values(), single.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(res.model.members[0].net[0].weight, res.model.members[1].net[0].weight)


def test_gradcam_and_onnx_work_on_an_ensemble(tmp_path):
    """No special cases: Grad-CAM explains the ensemble's mean logit (its target layer is found inside a member),
    and the ONNX export carries logits, features and the member logits."""
    import onnxruntime as ort

    from medsight.explain import explain_batch
    from medsight.export import _export_bytes
    from medsight.models import Ensemble

    torch.manual_seed(0)
    ens = Ensemble([create_model("cnn6", input_size=16, width=0.25) for _ in range(2)]).eval()
    x = torch.rand(3, 1, 16, 16)
    heat = explain_batch(ens, x.numpy())
    assert heat.shape == (3, 16, 16) and np.isfinite(heat).all() and (heat.max(axis=(1, 2)) > 0).all()
    sess = ort.InferenceSession(_export_bytes(ens, (x[:1],), 17), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["logits", "features", "members"]
    logits, feats, members = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        each = torch.stack([m(x) for m in ens.members], dim=1).numpy()
    np.testing.assert_allclose(members, each, atol=1e-5)
    np.testing.assert_allclose(logits, each.mean(1), atol=1e-5)
