"""Temperature scaling on PneumoniaMNIST: ECE before / after on the validation and test splits.

T is fitted on validation (NLL) and kept only when it lowers validation ECE; the test split is only reported.

    MEDSIGHT_DATA_DIR=../shared/data/medmnist python benchmarks/calibration.py [--config default|wide]

'wide' (simple_cnn x2, 30 epochs, lr 3e-3, best epoch by val loss) is over-confident enough for T to matter; the
default 10-epoch baseline is already calibrated on validation (T stays 1). About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from medsight.bundle import load_bundle  # noqa: E402
from medsight.config import load_config  # noqa: E402
from medsight.data.sources import load_medmnist  # noqa: E402
from medsight.evaluate import calibration_report  # noqa: E402
from medsight.pipeline import run_training  # noqa: E402

CONFIGS = {
    "default": {"train.epochs": 10},
    "wide": {"model.width": 2, "train.epochs": 30, "train.lr": 3e-3, "train.monitor": "loss"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="wide")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = load_medmnist("pneumoniamnist", 28)
    cfg = load_config(None, {"data.name": "pneumoniamnist", "train.n_boot": 0, "train.ood": False,
                             "train.seed": args.seed, **CONFIGS[args.config]})
    with tempfile.TemporaryDirectory() as tmp:
        out, _, m = run_training(cfg, Path(tmp) / "run", data=data)
        rep = calibration_report(load_bundle(out), data, ("val", "test"))
    print(f"PneumoniaMNIST, config {args.config!r}, seed {args.seed}: temperature T = {rep['temperature']:.3f} "
          f"(fitted on val), test AUC {m['test']['auc']['value']:.4f}")
    print("| split | ECE uncalibrated | ECE with T |")
    print("|---|---|---|")
    for s in ("val", "test"):
        print(f"| {s} | {rep[f'ece_before_{s}']:.4f} | {rep[f'ece_after_{s}']:.4f} |")


if __name__ == "__main__":
    main()
