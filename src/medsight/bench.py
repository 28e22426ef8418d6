"""MedMNIST accuracy-per-compute benchmark: medsight's recipes vs the MedMNIST v2 paper and its reference recipe.

For every dataset it trains the packaged recipe (``medsight/recipes/<name>.yaml``) for several seeds and the
paper's reference recipe (ResNet-18, 3x3 stride-1 stem, Adam 1e-3, batch 128, step decay x0.1 at 50%/75%, best
epoch by val AUC) for a few epochs only (its per-epoch time x 100 is its full cost). Both go through
``medsight.pipeline.run_training``: there is no second training loop. The model is chosen on validation; test
metrics are only reported.
"""

from __future__ import annotations

import math
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medsight.config import load_config
from medsight.pipeline import load_data_for, run_training

DATASETS = {  # key -> (recipe, MedMNIST name, size)
    "breastmnist": ("breastmnist", "breastmnist", 28),
    "breastmnist_64": ("breastmnist_64", "breastmnist", 64),
    "pneumoniamnist": ("pneumoniamnist", "pneumoniamnist", 28),
    "adrenalmnist3d": ("adrenalmnist3d", "adrenalmnist3d", 28),
    # accuracy-first recipes (ResNet-18 + augmentation): over the 5-minute CPU budget, meant for a GPU
    "breastmnist_r18": ("breastmnist_r18", "breastmnist", 28),
    "pneumoniamnist_r18": ("pneumoniamnist_r18", "pneumoniamnist", 28),
}
# MedMNIST v2 (Yang et al. 2023), Table 3, test split, as quoted in shared/data/README.md. (AUC, ACC)
PAPER = {
    "breastmnist": {"ResNet-18 (28)": (0.901, 0.863), "ResNet-50 (28)": (0.857, 0.812),
                    "Google AutoML Vision": (0.919, 0.861)},
    "pneumoniamnist": {"ResNet-18 (28)": (0.944, 0.854), "ResNet-50 (28)": (0.948, 0.854),
                       "Google AutoML Vision": (0.991, 0.946)},
}
TARGETS = {"breastmnist": (0.92, 0.88), "pneumoniamnist": (0.975, 0.90), "adrenalmnist3d": (0.85, 0.81)}
REFERENCE = {"model.name": "resnet18", "model.stem": "small", "model.width": 1.0, "train.optimizer": "adam",
             "train.lr": 1e-3, "train.batch_size": 128, "train.schedule": "step",
             "train.step_milestones": [0.5, 0.75], "train.monitor": "auc", "train.weight_decay": 0.0,
             "augment.enabled": False}


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; process-wide high-water mark


def _run(cfg, data, device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _, res, metrics = run_training(cfg, tmp, data=data)
    wall = time.perf_counter() - t0
    epochs = len(res.history)
    train_secs = sum(r["seconds"] for r in res.history)
    n = len(data.split("train"))
    return {"seed": cfg.train.seed, "test_auc": metrics["test"]["auc"]["value"],
            "test_acc": metrics["test"]["accuracy"]["value"], "val_auc": metrics["val"]["auc"]["value"],
            "wall_s": wall, "epochs": epochs, "epoch_s": train_secs / max(1, epochs),
            "images_per_s": n * epochs / max(train_secs, 1e-9), "peak_mem_mb": _peak_mem_mb(device),
            "best_epoch": res.best_epoch}


def _ms(xs: list[float]) -> tuple[float, float]:
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _subset(data, n: int):
    import copy

    d = copy.copy(data)
    d.splits = dict(data.splits)
    s = data.splits["train"]
    d.splits["train"] = type(s)(images=s.images[:n], labels=s.labels[:n])
    return d


def run_benchmark(datasets=tuple(DATASETS), seeds=(0, 1, 2), *, device: str | None = None, quick: bool = False,
                  ref_epochs: int = 2, epochs_cap: int | None = None, amp: str = "off", threads: int | None = None,
                  log=print) -> dict:
    """Returns {"rows": [...], "meta": {...}}; ``epochs_cap`` runs each recipe for at most that many epochs (its full
    cost is then estimated as measured epoch time x recipe epochs)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for key in datasets:
        if key not in DATASETS:
            from medsight.errors import ConfigError, choices_message

            raise ConfigError(choices_message("benchmark dataset", key, DATASETS))
        recipe, name, size = DATASETS[key]
        base = {"train.device": str(dev), "train.amp": amp, "train.threads": threads}
        cfg0 = load_config(None, base, recipe=recipe)
        data = load_data_for(cfg0)
        full_epochs = cfg0.train.epochs
        over = dict(base)
        if quick:
            data = _subset(data, 64)
            over["train.epochs"] = 1
        elif epochs_cap:
            over["train.epochs"] = min(full_epochs, epochs_cap)
        runs = []
        for s in seeds:
            cfg = load_config(None, {**over, "train.seed": s}, recipe=recipe)
            runs.append(_run(cfg, data, dev))
            log(f"{key} recipe seed {s}: test AUC {runs[-1]['test_auc']:.4f} ACC {runs[-1]['test_acc']:.4f} "
                f"({runs[-1]['wall_s']:.1f}s)")
        est_full = statistics.mean(r["epoch_s"] for r in runs) * full_epochs
        rec = {"dataset": key, "method": f"medsight recipe `{recipe}`", "seeds": list(seeds),
               "auc": _ms([r["test_auc"] for r in runs]), "acc": _ms([r["test_acc"] for r in runs]),
               "val_auc": _ms([r["val_auc"] for r in runs]),
               "wall_s": statistics.mean(r["wall_s"] for r in runs), "train_s_full_est": est_full,
               "epochs_run": runs[0]["epochs"], "epochs_recipe": full_epochs,
               "images_per_s": statistics.mean(r["images_per_s"] for r in runs),
               "peak_mem_mb": max(r["peak_mem_mb"] for r in runs), "runs": runs}
        rows.append(rec)
        # the paper's reference recipe, a few epochs, same process (ref_epochs=0 skips it)
        ref = {**base, **REFERENCE, "data.name": name, "data.size": size, "train.epochs": 1 if quick else ref_epochs,
               "train.seed": seeds[0]}
        if quick:
            ref["model.width"] = 0.125
        if not quick and ref_epochs <= 0:
            for label, (auc, acc) in (PAPER.get(name, {}) if size == 28 else {}).items():
                rows.append({"dataset": key, "method": f"paper: {label}", "auc": (auc, None), "acc": (acc, None)})
            continue
        r = _run(load_config(None, ref), data, dev)
        log(f"{key} reference ({r['epochs']} epochs): {r['epoch_s']:.1f}s/epoch")
        rows.append({"dataset": key, "method": f"reference ResNet-18 recipe, {r['epochs']} of 100 epochs",
                     "seeds": [seeds[0]], "auc": (r["test_auc"], 0.0), "acc": (r["test_acc"], 0.0),
                     "wall_s": r["wall_s"], "train_s_full_est": r["epoch_s"] * 100, "epochs_run": r["epochs"],
                     "epochs_recipe": 100, "images_per_s": r["images_per_s"], "peak_mem_mb": r["peak_mem_mb"],
                     "runs": [r]})
        for label, (auc, acc) in (PAPER.get(name, {}) if size == 28 else {}).items():
            rows.append({"dataset": key, "method": f"paper: {label}", "auc": (auc, None), "acc": (acc, None)})
    meta = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
            platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "amp": amp,
            "quick": quick, "epochs_cap": epochs_cap, "torch": torch.__version__, "targets": TARGETS}
    return {"rows": rows, "meta": meta}


def _fmt(ms, nd=3) -> str:
    m, s = ms
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    return f"{m:.{nd}f}" if s is None else f"{m:.{nd}f} ± {s:.{nd}f}"


def to_markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"Device: {meta['device']} ({meta['device_name']}), {meta['threads']} threads, amp={meta['amp']}, "
             f"torch {meta['torch']}." + (" QUICK smoke run: numbers are meaningless." if meta["quick"] else ""),
             "",
             "| dataset | method | test AUC | test ACC | epochs run | wall s (run) | train s, full recipe | img/s | "
             "peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "wall_s" not in r:
            lines.append(f"| {r['dataset']} | {r['method']} | {_fmt(r['auc'])} | {_fmt(r['acc'])} | 100 | - | - | - "
                         "| - |")
            continue
        lines.append(f"| {r['dataset']} | {r['method']} | {_fmt(r['auc'])} | {_fmt(r['acc'])} | "
                     f"{r['epochs_run']}/{r['epochs_recipe']} | {r['wall_s']:.1f} | {r['train_s_full_est']:.1f} | "
                     f"{r['images_per_s']:.0f} | {r['peak_mem_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: str | Path, stem: str = "medmnist") -> tuple[Path, Path]:
    from medsight.utils import atomic_write_text, write_json

    out = Path(out_dir)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    atomic_write_text(md, to_markdown(result))
    write_json(js, result)
    return md, js
