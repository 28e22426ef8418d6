import pytest
import torch

from medsight.errors import ConfigError
from medsight.models import SimpleCNN, create_model, list_models


@pytest.mark.parametrize("name", sorted(list_models()))
@pytest.mark.parametrize("dims,size", [(2, 28), (3, 16)])
def test_every_registered_model_builds_and_runs(name, dims, size):
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
