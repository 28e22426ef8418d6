"""The CPU benchmark of issue 13: medsight's automatic recipe (``medsight train --data NAME`` with no flags) vs a
plain PyTorch reference loop (``reference_loop.py``), both run in this one process, one thread, 3 seeds each,
official test split; the operating threshold is chosen on validation (Youden's J) by both.

    python benchmarks/cpu_recipes.py breastmnist --seeds 0 1 2      # -> results/cpu_breastmnist.json
    python benchmarks/cpu_recipes.py --table                        # -> results/cpu_recipes.md + README table

Wall seconds are those of the shared 2-core machine (other jobs ran beside it); CPU seconds are this process's
and its worker processes' (ensemble members).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "src"))
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results"
TARGETS = {"breastmnist": (0.92, 0.88), "pneumoniamnist": (0.975, 0.90), "adrenalmnist3d": (0.90, 0.84)}
PAPER = {  # MedMNIST v2 (Yang et al. 2023), Table 3, 28 px, test split (AUC, ACC)
    "breastmnist": {"ResNet-18 (28)": (0.901, 0.863), "ResNet-50 (28)": (0.857, 0.812), "AutoML Vision": (0.919, 0.861)},
    "pneumoniamnist": {"ResNet-18 (28)": (0.944, 0.854), "ResNet-50 (28)": (0.948, 0.854),
                       "AutoML Vision": (0.991, 0.946)},
}


def medsight_run(name: str, seed: int, extra: dict) -> dict:
    import torch

    from medsight.config import load_config
    from medsight.pipeline import run_training

    cfg = load_config(None, {"data.name": name, "auto": True, "train.seed": seed, "train.threads": 1,
                             "train.device": "cpu", "train.n_boot": 0, **extra})
    import resource

    def cpu() -> float:  # this process and its finished children (ensemble members trained in worker processes)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + ch.ru_utime + ch.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    with tempfile.TemporaryDirectory() as tmp:
        _, res, m = run_training(cfg, Path(tmp) / "b")
        meta = json.loads((Path(tmp) / "b" / "bundle.json").read_text())
    return {"seed": seed, "test_auc": m["test"]["auc"]["value"], "test_acc": m["test"]["accuracy"]["value"],
            "val_auc": m["val"]["auc"]["value"], "best_epoch": res.best_epoch, "epochs": len(res.history),
            "train_s": sum(r["seconds"] for r in res.history), "wall_s": time.perf_counter() - t0,
            "cpu_s": cpu() - c0, "settings": meta.get("auto_recipe", {}).get("applied"),
            "ensemble": meta.get("ensemble"),
            "torch_threads": torch.get_num_threads()}


def _ms(rows, key):
    xs = [r[key] for r in rows]
    return [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def run_dataset(name: str, seeds, extra: dict, data_dir: str, reference: bool = True) -> dict:
    import torch

    import reference_loop

    torch.set_num_threads(1)
    out = {"dataset": name, "seeds": list(seeds), "extra": extra, "host": platform.node(), "cores": os.cpu_count(),
           "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    ref, med = [], []
    for s in seeds:
        if reference:
            ref.append(reference_loop.run(name, data_dir, s))
            print(f"{name} reference seed {s}: {ref[-1]}", flush=True)
        med.append(medsight_run(name, s, extra))
        print(f"{name} medsight seed {s}: " + json.dumps({k: v for k, v in med[-1].items() if k != 'settings'}),
              flush=True)
    for label, rows in (("reference", ref), ("medsight", med)) if reference else (("medsight", med),):
        out[label] = {"runs": rows, **{k: _ms(rows, k) for k in ("test_auc", "test_acc", "val_auc", "wall_s", "cpu_s")}}
    return out


def table() -> str:
    lines = ["| dataset | method | test AUC | test ACC | wall s / run | CPU s / run | target AUC / ACC |",
             "|---|---|---|---|---|---|---|"]
    for name in TARGETS:
        f = RESULTS / f"cpu_{name}.json"
        t = TARGETS[name]
        if not f.is_file():
            lines.append(f"| {name} | not run | - | - | - | - | {t[0]} / {t[1]} |")
            continue
        r = json.loads(f.read_text())
        n = len(r["seeds"])
        for label, key in (("medsight, automatic recipe (no flags)", "medsight"),
                           ("plain PyTorch reference loop, same process", "reference")):
            x = r[key]
            lines.append(f"| {name} | {label} ({n} seeds) | {x['test_auc'][0]:.3f} ± {x['test_auc'][1]:.3f} | "
                         f"{x['test_acc'][0]:.3f} ± {x['test_acc'][1]:.3f} | {x['wall_s'][0]:.0f} | "
                         f"{x['cpu_s'][0]:.0f} | {t[0]} / {t[1]} |")
        ens = RESULTS / f"cpu_ens3_{name}.json"
        if ens.is_file():
            e = json.loads(ens.read_text())
            x = e["medsight"]
            lines.append(f"| {name} | medsight, automatic recipe + `--ensemble 3` ({len(e['seeds'])} runs, seeds "
                         f"{', '.join(map(str, e['seeds']))}) | {x['test_auc'][0]:.3f} ± {x['test_auc'][1]:.3f} | "
                         f"{x['test_acc'][0]:.3f} ± {x['test_acc'][1]:.3f} | {x['wall_s'][0]:.0f} | "
                         f"{x['cpu_s'][0]:.0f} | {t[0]} / {t[1]} |")
        for label, (auc, acc) in PAPER.get(name, {}).items():
            lines.append(f"| {name} | paper: {label} | {auc:.3f} | {acc:.3f} | - | - | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("datasets", nargs="*", default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--extra", default="{}", help="JSON overrides on top of the automatic recipe")
    ap.add_argument("--stem", default="cpu")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--no-reference", action="store_true", help="medsight runs only (a variant of the recipe)")
    a = ap.parse_args()
    data_dir = os.environ.get("MEDSIGHT_DATA_DIR", str(HERE.parents[1] / "shared" / "data" / "medmnist"))
    for name in a.datasets:
        res = run_dataset(name, a.seeds, json.loads(a.extra), data_dir, reference=not a.no_reference)
        (RESULTS / f"{a.stem}_{name}.json").write_text(json.dumps(res, indent=1))
    if a.table:
        md = table()
        (RESULTS / "cpu_recipes.md").write_text(md)
        start, end = "<!-- cpu-recipes:start -->", "<!-- cpu-recipes:end -->"
        for readme in (HERE.parents[0] / "README.md", HERE / "README.md"):
            text = readme.read_text()
            if start in text and end in text:
                text = text.split(start)[0] + start + "\n" + md + end + text.split(end, 1)[1]
                readme.write_text(text)
        print(md)


if __name__ == "__main__":
    main()
