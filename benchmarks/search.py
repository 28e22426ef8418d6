"""Recipe search on the VALIDATION split only. Each candidate is a change to the automatic recipe
(``medsight.autorecipe``) applied the same way to every data set, so that what wins is a rule, not a lookup table.
Every candidate is trained for several seeds and scored on the validation split (ROC AUC with the recipe's own
flip test-time augmentation, ACC at 0.5). Test metrics are never computed here.

    python benchmarks/search.py --workers 8 --threads 2 --device cuda --deadline 420 --out search.jsonl
    python benchmarks/search.py --summarise search.jsonl          # -> markdown table on stdout

Jobs are ordered seed-major (every candidate's first seed before any second seed), so a run cut short by
``--deadline`` still scores every candidate; the summary says how many seeds each mean is over.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DATASETS = {"breastmnist": 5, "pneumoniamnist": 3, "adrenalmnist3d": 3}  # name: seeds (BreastMNIST's val is 78 images)

# candidate: overrides on top of the automatic recipe; "2d"/"3d" keys hold dimension-specific overrides and
# "epochs_factor" scales the epochs the rule chose
CANDIDATES: dict[str, dict] = {
    "auto": {},
    "ema99": {"train.ema": 0.99},
    "ema995": {"train.ema": 0.995},
    "ls0.1": {"train.label_smoothing": 0.1},
    "mixup0.2": {"train.mixup": 0.2},
    "mixup0.4": {"train.mixup": 0.4},
    "wide": {"2d": {"model.width": 1.5}, "3d": {"model.width": 1.0}},
    "narrow": {"2d": {"model.width": 0.5}, "3d": {"model.width": 0.25}},
    "dropout0.5": {"model.dropout": 0.5},
    "dropout0": {"model.dropout": 0.0},
    "lr3e-3": {"train.lr": 3e-3},
    "lr3e-4": {"train.lr": 3e-4},
    "adamw0.05": {"train.optimizer": "adamw", "train.weight_decay": 0.05},
    "epochs_x2": {"epochs_factor": 2.0},
    "epochs_x0.5": {"epochs_factor": 0.5},
    "aug_strong": {"2d": {"augment.rotate": 30.0, "augment.scale": 0.2, "augment.translate": 0.1},
                   "3d": {"augment.rotate": 15.0, "augment.scale": 0.1}},
    "aug_off": {"augment.enabled": False},
    "noise0.03": {"augment.noise": 0.03},
    "batch_half": {"2d": {"train.batch_size": 32}, "3d": {"train.batch_size": 16}},
    "ema99_mixup0.2": {"train.ema": 0.99, "train.mixup": 0.2},
    "ema99_ls0.1": {"train.ema": 0.99, "train.label_smoothing": 0.1},
    "ema99_wide": {"train.ema": 0.99, "2d": {"model.width": 1.5}, "3d": {"model.width": 1.0}},
    "ensemble3": {"train.ensemble": 3},
    "ensemble3_ema99": {"train.ensemble": 3, "train.ema": 0.99},
    "stem_stride2": {"model.stem": "standard"},  # first conv stride 2 (the rule uses stride 1 up to 64 x 64 values)
}


def overrides_for(cand: dict, data) -> dict:
    """The candidate's settings for this data set (dimension-specific keys resolved, epochs scaled)."""
    from medsight.autorecipe import choose, facts_of

    dims = "3d" if data.spatial_dims == 3 else "2d"
    over = {k: v for k, v in cand.items() if k not in ("2d", "3d", "epochs_factor")}
    over.update(cand.get(dims, {}))
    if "epochs_factor" in cand:
        base = choose(facts_of(data)).settings["train.epochs"]
        over["train.epochs"] = max(1, round(base * cand["epochs_factor"]))
    return over


def run_job(job: dict) -> dict:
    import torch

    from medsight.config import load_config
    from medsight.inference import run_logits
    from medsight.metrics import compute_metrics
    from medsight.pipeline import load_data_for, run_training
    from medsight.tasks import Task

    torch.set_num_threads(job["threads"])
    base = {"data.name": job["dataset"], "data.size": job.get("size", 28), "auto": True, "train.seed": job["seed"],
            "train.device": job["device"],
            "train.threads": job["threads"], "train.ood": False, "train.n_boot": 0}
    data = load_data_for(load_config(None, base))
    over = overrides_for(CANDIDATES[job["candidate"]], data)
    cfg = load_config(None, {**base, **over})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        _, res, _ = run_training(cfg, Path(tmp) / "b", data=data, evaluate=False)
    secs = time.perf_counter() - t0
    val = data.split("val")
    task = Task(data.task, len(data.classes))
    scores = {}
    for name, tta in (("tta", list(cfg.train.tta_flip)), ("plain", [])):
        z = run_logits(res.model.to(torch.device(job["device"])), val.images, tta_flip=tta,
                       device=torch.device(job["device"]))
        p = task.probabilities(z.float().cpu()).numpy()  # the task's own activation (any task type)
        m = compute_metrics(task.name, val.labels, p)
        scores[name] = {"auc": float(m["auc"]), "acc": float(m["accuracy"])}
    return {**job, "overrides": over, "secs": secs, "best_epoch": res.best_epoch, "epochs": len(res.history),
            "val_auc": scores["tta"]["auc"], "val_acc": scores["tta"]["acc"], "val_auc_plain": scores["plain"]["auc"],
            "val_acc_plain": scores["plain"]["acc"]}


def summarise(rows: list[dict]) -> str:
    """Per candidate and data set: mean val AUC (n seeds) and the paired gain over ``auto`` (same seeds) with its
    standard error; ranked by the mean of the per-set gains."""
    by = {}
    for r in rows:
        if "error" not in r:
            by.setdefault((r["candidate"], r["dataset"]), {})[r["seed"]] = r
    sets = [d for d in DATASETS if any(k[1] == d for k in by)]
    lines = ["| candidate | " + " | ".join(f"{d}: val AUC (seeds); gain over auto ± SE" for d in sets)
             + " | mean gain | GPU s / run |", "|---|" + "---|" * (len(sets) + 2)]
    ranked = []
    for cand in CANDIDATES:
        cells, gains, secs = [], [], []
        for d in sets:
            got, ref = by.get((cand, d), {}), by.get(("auto", d), {})
            if not got:
                cells.append("-")
                continue
            cell = f"{statistics.mean(r['val_auc'] for r in got.values()):.4f} ({len(got)})"
            secs += [r["secs"] for r in got.values()]
            diffs = [got[s]["val_auc"] - ref[s]["val_auc"] for s in sorted(set(got) & set(ref))]
            if diffs and cand != "auto":
                se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
                cell += f"; {statistics.mean(diffs):+.4f} ± {se:.4f}"
                gains.append(statistics.mean(diffs))
            cells.append(cell)
        gain = 0.0 if cand == "auto" else statistics.mean(gains) if len(gains) == len(sets) else float("nan")
        ranked.append((gain, cand, cells, statistics.mean(secs) if secs else float("nan")))
    ranked.sort(key=lambda x: -x[0] if x[0] == x[0] else 1e9)
    for gain, cand, cells, s in ranked:
        lines.append(f"| {cand} | " + " | ".join(cells) + f" | {gain:+.4f} | {s:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--only", nargs="*", default=None, help="candidates to run (default: all)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per data set (default: DATASETS)")
    ap.add_argument("--size", type=int, default=28, help="MedMNIST release size (28, 64, ...)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from here (to add seeds to a search)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which no new job starts")
    ap.add_argument("--out", default="search.jsonl")
    ap.add_argument("--summarise", metavar="JSONL", help="print the summary table of a finished search and exit")
    a = ap.parse_args()
    unknown = [c for c in a.only or [] if c not in CANDIDATES] + [d for d in a.datasets if d not in DATASETS]
    if unknown:
        ap.error(f"unknown candidate or data set: {', '.join(unknown)} (candidates: {', '.join(CANDIDATES)}; "
                 f"data sets: {', '.join(DATASETS)})")
    if a.summarise:
        if not Path(a.summarise).is_file():
            ap.error(f"{a.summarise}: no such file")
        print(summarise([json.loads(x) for x in Path(a.summarise).read_text().splitlines() if x.strip()]))
        return
    cands = [c for c in CANDIDATES if not a.only or c in a.only]
    jobs = [{"dataset": d, "candidate": c, "seed": a.first_seed + s, "device": a.device, "threads": a.threads,
             "size": a.size}
            for s in range(max(DATASETS.values()) if a.seeds is None else a.seeds)
            for d in a.datasets for c in cands if s < (a.seeds or DATASETS[d])]
    t0, out = time.perf_counter(), Path(a.out)
    rows = []
    with ProcessPoolExecutor(a.workers, mp_context=multiprocessing.get_context("spawn")) as pool, out.open("a") as f:
        pending, queue, owner = set(), list(jobs), {}
        while queue or pending:
            while queue and len(pending) < a.workers and (a.deadline is None or time.perf_counter() - t0 < a.deadline):
                job = queue.pop(0)
                fut = pool.submit(run_job, job)
                owner[fut] = job
                pending.add(fut)
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    row = fut.result()
                except Exception as e:  # keep searching; the row records what failed
                    row = {**owner[fut], "error": f"{type(e).__name__}: {e}"}
                rows.append(row)
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"{time.perf_counter() - t0:6.0f}s {row.get('dataset', '?'):15s} {row.get('candidate', '?'):16s} "
                      f"seed {row.get('seed', '?')} val auc {row.get('val_auc', float('nan')):.4f} "
                      f"({row.get('secs', 0):.1f}s) {row.get('error', '')}", flush=True)
    print(f"{len(rows)} of {len(jobs)} jobs in {time.perf_counter() - t0:.0f}s ({os.cpu_count()} cores)")
    print(summarise(rows))


if __name__ == "__main__":
    main()
