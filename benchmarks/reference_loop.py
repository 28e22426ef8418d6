"""A plain PyTorch reference loop (no medsight code): the ~100-line script issue 13 compares medsight against.

Same recipes as described there: BreastMNIST: 6-conv CNN width 32 with BatchNorm, dropout 0.3, batched flip +
±15° rotation + ±10% scale + small translation + brightness/contrast, Adam 1e-3 wd 1e-4 cosine, batch 64, 60
epochs; PneumoniaMNIST: the seed CNN (Conv32-Pool-Conv64-Pool-Dense64), flips + rotation + scale, 12 epochs;
AdrenalMNIST3D: 5-conv 3D CNN width 16 with BatchNorm, random flips, OneCycle, 20 epochs. Every run: epoch chosen
on val AUC, flip TTA, threshold by Youden's J on val, test metrics once. Reads the MedMNIST .npz directly.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

SETTINGS = {
    "breastmnist": {"model": "cnn6", "epochs": 60, "aug": "affine", "sched": "cosine"},
    "pneumoniamnist": {"model": "seed", "epochs": 12, "aug": "affine", "sched": "cosine"},
    "adrenalmnist3d": {"model": "cnn5_3d", "epochs": 20, "aug": "flip", "sched": "onecycle"},
}


def block(conv, bn, a, b):
    return [conv(a, b, 3, padding=1, bias=False), bn(b), nn.ReLU(inplace=True)]


def make_model(kind: str) -> nn.Module:
    if kind == "cnn6":
        c = 32
        return nn.Sequential(*block(nn.Conv2d, nn.BatchNorm2d, 1, c), *block(nn.Conv2d, nn.BatchNorm2d, c, c),
                             nn.MaxPool2d(2), *block(nn.Conv2d, nn.BatchNorm2d, c, 2 * c),
                             *block(nn.Conv2d, nn.BatchNorm2d, 2 * c, 2 * c), nn.MaxPool2d(2),
                             *block(nn.Conv2d, nn.BatchNorm2d, 2 * c, 4 * c),
                             *block(nn.Conv2d, nn.BatchNorm2d, 4 * c, 4 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Dropout(0.3), nn.Linear(4 * c, 1))
    if kind == "seed":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 1))
    c = 16  # 5-conv 3D CNN
    return nn.Sequential(nn.Conv3d(1, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm3d(c), nn.ReLU(inplace=True),
                         *block(nn.Conv3d, nn.BatchNorm3d, c, c), nn.MaxPool3d(2),
                         *block(nn.Conv3d, nn.BatchNorm3d, c, 2 * c), nn.MaxPool3d(2),
                         *block(nn.Conv3d, nn.BatchNorm3d, 2 * c, 4 * c), *block(nn.Conv3d, nn.BatchNorm3d, 4 * c, 4 * c),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4 * c, 1))


def augment(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    if kind == "flip":
        for dim in range(2, x.dim()):
            m = torch.rand(b, generator=g) < 0.5
            x[m] = x[m].flip(dim)
        return x
    u = lambda: torch.rand(b, generator=g) * 2 - 1  # noqa: E731
    ang, sc = u() * math.radians(15), 1 + u() * 0.1
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(ang) / sc * flip, -torch.sin(ang) / sc
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(ang) / sc * flip, torch.cos(ang) / sc
    theta[:, :, 2] = torch.stack([u(), u()], 1) * 0.1
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    return (x * (1 + u() * 0.1).view(-1, 1, 1, 1) + (u() * 0.1).view(-1, 1, 1, 1)).clamp(0, 1)


@torch.no_grad()
def scores(model, x: torch.Tensor, flip_dims) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(x), 256):
        xb = x[i:i + 256]
        views = [xb] + [xb.flip(d) for d in flip_dims]
        out.append(torch.stack([model(v).reshape(-1) for v in views]).mean(0))
    return torch.sigmoid(torch.cat(out)).numpy()


def run(name: str, data_dir: str, seed: int = 0) -> dict:
    s = SETTINGS[name]
    d = np.load(f"{data_dir}/{name}.npz")
    t0, c0 = time.perf_counter(), time.process_time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X = {k: torch.from_numpy(d[f"{k}_images"]).float().div(255).unsqueeze(1) for k in ("train", "val", "test")}
    Y = {k: d[f"{k}_labels"].reshape(-1).astype(np.float32) for k in ("train", "val", "test")}
    mean, std = X["train"].mean(), X["train"].std()
    model = make_model(s["model"])
    norm = lambda x: (x - mean) / std  # noqa: E731
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    bs, n, epochs = 64, len(X["train"]), s["epochs"]
    steps = math.ceil(n / bs)
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3 * 3, total_steps=epochs * steps) if s["sched"] == "onecycle"
             else torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps))
    ytr = torch.from_numpy(Y["train"])
    flip_dims = [X["train"].dim() - 1] if X["train"].dim() == 4 else [2, 3, 4]
    best = (-1.0, None, 0)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(steps):
            idx = perm[i * bs:(i + 1) * bs]
            x = augment(X["train"][idx].clone(), s["aug"], g)
            loss = F.binary_cross_entropy_with_logits(model(norm(x)).reshape(-1), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        wrapped = nn.Sequential(_Norm(mean, std), model)
        auc = roc_auc_score(Y["val"], scores(wrapped, X["val"], flip_dims))
        if auc > best[0]:
            best = (auc, {k: v.clone() for k, v in model.state_dict().items()}, ep + 1)
    model.load_state_dict(best[1])
    wrapped = nn.Sequential(_Norm(mean, std), model)
    pv, pt = scores(wrapped, X["val"], flip_dims), scores(wrapped, X["test"], flip_dims)
    fpr, tpr, thr = roc_curve(Y["val"], pv)
    t = float(thr[np.argmax(tpr - fpr)])
    return {"seed": seed, "test_auc": float(roc_auc_score(Y["test"], pt)),
            "test_acc": float(((pt >= t) == (Y["test"] > 0.5)).mean()), "val_auc": float(best[0]),
            "best_epoch": best[2], "epochs": epochs, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "model": s["model"]}


class _Norm(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=list(SETTINGS))
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(run(a.name, a.data_dir, a.seed)))
