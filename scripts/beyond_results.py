"""Measured results for docs/beyond.md: shift table, OOD AUROC and fusion AUCs on small, quick CPU runs.

    MEDSIGHT_DATA_DIR=../shared/data/medmnist PYTHONPATH=src python scripts/beyond_results.py --out runs/beyond

Writes shift.json / shift.png / shift.html / ood.npz / results.json into --out and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fusion_training import fit_fusion, fusion_logits  # noqa: E402 - test helpers, not part of the product
from fusion_training import synthetic_xor as make_xor  # noqa: E402
from ood_baselines import energy_score, msp_score  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/beyond")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    from medsight import ood
    from medsight.bundle import load_bundle
    from medsight.config import load_config
    from medsight.data.sources import load_medmnist
    from medsight.fusion import FusionClassifier, TabularEncoder
    from medsight.models import create_model
    from medsight.pipeline import run_training
    from medsight.shift import evaluate_shift, plot_shift, shift_table_html
    from medsight.tasks import Task
    from medsight.utils import write_json

    results: dict = {}
    # ---- a quick PneumoniaMNIST bundle
    pneu = load_medmnist("pneumoniamnist", 28, download_missing=False)
    breast = load_medmnist("breastmnist", 28, download_missing=False)
    cfg = load_config(None, {"data.name": "pneumoniamnist", "model.name": "simple_cnn", "train.epochs": args.epochs,
                             "train.batch_size": 64, "train.seed": 0, "train.device": "cpu",
                             "train.threads": args.threads})
    t0 = time.perf_counter()
    bdir, fit_res, metrics = run_training(cfg, out / "pneumonia", data=pneu)
    bundle = load_bundle(bdir)
    print(f"trained simple_cnn on PneumoniaMNIST, {args.epochs} epochs, {time.perf_counter() - t0:.0f}s; "
          f"test AUC {metrics['test']['auc']['value']:.4f}")

    # ---- shift
    test = pneu.splits["test"]
    t0 = time.perf_counter()
    shift = evaluate_shift(bundle.model, bundle.task, test.images, test.labels, severities=(1, 3, 5), seed=0)
    results["shift_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(out / "shift.json", shift)
    (out / "shift.png").write_bytes(plot_shift(shift))
    (out / "shift.html").write_text(shift_table_html(shift))
    results["shift"] = shift
    print(f"\n### Shift (PneumoniaMNIST test, n={shift['n']}, AUC; clean {shift['clean']['auc']:.3f})\n")
    print("| corruption | sev 1 | sev 3 | sev 5 | mean drop |")
    print("|---|---|---|---|---|")
    for name, rows in shift["corruptions"].items():
        cells = " | ".join(f"{r['metrics']['auc']:.3f}" for r in rows)
        print(f"| {name} | {cells} | {shift['summary'][name]['mean_drop']:+.3f} |")

    # ---- OOD
    tr = pneu.splits["train"]
    det = ood.fit_ood_detector(bundle.model, tr.images, tr.labels, pneu.splits["val"].images)
    ood.save_ood(out / "ood.npz", det)
    ind = ood.detect(bundle.model, test.images, det)
    oo = ood.detect(bundle.model, breast.splits["test"].images, det)
    y = np.r_[np.zeros(len(test)), np.ones(len(breast.splits["test"]))]
    aurocs = {"combined": roc_auc_score(y, np.r_[ind["ood_score"], oo["ood_score"]])}
    for name, fn in (("energy", energy_score), ("msp", msp_score)):
        aurocs[name] = roc_auc_score(y, np.r_[fn(ind["logits"]), fn(oo["logits"])])
    results["ood"] = {"auroc": aurocs, "threshold": det["threshold"],
                      "flag_rate_in_distribution": float(ind["ood_flag"].mean()),
                      "flag_rate_ood": float(oo["ood_flag"].mean())}
    print("\n### OOD: PneumoniaMNIST test (in) vs BreastMNIST test (out)\n")
    print("| score | AUROC |\n|---|---|")
    for k, v in aurocs.items():
        print(f"| {k} | {v:.4f} |")
    print(f"flag rate at the val 95th percentile: in-distribution {ind['ood_flag'].mean():.3f}, "
          f"OOD {oo['ood_flag'].mean():.3f}")

    # ---- fusion
    trx, vax, tex = make_xor(1200, 0), make_xor(300, 1), make_xor(500, 2)
    enc = TabularEncoder.fit(trx[1], numeric=["age", "bmi"], categorical=["sex"])
    tabs = [enc.transform(s[1]) for s in (trx, vax, tex)]
    fcfg = load_config(None, {"train.epochs": 12, "train.batch_size": 64, "train.lr": 3e-3, "train.seed": 0,
                              "train.device": "cpu"})
    fusion = {}
    for mode in ("tabular", "image", "concat", "film", "gated"):
        torch.manual_seed(0)
        img = None if mode == "tabular" else create_model("simple_cnn", input_size=16, num_outputs=1, width=0.5)
        r = fit_fusion(FusionClassifier(img, enc.n_features, 1, mode), Task("binary", 2),
                       (trx[0], tabs[0], trx[2]), (vax[0], tabs[1], vax[2]), cfg=fcfg)
        fusion[mode] = roc_auc_score(tex[2], fusion_logits(r.model, tex[0], tabs[2]).reshape(-1).numpy())
    results["fusion_auc"] = fusion
    print("\n### Fusion: synthetic blob XOR (age > 60), test AUC\n")
    print("| model | AUC |\n|---|---|")
    for k, v in fusion.items():
        print(f"| {k} | {v:.4f} |")
    write_json(out / "results.json", results)


if __name__ == "__main__":
    main()
