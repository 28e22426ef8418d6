"""Explanations: the pointing game on synthetic lesions, plus API contracts.

Pointing game: images are noise; positives carry one bright lesion (a 5x5 square in 2D, a 4x4x4
cube in 3D) at a random position, negatives carry a dimmer distractor bar elsewhere. A baseline
CNN (3x3 valid convs, max-pools, as specified for the seed model) is trained briefly on CPU, and
for >= 90% of the correctly classified positive test images the Grad-CAM maximum must fall
inside the lesion box grown by a margin of 2 pixels (voxels) on each side. The peak is
:func:`heatmap_peak` (argmax; the centre of a flat maximum, which occurs where the coarse map is
clamped at the image border).
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from medsight.errors import ConfigError, DataError
from medsight.explain import (
    find_target_layer,
    gradcam,
    heatmap_peak,
    occlusion,
    orthogonal_slices,
    overlay_png,
    save_explanations,
)

MARGIN = 2  # pixels/voxels added on each side of the lesion box in the pointing game
LESION = {2: 5, 3: 4}


def baseline_cnn(nd: int, in_ch: int = 1, out: int = 1, size: int = 28) -> nn.Sequential:
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if nd == 2 else (nn.Conv3d, nn.MaxPool3d)
    s = ((size - 2) // 2 - 2) // 2
    return nn.Sequential(
        conv(in_ch, 32, 3), nn.ReLU(), pool(2),
        conv(32, 64, 3), nn.ReLU(), pool(2),
        nn.Flatten(), nn.Linear(64 * s**nd, 64), nn.ReLU(), nn.Linear(64, out),
    )  # fmt: skip


def make_lesions(n: int, nd: int, size: int, rng: np.random.Generator):
    L = LESION[nd]
    x = rng.uniform(0.0, 0.4, size=(n, 1) + (size,) * nd).astype(np.float32)
    y = rng.integers(0, 2, n)
    boxes = np.zeros((n, nd, 2), dtype=int)
    for i in range(n):
        lo = rng.integers(0, size - L + 1, nd)
        if y[i] == 1:
            sl = tuple(slice(a, a + L) for a in lo)
            x[(i, 0) + sl] = 1.0
        else:  # distractor: a thin bar of the same brightness range, different shape
            sl = tuple(slice(a, a + (L + 2 if d == 0 else 1)) for d, a in enumerate(np.minimum(lo, size - L - 2)))
            x[(i, 0) + sl] = 0.8
        boxes[i, :, 0], boxes[i, :, 1] = lo, lo + L
    return torch.from_numpy(x), torch.from_numpy(y).float(), boxes


def train(model, x, y, epochs: int, lr: float = 2e-3, bs: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), bs):
            b = perm[s : s + bs]
            opt.zero_grad()
            loss_fn(model(x[b]).squeeze(1), y[b]).backward()
            opt.step()
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("nd,size,n_train,epochs,lr", [(2, 28, 400, 4, 2e-3), (3, 16, 300, 8, 3e-3)])
def test_pointing_game(nd, size, n_train, epochs, lr):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    rng = np.random.default_rng(nd)
    t0 = time.perf_counter()
    xtr, ytr, _ = make_lesions(n_train, nd, size, rng)
    xte, yte, boxes = make_lesions(200, nd, size, rng)
    model = train(baseline_cnn(nd, size=size), xtr, ytr, epochs, lr=lr)
    with torch.no_grad():
        pred = (model(xte).squeeze(1) > 0).float()
    acc = (pred == yte).float().mean().item()
    assert acc > 0.9, f"the tiny CNN did not learn the task (accuracy {acc:.2f})"
    keep = ((pred == 1) & (yte == 1)).numpy()
    heat = gradcam(model, xte[keep], class_idx=1)
    assert heat.shape == (int(keep.sum()),) + (size,) * nd
    hits = 0
    for h, box in zip(heat, boxes[keep]):
        peak = heatmap_peak(h)
        hits += all(b0 - MARGIN <= p < b1 + MARGIN for p, (b0, b1) in zip(peak, box))
    rate = hits / keep.sum()
    print(f"{nd}D pointing game: {hits}/{keep.sum()} = {rate:.3f}, accuracy {acc:.3f}, {time.perf_counter() - t0:.1f}s")
    assert rate >= 0.9, f"{nd}D Grad-CAM peak inside the lesion for only {rate:.1%} of positives"


# ------------------------------------------------------------------------------------------
# API contracts
# ------------------------------------------------------------------------------------------


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_gradcam_leaves_model_unchanged():
    torch.manual_seed(0)
    model = baseline_cnn(2, size=28)
    model[1].inplace = True
    model[0].weight.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(3, 1, 28, 28)
    heat = gradcam(model, x)
    assert heat.shape == (3, 28, 28) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1
    assert model.training and model[1].inplace and not model[0].weight.requires_grad
    assert model[3].weight.requires_grad and _hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # occlusion restores too
    occlusion(model, x[:1], patch=7)
    assert model.training and _hooks(model) == 0


def test_binary_class0_is_negated_logit():
    torch.manual_seed(1)
    model = baseline_cnn(2, size=28).eval()
    x = torch.rand(2, 1, 28, 28)
    h1 = gradcam(model, x, class_idx=1, align=False)
    h0 = gradcam(model, x, class_idx=0, align=False)
    assert not np.allclose(h1, h0)
    # same as a two-logit model [-z, z] explaining class 0 / 1
    two = nn.Sequential(model, _TwoLogits()).eval()
    layer = "0.4"
    np.testing.assert_allclose(gradcam(two, x, class_idx=0, target_layer=layer, align=False), h0, atol=1e-5)
    np.testing.assert_allclose(gradcam(two, x, class_idx=1, target_layer=layer, align=False), h1, atol=1e-5)
    with pytest.raises(ConfigError, match="classes 0 and 1"):
        gradcam(model, x, class_idx=2)


class _TwoLogits(nn.Module):
    def forward(self, z):
        return torch.cat([-z, z], dim=1)


def test_multiclass_default_class_and_per_sample_idx():
    torch.manual_seed(2)
    model = baseline_cnn(2, out=4, size=28).eval()
    x = torch.rand(3, 1, 28, 28)
    heat, logits = gradcam(model, x, return_logits=True)
    pred = logits.argmax(1)
    np.testing.assert_allclose(heat, gradcam(model, x, class_idx=pred.tolist()), atol=1e-6)
    with pytest.raises(ConfigError, match="class_idx must be in 0..3"):
        gradcam(model, x, class_idx=7)
    with pytest.raises(ConfigError, match="one per sample"):
        gradcam(model, x, class_idx=[0, 1])


def test_find_target_layer_variants():
    m2 = baseline_cnn(2, size=28)
    assert find_target_layer(m2, torch.rand(1, 1, 28, 28)) == "4"  # ReLU after the last conv
    assert find_target_layer(m2) == "4"  # static rule: activation after the last conv
    from monai.networks.nets import DenseNet, resnet10

    res = resnet10(spatial_dims=2, n_input_channels=1, num_classes=3)
    assert find_target_layer(res, torch.rand(1, 1, 64, 64)) == "layer4"
    dense = DenseNet(spatial_dims=2, in_channels=1, out_channels=2, init_features=8, growth_rate=8, block_config=(2, 2, 2, 2))
    assert find_target_layer(dense, torch.rand(1, 1, 64, 64)) == "class_layers.relu"
    heat = gradcam(res, torch.rand(2, 1, 64, 64), class_idx=1)
    assert heat.shape == (2, 64, 64) and np.isfinite(heat).all()
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        gradcam(m2, torch.rand(1, 1, 28, 28), target_layer="nope")
    with pytest.raises(ConfigError, match="no spatial output"):
        gradcam(m2, torch.rand(1, 1, 28, 28), target_layer="7")
    with pytest.raises(ConfigError, match="no Conv2d/Conv3d"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 1)))
    with pytest.raises(DataError, match="batch"):
        gradcam(m2, torch.rand(28, 28))


def test_occlusion_finds_lesion():
    torch.manual_seed(0)

    class Bright(nn.Module):  # "classifier" whose logit is the brightest 3x3 mean
        def forward(self, x):
            return nn.functional.avg_pool2d(x, 3, 1).amax(dim=(1, 2, 3))[:, None] * 10 - 5

    x = torch.rand(1, 1, 24, 24) * 0.3
    x[0, 0, 14:19, 4:9] = 1.0
    heat = occlusion(Bright(), x, patch=6, stride=2)
    assert heat.shape == (1, 24, 24)
    r, c = heatmap_peak(heat[0])
    assert 12 <= r < 21 and 2 <= c < 11
    with pytest.raises(ConfigError, match="larger than the image"):
        occlusion(Bright(), x, patch=30)
    with pytest.raises(ConfigError, match="stride"):
        occlusion(Bright(), x, patch=4, stride=0)


def _png_ok(data: bytes, size=None):
    img = Image.open(io.BytesIO(data))
    img.verify()
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    if size is not None:
        assert img.size == size
    return img


def test_overlay_and_slices(tmp_path):
    rng = np.random.default_rng(0)
    _png_ok(overlay_png(rng.random((20, 30)), rng.random((20, 30))), (30, 20))
    _png_ok(overlay_png(rng.random((3, 20, 30)), rng.random((20, 30)), alpha=0.2, cmap="viridis"), (30, 20))
    _png_ok(overlay_png(rng.random((1, 20, 30)) * 500, rng.random((20, 30))))  # rescaled for display
    with pytest.raises(DataError, match="does not match"):
        overlay_png(rng.random((20, 30)), rng.random((10, 30)))
    with pytest.raises(ConfigError, match="colormap"):
        overlay_png(rng.random((20, 30)), rng.random((20, 30)), cmap="nope")
    with pytest.raises(ConfigError, match="alpha"):
        overlay_png(rng.random((20, 30)), rng.random((20, 30)), alpha=2)
    vol, heat = rng.random((10, 12, 14)), np.zeros((10, 12, 14))
    heat[3, 4, 5] = 1
    img = _png_ok(orthogonal_slices(vol, heat))
    assert img.size == (14 + 14 + 12 + 8, 12)
    with pytest.raises(DataError):
        orthogonal_slices(vol, heat[:5])
    out = save_explanations(tmp_path / "x", ["a/1", "b"], rng.random((2, 1, 8, 8)), rng.random((2, 8, 8)))
    assert (tmp_path / "x" / "a_1_heatmap.npy").exists() and out[1]["overlay"].name == "b_overlay.png"
    _png_ok(out[0]["overlay"].read_bytes(), (8, 8))
    out3 = save_explanations(tmp_path, ["v"], rng.random((1, 1, 6, 7, 8)), rng.random((1, 6, 7, 8)))
    np.testing.assert_array_equal(np.load(out3[0]["heatmap"]).shape, (6, 7, 8))
    with pytest.raises(DataError, match="names"):
        save_explanations(tmp_path, ["a"], rng.random((2, 1, 8, 8)), rng.random((2, 8, 8)))


def test_receptive_field_geometry_and_peak():
    from monai.networks.nets import resnet10

    from medsight.explain import _chain_geometry, _get_module, _upsample

    m = baseline_cnn(2, size=28).eval()
    x = torch.rand(1, 1, 28, 28)
    # 3x3 valid conv, 2x2 pool, 3x3 valid conv: feature i is centred on input 2 i + 3.5
    assert _chain_geometry(m, x, _get_module(m, "4")) == [(2.0, 3.5), (2.0, 3.5)]
    res = resnet10(spatial_dims=2, n_input_channels=1, num_classes=2).eval()
    assert _chain_geometry(res, torch.rand(1, 1, 32, 32), _get_module(res, "layer4")) is None  # branches
    fmap = torch.zeros(1, 1, 11, 11)
    fmap[0, 0, 5, 2] = 1
    up = _upsample(fmap, (28, 28), [(2.0, 3.5), (2.0, 3.5)])[0, 0].numpy()
    r, c = np.unravel_index(up.argmax(), up.shape)
    assert abs(r - 13.5) <= 0.5 and abs(c - 7.5) <= 0.5
    h = np.zeros((9, 9))
    h[0:5, 0] = 1.0  # flat maximum along the border: its centre, not its first element
    assert heatmap_peak(h) == (2, 0)
    h[6, 6] = 2.0
    assert heatmap_peak(h) == (6, 6)
