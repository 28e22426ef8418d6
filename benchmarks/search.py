"""Recipe search on the VALIDATION split only: every candidate is trained for a few seeds and scored on val
(AUC, ACC at 0.5, with and without flip TTA). Test metrics are never computed here.

    python benchmarks/search.py --datasets breastmnist --seeds 0 1 2 --device cuda --out search.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medsight.config import load_config  # noqa: E402
from medsight.metrics import compute_metrics  # noqa: E402
from medsight.pipeline import load_data_for, run_training  # noqa: E402
from medsight.inference import run_logits  # noqa: E402

AUG = {"augment.enabled": True}
AUG3D = {"augment.enabled": True, "augment.flip": [1, 2, 3], "augment.rotate": 10}
S = "model.name"
AUTO = {"auto": True}  # the automatic recipe (medsight.autorecipe); overrides on top of it below
CANDIDATES: dict[str, dict[str, dict]] = {
    "breastmnist": {
        "auto": {**AUTO},
        "auto_w1.5": {**AUTO, "model.width": 1.5},
        "auto_ls0.1": {**AUTO, "train.label_smoothing": 0.1},
        "auto_ema": {**AUTO, "train.ema": 0.99},
        "cnn_e60": {S: "simple_cnn", "train.epochs": 60},
        "cnn_e60_aug": {S: "simple_cnn", "train.epochs": 60, **AUG},
        "cnn_e100_aug_ema": {S: "simple_cnn", "train.epochs": 100, "train.ema": 0.99, **AUG},
        "cnn_w2_e60_aug_do": {S: "simple_cnn", "model.width": 2, "model.dropout": 0.3, "train.epochs": 60, **AUG},
        "cnn_e60_aug_ls": {S: "simple_cnn", "train.epochs": 60, "train.label_smoothing": 0.1, **AUG},
        "r18q_small_e15_aug": {S: "resnet18", "model.width": 0.25, "model.stem": "small", "train.epochs": 15, **AUG},
        "r18q_std_e40_aug": {S: "resnet18", "model.width": 0.25, "model.stem": "standard", "train.epochs": 40, **AUG},
        "r18h_std_e40_aug": {S: "resnet18", "model.width": 0.5, "model.stem": "standard", "train.epochs": 40, **AUG},
    },
    "breastmnist_64": {
        "r18q_std_e40": {S: "resnet18", "model.width": 0.25, "model.stem": "standard", "train.epochs": 40},
        "r18q_std_e40_aug": {S: "resnet18", "model.width": 0.25, "model.stem": "standard", "train.epochs": 40, **AUG},
        "r18h_std_e40_aug": {S: "resnet18", "model.width": 0.5, "model.stem": "standard", "train.epochs": 40, **AUG},
        "cnn_e60_aug": {S: "simple_cnn", "train.epochs": 60, **AUG},
    },
    "pneumoniamnist": {
        "auto": {**AUTO},
        "auto_w0.5_e30": {**AUTO, "model.width": 0.5, "train.epochs": 30},
        "cnn_e12": {S: "simple_cnn", "train.epochs": 12, "train.batch_size": 64},
        "cnn_e12_aug": {S: "simple_cnn", "train.epochs": 12, "train.batch_size": 64, **AUG},
        "cnn_w2_e8_aug": {S: "simple_cnn", "model.width": 2, "train.epochs": 8, "train.batch_size": 64, **AUG},
        "r18q_std_e10_aug": {S: "resnet18", "model.width": 0.25, "model.stem": "standard", "train.epochs": 10,
                             "train.batch_size": 64, **AUG},
        "r18h_std_e10_aug": {S: "resnet18", "model.width": 0.5, "model.stem": "standard", "train.epochs": 10,
                             "train.batch_size": 64, **AUG},
    },
    "adrenalmnist3d": {
        "auto": {**AUTO},
        "auto_w1": {**AUTO, "model.width": 1.0},
        "cnn3d_e8": {S: "simple_cnn", "train.epochs": 8},
        "cnn3d_e8_aug": {S: "simple_cnn", "train.epochs": 8, **AUG3D},
        "cnn3d_h_e15_aug": {S: "simple_cnn", "model.width": 0.5, "train.epochs": 15, **AUG3D},
        "cnn3d_h_e15": {S: "simple_cnn", "model.width": 0.5, "train.epochs": 15},
        "r18q3d_std_e8_aug": {S: "resnet18", "model.width": 0.25, "model.stem": "standard", "train.epochs": 8,
                              **AUG3D},
        "r18q3d_std_e8": {S: "resnet18", "model.width": 0.25, "model.stem": "standard", "train.epochs": 8},
    },
}


def split_name(ds: str) -> tuple[str, int]:
    return (ds[:-3], 64) if ds.endswith("_64") else (ds, 28)


def val_scores(model, data, tta: list[int], device) -> dict:
    val = data.split("val")
    z = run_logits(model.to(device), val.images, device=device, tta_flip=tta)
    p = torch.sigmoid(z.reshape(-1)).numpy()
    m = compute_metrics("binary", val.labels.reshape(-1), p)
    return {"auc": m["auc"], "acc": m["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=list(CANDIDATES))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="search.json")
    ap.add_argument("--extra", default="{}", help="JSON overrides for every candidate")
    a = ap.parse_args()
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    for ds in a.datasets:
        name, size = split_name(ds)
        for cand, over in CANDIDATES[ds].items():
            if a.only and cand not in a.only:
                continue
            rows = []
            for seed in a.seeds:
                cfg = load_config(None, {"data.name": name, "data.size": size, "train.seed": seed,
                                         "train.device": str(device), **over, **json.loads(a.extra)})
                data = load_data_for(cfg)
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    _, res, _ = run_training(cfg, tmp, data=data, evaluate=False)
                secs = time.perf_counter() - t0
                flips = list(range(1, data.spatial_dims + 1)) if data.spatial_dims == 3 else [1]
                rows.append({"seed": seed, "secs": secs, "best_epoch": res.best_epoch,
                             "plain": val_scores(res.model, data, [], device),
                             "tta": val_scores(res.model, data, flips, device)})
            summ = {k: statistics.mean(r[m][k] for r in rows) for m in ("plain",) for k in ("auc", "acc")}
            summ.update({f"tta_{k}": statistics.mean(r["tta"][k] for r in rows) for k in ("auc", "acc")})
            summ["secs"] = statistics.mean(r["secs"] for r in rows)
            results.setdefault(ds, {})[cand] = {"config": over, "summary": summ, "runs": rows}
            print(f"{ds:16s} {cand:22s} val auc {summ['auc']:.4f} acc {summ['acc']:.4f} | tta auc "
                  f"{summ['tta_auc']:.4f} acc {summ['tta_acc']:.4f} | {summ['secs']:.1f}s/run", flush=True)
            Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
