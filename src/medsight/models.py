"""Model registry: register by decorator, create by name (timm's pattern).

Every factory takes ``spatial_dims`` (2 or 3), ``in_channels``, ``num_outputs``, ``input_size`` and ``stem``:
``stem='small'`` swaps the ImageNet stem (7x7 stride-2 conv + max-pool) for a 3x3 stride-1 conv, which is what
28-64 px inputs need; ``'auto'`` picks it when the smallest input side is at most 64.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from medsight.errors import ConfigError, choices_message

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_DIMS: dict[str, tuple[int, ...]] = {}


def register_model(name: str, description: str = "", dims: tuple[int, ...] = (2, 3)):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description or (fn.__doc__ or "").strip().splitlines()[0]
        _DIMS[name] = tuple(dims)
        return fn

    return deco


def list_models() -> dict[str, str]:
    return dict(sorted(_DESCRIPTIONS.items()))


def model_dims(name: str) -> tuple[int, ...]:
    """The spatial dimensions a registered model is built for (2, 3 or both)."""
    if name not in _REGISTRY:
        raise ConfigError(choices_message("model", name, _REGISTRY))
    return _DIMS[name]


def _resolve_stem(stem: str, input_size: tuple[int, ...]) -> bool:
    if stem not in ("auto", "small", "standard"):
        raise ConfigError(choices_message("stem", stem, ["auto", "small", "standard"]))
    if stem == "auto":
        return min(input_size) <= 64
    return stem == "small"


def create_model(
    name: str,
    *,
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_outputs: int = 1,
    input_size: int | tuple[int, ...] = 28,
    stem: str = "auto",
    width: float = 1.0,
    dropout: float = 0.0,
) -> nn.Module:
    """Build a registered model by name; an unknown name lists the valid ones."""
    if name not in _REGISTRY:
        raise ConfigError(choices_message("model", name, _REGISTRY))
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if spatial_dims not in _DIMS[name]:
        raise ConfigError(f"model {name} is {'/'.join(map(str, _DIMS[name]))}D only; this data is {spatial_dims}D")
    if isinstance(input_size, int):
        input_size = (input_size,) * spatial_dims
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != spatial_dims:
        raise ConfigError(f"input_size {input_size} does not match spatial_dims={spatial_dims}")
    if in_channels < 1 or num_outputs < 1:
        raise ConfigError(f"in_channels and num_outputs must be >= 1, got {in_channels}, {num_outputs}")
    if width <= 0:
        raise ConfigError(f"model width must be > 0, got {width}")
    small = _resolve_stem(stem, input_size)
    net = _REGISTRY[name](
        spatial_dims=spatial_dims, in_channels=in_channels, num_outputs=num_outputs, input_size=input_size,
        small_stem=small, width=width, dropout=dropout,
    )
    return Classifier(net, in_channels, spatial_dims)


def _conv(d):
    return nn.Conv2d if d == 2 else nn.Conv3d


def _pool(d):
    return nn.MaxPool2d if d == 2 else nn.MaxPool3d


class SimpleCNN(nn.Sequential):
    """Conv(32,3x3)+ReLU, MaxPool 2, Conv(64,3x3)+ReLU, MaxPool 2, Flatten, Dense(64)+ReLU, Dense(out)."""

    def __init__(self, spatial_dims, in_channels, num_outputs, input_size, width=1.0, dropout=0.0):
        c1, c2, hidden = max(1, round(32 * width)), max(1, round(64 * width)), max(1, round(64 * width))
        out = [((s - 2) // 2 - 2) // 2 for s in input_size]
        if min(out) < 1:
            raise ConfigError(f"simple_cnn needs inputs of at least 10 px per side, got {input_size}")
        flat = c2 * int(torch.tensor(out).prod())
        conv, pool = _conv(spatial_dims), _pool(spatial_dims)
        layers = [
            conv(in_channels, c1, 3), nn.ReLU(inplace=True), pool(2),
            conv(c1, c2, 3), nn.ReLU(inplace=True), pool(2),
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, num_outputs))
        super().__init__(*layers)


@register_model("simple_cnn", "baseline: Conv32-Pool-Conv64-Pool-Dense64-Dense, 2D/3D")
def simple_cnn(*, spatial_dims, in_channels, num_outputs, input_size, small_stem, width, dropout):
    return SimpleCNN(spatial_dims, in_channels, num_outputs, input_size, width=width, dropout=dropout)


def _bn(d):
    return nn.BatchNorm2d if d == 2 else nn.BatchNorm3d


class CNN6(nn.Sequential):
    """Six 3x3 conv + BatchNorm + ReLU layers in three stages of widths (c, 2c, 4c), max-pool 2 after the first two
    stages, global average pool, dropout, Dense(out). ``c = 32 * width``. ``small_stem=False`` gives the first
    conv stride 2 (downsample at once: what large inputs and 3D volumes need on a CPU budget)."""

    def __init__(self, spatial_dims, in_channels, num_outputs, input_size, width=1.0, dropout=0.0, small_stem=True):
        c = max(1, round(32 * width))
        conv, bn, pool = _conv(spatial_dims), _bn(spatial_dims), _pool(spatial_dims)
        widths = [(in_channels, c), (c, c), (c, 2 * c), (2 * c, 2 * c), (2 * c, 4 * c), (4 * c, 4 * c)]
        stride0 = 1 if small_stem else 2
        side = min(input_size) // stride0 // 4
        if side < 1:
            raise ConfigError(f"cnn6 needs inputs of at least {4 * stride0} px per side, got {input_size}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(widths):
            layers += [conv(a, b, 3, stride=stride0 if i == 0 else 1, padding=1, bias=False), bn(b),
                       nn.ReLU(inplace=True)]
            if i in (1, 3):
                layers.append(pool(2))
        layers += [nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1), nn.Flatten()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(4 * c, num_outputs))
        super().__init__(*layers)


@register_model("cnn6", "small-image CNN: 6 conv+BatchNorm layers (32-64-128 x width), GAP, dropout, 2D/3D")
def cnn6(*, spatial_dims, in_channels, num_outputs, input_size, small_stem, width, dropout):
    return CNN6(spatial_dims, in_channels, num_outputs, input_size, width=width, dropout=dropout,
                small_stem=small_stem)


def _monai_resnet(layers, block, *, spatial_dims, in_channels, num_outputs, small_stem, width, dropout, **_):
    from monai.networks.nets import ResNet

    net = ResNet(
        block=block, layers=layers, block_inplanes=[int(c * width) for c in (64, 128, 256, 512)],
        spatial_dims=spatial_dims, n_input_channels=in_channels,
        conv1_t_size=3 if small_stem else 7, conv1_t_stride=1 if small_stem else 2, no_max_pool=small_stem,
        num_classes=num_outputs,
    )
    if dropout > 0:
        net.fc = nn.Sequential(nn.Dropout(dropout), net.fc)
    return net


@register_model("resnet18", "MONAI ResNet-18 (basic blocks), 2D/3D, small or ImageNet stem")
def resnet18(**kw):
    return _monai_resnet([2, 2, 2, 2], "basic", **kw)


@register_model("resnet34", "MONAI ResNet-34 (basic blocks), 2D/3D")
def resnet34(**kw):
    return _monai_resnet([3, 4, 6, 3], "basic", **kw)


@register_model("resnet50", "MONAI ResNet-50 (bottleneck blocks), 2D/3D")
def resnet50(**kw):
    return _monai_resnet([3, 4, 6, 3], "bottleneck", **kw)


@register_model("densenet121", "MONAI DenseNet-121, 2D/3D")
def densenet121(*, spatial_dims, in_channels, num_outputs, small_stem, width, dropout, **_):
    from monai.networks.nets import DenseNet

    net = DenseNet(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_outputs,
        init_features=max(8, int(64 * width)), growth_rate=max(4, int(32 * width)), block_config=(6, 12, 24, 16),
        dropout_prob=dropout,
    )
    if small_stem:
        net.features.conv0 = _conv(spatial_dims)(in_channels, net.features.conv0.out_channels, 3, 1, 1, bias=False)
        net.features.pool0 = nn.Identity()
    return net


# EfficientNet-B0 block specification (Tan & Le 2019, Table 1), in MONAI's string format.
_B0_BLOCKS = [
    "r1_k3_s11_e1_i32_o16_se0.25", "r2_k3_s22_e6_i16_o24_se0.25", "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25", "r3_k5_s11_e6_i80_o112_se0.25", "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
]


@register_model("efficientnet_b0", "MONAI EfficientNet-B0, 2D/3D, 'same' padding sized for the input")
def efficientnet_b0(*, spatial_dims, in_channels, num_outputs, input_size, small_stem, width, dropout):
    from monai.networks.nets.efficientnet import EfficientNet, _make_same_padder

    size = max(input_size)
    net = EfficientNet(
        _B0_BLOCKS, spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_outputs,
        width_coefficient=width, depth_coefficient=1.0, dropout_rate=dropout or 0.2,
        image_size=size * 2 if small_stem else size,
    )
    if small_stem:  # stride-1 stem: later blocks were sized for size*2/2 == size
        net._conv_stem.stride = (1,) * spatial_dims
        net._conv_stem_padding = _make_same_padder(net._conv_stem, [size] * spatial_dims)
    return net


# EfficientNet-Lite (the TensorFlow EfficientNet-Lite release): EfficientNet's blocks without squeeze-excitation,
# ReLU6 instead of swish, stem (32) and head (1280) widths and the first and last stages' depths not scaled.
# Stage: (repeats, kernel, stride, expansion, input channels, output channels), as EfficientNet-B0 (Tan & Le 2019).
_LITE_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
#: name -> (width multiplier, depth multiplier, ImageNet resolution, dropout)
LITE_VARIANTS = {"efficientnet_lite0": (1.0, 1.0, 224, 0.2), "efficientnet_lite1": (1.0, 1.1, 240, 0.2)}


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's 'same' padding for a strided conv (the extra pixel goes to the bottom / right)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((-(-int(size) // stride) - 1) * stride + kernel - int(size), 0)
        pads += [total // 2, total - total // 2]
    return nn.functional.pad(x, pads)


class SameConv2d(nn.Conv2d):
    """A Conv2d with TensorFlow 'same' padding: symmetric ``k // 2`` at stride 1, computed from the input at
    stride 2 (the layout the EfficientNet-Lite ImageNet weights were trained with)."""

    def __init__(self, cin, cout, kernel, stride=1, groups=1):
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups,
                         bias=False)

    def forward(self, x):
        if self.stride[0] > 1:
            x = _same_pad(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


#: BatchNorm momentum of EfficientNet-Lite while training (not stored in the weights): PyTorch's 0.1, not the 0.01
#: (decay 0.99) the ImageNet weights were trained with. BreastMNIST 28 px, validation AUC, seed 0, same CPU: from
#: scratch 0.869 at 0.1 vs 0.693 at 0.01 (short runs leave 0.01's running statistics stale); from ImageNet 0.855 vs
#: 0.873 (benchmarks/results/pretrained.md)
LITE_BN_MOMENTUM = 0.1


def _lite_bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=LITE_BN_MOMENTUM)  # eps 1e-3: TensorFlow's, as the weights were trained


class LiteBlock(nn.Module):
    """Inverted residual (MBConv) without squeeze-excitation: 1x1 expand, depthwise k x k, 1x1 project; identity
    shortcut when the shape is kept. Attribute names follow the lukemelas layout of the published weights."""

    def __init__(self, cin, cout, kernel, stride, expand):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = _lite_bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = _lite_bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = _lite_bn(cout)
        self.act = nn.ReLU6(inplace=True)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = x
        if hasattr(self, "_expand_conv"):
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (2D). ``small_stem``: stem stride 1 (28-64 px inputs keep their resolution a stage longer).
    ``width`` scales the block channels (rounded to multiples of 8; stem and head stay 32 / 1280), so only width 1
    takes the ImageNet weights."""

    def __init__(self, variant, in_channels, num_outputs, width=1.0, dropout=0.0, small_stem=False):
        super().__init__()
        w_mult, d_mult, _, drop = LITE_VARIANTS[variant]
        w_mult *= width

        def ch(c):
            if w_mult == 1.0:
                return c
            v = max(8, int(c * w_mult + 4) // 8 * 8)
            return v + 8 if v < 0.9 * c * w_mult else v

        self._conv_stem = SameConv2d(in_channels, 32, 3, 1 if small_stem else 2)
        self._bn0 = _lite_bn(32)
        blocks = []
        last = len(_LITE_STAGES) - 1
        for i, (r, k, s, e, cin, cout) in enumerate(_LITE_STAGES):
            reps = r if i in (0, last) else math.ceil(r * d_mult)
            cin = 32 if i == 0 else ch(cin)
            for j in range(reps):
                blocks.append(LiteBlock(cin if j == 0 else ch(cout), ch(cout), k, s if j == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(ch(320), 1280, 1)
        self._bn1 = _lite_bn(1280)
        self.act = nn.ReLU6(inplace=True)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout or drop)
        self._fc = nn.Linear(1280, num_outputs)

    def features(self, x):
        x = self.act(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, x):
        return self._fc(self._dropout(self._avg_pooling(self.features(x)).flatten(1)))


def _lite(variant):
    def factory(*, spatial_dims, in_channels, num_outputs, input_size, small_stem, width, dropout):
        return EfficientNetLite(variant, in_channels, num_outputs, width=width, dropout=dropout,
                                small_stem=small_stem)
    return factory


for _name, (_w, _d, _res, _) in LITE_VARIANTS.items():
    register_model(_name, f"EfficientNet-Lite{_name[-1]} (no SE, ReLU6; width {_w:g}, depth {_d:g}), 2D only; "
                   f"model.pretrained=imagenet from the medsight[pretrained] packages", dims=(2,))(_lite(_name))


class Standardize(nn.Module):
    """Fixed per-channel input standardisation, (x - mean) / std, with statistics from the training split.

    It lives inside the model, so the bundle's weights, ONNX export and Grad-CAM all carry it."""

    def __init__(self, channels: int, spatial_dims: int):
        super().__init__()
        shape = (1, channels) + (1,) * spatial_dims
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``net(standardize(x))``: every registered network is wrapped so inputs in [0, 1] are standardised."""

    def __init__(self, net: nn.Module, channels: int, spatial_dims: int):
        super().__init__()
        self.standardize = Standardize(channels, spatial_dims)
        self.net = net

    def set_input_stats(self, mean, std) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(self.standardize.mean.shape)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(self.standardize.std.shape).clamp_min(1e-3)
        self.standardize.mean.copy_(mean)
        self.standardize.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))

class MemberMean(nn.Module):
    """(N, members, outputs) member logits -> their mean (N, outputs). A module of its own so the stacked member
    logits can be tapped like any layer input (``medsight.inference.run_model(..., members=True)``, ONNX output
    ``members``)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.mean(dim=1)


class Ensemble(nn.Module):
    """A seed ensemble: ``forward`` returns the mean of the members' logits, so inference, calibration, ONNX
    export, Grad-CAM and the OOD detector (the last member's penultimate features) see one model."""

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if len(members) < 1:
            raise ConfigError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.combine = MemberMean()

    def set_input_stats(self, mean, std) -> None:
        for m in self.members:
            m.set_input_stats(mean, std)

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return self.combine(torch.stack([m(x, *extra) for m in self.members], dim=1))


def member_spread(member_logits, task, temperature: float = 1.0):
    """Standard deviation over members of the calibrated probabilities (``task``: a :class:`medsight.tasks.Task`):
    (N, members, outputs) logits -> (N,) for a binary task (of P(positive)), else (N, classes)."""
    z = torch.as_tensor(member_logits, dtype=torch.float32)
    n, m, k = z.shape
    p = task.probabilities(z.reshape(n * m, k), temperature)
    p = p.reshape(n, m, *p.shape[1:])
    return p.std(dim=1, unbiased=False).numpy()
