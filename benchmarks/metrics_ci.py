"""Vectorised bootstrap CIs (medsight.metrics.bootstrap_ci) against a naive scikit-learn loop.

Usage: PYTHONPATH=src python benchmarks/metrics_ci.py [--n 1000] [--n-boot 1000] [--seed 0]

Both use the same stratified resample indices, so their intervals must agree to rounding;
the table shows seconds for each and the two 95% CIs side by side.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import norm
from sklearn import metrics as skm

from medsight import metrics as M


def naive_bootstrap(y, p, idx, threshold=0.5, alpha=0.05):
    """One scikit-learn call per metric per resample."""
    rows = {k: [] for k in ("auc", "pr_auc", "sensitivity", "specificity", "ppv", "f1", "accuracy")}
    for b in range(idx.shape[0]):
        yb, pb = y[idx[b]], p[idx[b]]
        pred = (pb >= threshold).astype(int)
        rows["auc"].append(skm.roc_auc_score(yb, pb))
        rows["pr_auc"].append(skm.average_precision_score(yb, pb))
        rows["sensitivity"].append(skm.recall_score(yb, pred, zero_division=np.nan))
        rows["specificity"].append(skm.recall_score(yb, pred, pos_label=0, zero_division=np.nan))
        rows["ppv"].append(skm.precision_score(yb, pred, zero_division=np.nan))
        rows["f1"].append(skm.f1_score(yb, pred, zero_division=np.nan))
        rows["accuracy"].append(skm.accuracy_score(yb, pred))
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    return {k: tuple(np.nanpercentile(np.asarray(v, dtype=float), q)) for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    y = rng.integers(0, 2, args.n)
    p = norm.cdf(rng.normal(0, 1, args.n) + 1.2 * y - 0.6)

    M.bootstrap_ci("binary", y, p, n_boot=10)  # warm-up (imports, caches)
    t0 = time.perf_counter()
    fast = M.bootstrap_ci("binary", y, p, n_boot=args.n_boot, seed=args.seed)
    t_fast = time.perf_counter() - t0

    idx = M._resample_indices("binary", y, args.n_boot, np.random.default_rng(args.seed), True)
    t0 = time.perf_counter()
    slow = naive_bootstrap(y, p, idx)
    t_slow = time.perf_counter() - t0

    print(f"binary, N={args.n}, {args.n_boot} stratified resamples, 95% percentile CIs")
    print(f"{'method':<28}{'seconds':>10}")
    print(f"{'vectorised (medsight)':<28}{t_fast:>10.3f}")
    print(f"{'naive sklearn loop':<28}{t_slow:>10.3f}")
    print(f"speed-up: {t_slow / t_fast:.0f}x\n")
    print(f"{'metric':<14}{'vectorised CI':>22}{'sklearn-loop CI':>22}{'max |diff|':>12}")
    for k in slow:
        a, b = fast[k], slow[k]
        diff = max(abs(a[0] - b[0]), abs(a[1] - b[1]))
        print(f"{k:<14}{f'({a[0]:.4f}, {a[1]:.4f})':>22}{f'({b[0]:.4f}, {b[1]:.4f})':>22}{diff:>12.2e}")


if __name__ == "__main__":
    main()
