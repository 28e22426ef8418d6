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


@pytest.mark.parametrize("nd,size,n_train,epochs,lr", [(2, 28, 400, 4, 2e-3), (3, 16, 400, 6, 3e-3)])
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
