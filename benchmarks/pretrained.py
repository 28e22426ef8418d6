"""Issue 26: does ImageNet pretraining help on small medical sets at a CPU budget? EfficientNet-Lite0 from scratch
vs from the ImageNet weights of the ``medsight[pretrained]`` package, same architecture, same epochs (so the same
CPU), paired by seed, one thread, official test split; everything else is the automatic recipe's (Adam 1e-3,
cosine, batch 64, augmentation, best epoch by validation AUC, Youden threshold on validation).

    python benchmarks/pretrained.py breastmnist --size 28 --variant scratch --seeds 0
    python benchmarks/pretrained.py --table            # -> results/pretrained.md

Variants: ``scratch``; ``imagenet`` (backbone at 0.1 x the head's learning rate, 1 warm-up epoch: the
discriminative fine-tuning default); ``imagenet_lr1`` (the whole network at one rate). Which fine-tuning variant is
kept is decided on the validation AUC only. Each cell is written to its own file
(``results/pretrained_<data>_<size>_<variant>.json``), so cells can run in separate processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "src"))
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results"
MODEL = "efficientnet_lite0"
VARIANTS = {
    "scratch": {},
    "imagenet": {"model.pretrained": "imagenet", "train.backbone_lr": 0.1, "train.warmup_epochs": 1},
    "imagenet_lr1": {"model.pretrained": "imagenet", "train.backbone_lr": 1.0, "train.warmup_epochs": 1},
}
#: BatchNorm momentum per variant: the plain names ran with TensorFlow's 0.01 (the model's default then),
#: ``<variant>_bnm01`` with PyTorch's 0.1 (the model's default since)
BN_MOMENTUM = {"": 0.01, "_bnm01": 0.1}
#: epochs per cell, sized for about 3-5 CPU-minutes of one thread per run (training measured at ~98 images/s at
#: 28 px with the stride-1 stem, ~84 images/s at 64 px with the stride-2 stem)
CELLS = {("breastmnist", 28): {"epochs": 30, "stem": "small"},
         ("breastmnist", 64): {"epochs": 20, "stem": "standard"},
         ("pneumoniamnist", 28): {"epochs": 2, "stem": "small"}}


def run_cell(name: str, size: int, variant: str, seeds) -> dict:
    import torch
    from cpu_recipes import medsight_run

    import medsight.models

    torch.set_num_threads(1)
    cell = CELLS[(name, size)]
    base, bnm = _split(variant)
    medsight.models.LITE_BN_MOMENTUM = bnm
    extra = {"model.name": MODEL, "model.stem": cell["stem"], "train.epochs": cell["epochs"], **VARIANTS[base]}
    if size != 28:
        extra["data.size"] = size
    rows = []
    for s in seeds:
        r = medsight_run(name, s, extra)
        r.pop("settings", None)
        rows.append(r)
        print(f"{name} {size} {variant} seed {s}: {json.dumps(r)}", flush=True)
    return {"dataset": name, "size": size, "variant": variant, "model": MODEL, "extra": extra, "seeds": list(seeds),
            "bn_momentum": medsight.models.LITE_BN_MOMENTUM,
            "runs": rows, "host": platform.node(), "cores": os.cpu_count(), "torch": torch.__version__,
            "load_at_start": os.getloadavg()[0],
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _split(variant: str) -> tuple[str, float]:
    for suffix, m in BN_MOMENTUM.items():
        if suffix and variant.endswith(suffix):
            return variant[: -len(suffix)], m
    return variant, BN_MOMENTUM[""]


ALL_VARIANTS = [v + suffix for suffix in BN_MOMENTUM for v in VARIANTS]


def _ms(rows, key):
    xs = [r[key] for r in rows]
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def _fmt(rows, key, digits=3):
    m, s = _ms(rows, key)
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


def table() -> str:
    lines = ["| data | method | seeds | val AUC | test AUC | test ACC | CPU s / run | wall s / run | best epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (name, size), cell in CELLS.items():
        for variant in ALL_VARIANTS:
            f = RESULTS / f"pretrained_{name}_{size}_{variant}.json"
            if not f.is_file():
                continue
            r = json.loads(f.read_text())
            rows = r["runs"]
            base, _ = _split(variant)
            label = {"scratch": "from scratch", "imagenet": "ImageNet, backbone LR x0.1, 1 warm-up epoch",
                     "imagenet_lr1": "ImageNet, one LR, 1 warm-up epoch"}[base]
            label += f", BN momentum {r.get('bn_momentum', 0.01):g}"
            lines.append(f"| {name} {size} px | {MODEL} {label}, {cell['epochs']} epochs, stem "
                         f"{'stride 1' if cell['stem'] == 'small' else 'stride 2'} | "
                         f"{', '.join(map(str, r['seeds']))} | {_fmt(rows, 'val_auc')} | {_fmt(rows, 'test_auc')} | "
                         f"{_fmt(rows, 'test_acc')} | {_fmt(rows, 'cpu_s', 0)} | {_fmt(rows, 'wall_s', 0)} | "
                         f"{', '.join(str(x['best_epoch']) for x in rows)} |")
        for stem, label in ((f"cpu_{name}" + ("" if size == 28 else f"_{size}"), "automatic recipe (cnn6), no flags"),):
            f = RESULTS / f"{stem}.json"
            if f.is_file():
                r = json.loads(f.read_text())
                for key, what in (("medsight", label), ("reference", "plain PyTorch reference loop")):
                    if key in r:
                        rows = r[key]["runs"]
                        lines.append(f"| {name} {size} px | {what} (earlier run, `{stem}.json`) | "
                                     f"{', '.join(map(str, r['seeds']))} | {_fmt(rows, 'val_auc') if 'val_auc' in rows[0] else '-'} | "
                                     f"{_fmt(rows, 'test_auc')} | {_fmt(rows, 'test_acc')} | {_fmt(rows, 'cpu_s', 0)} | "
                                     f"{_fmt(rows, 'wall_s', 0)} | - |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", nargs="?")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--variant", choices=ALL_VARIANTS, default="scratch")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--table", action="store_true", help="print the table of every cell run so far")
    a = ap.parse_args()
    if a.dataset:
        res = run_cell(a.dataset, a.size, a.variant, a.seeds)
        (RESULTS / f"pretrained_{a.dataset}_{a.size}_{a.variant}.json").write_text(json.dumps(res, indent=1))
    if a.table:
        print(table())


if __name__ == "__main__":
    main()
