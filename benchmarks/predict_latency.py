"""Single-image latency, PNG bytes -> probabilities, PyTorch eager vs ONNX Runtime, through medsight.predict.Predictor.

    python benchmarks/predict_latency.py                      # trains tiny simple_cnn and resnet18 bundles (1 epoch)
    python benchmarks/predict_latency.py --bundle runs/breast  # one existing bundle
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from _common import breast_pngs, bundle_or_train, pct  # noqa: E402


def measure(predictor, pngs, n: int, warmup: int = 30) -> list[float]:
    for i in range(warmup):
        predictor.predict_bytes(pngs[i % len(pngs)], "bench.png")
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        predictor.predict_bytes(pngs[i % len(pngs)], "bench.png")
        times.append(time.perf_counter() - t0)
    return times


def measure_model(predictor, x, n: int, warmup: int = 30) -> list[float]:
    """Preprocessed input (1, C, *size) -> probabilities: the backend alone, without reading the file."""
    for _ in range(warmup):
        predictor.probabilities(x)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        predictor.probabilities(x)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="existing bundle (default: train simple_cnn and resnet18 for --epochs)")
    ap.add_argument("--models", nargs="+", default=["simple_cnn", "resnet18"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("-n", type=int, default=500, help="timed predictions per backend")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: by model size)")
    args = ap.parse_args(argv)

    from medsight.bundle import load_bundle
    from medsight.predict import Predictor, default_threads

    bundles = [(None, args.bundle)] if args.bundle else [(m, None) for m in args.models]
    rows = []
    for model, path in bundles:
        b = load_bundle(bundle_or_train(path, model or "simple_cnn", args.epochs))
        threads = args.threads or default_threads(b)
        pngs = breast_pngs(32, int(b.meta.input.size[-1]))
        res = {}
        for backend in ("torch", "onnx"):
            p = Predictor(b, backend=backend, threads=threads)
            t = measure(p, pngs, args.n)
            m = measure_model(p, p.load_bytes(pngs[0], "bench.png")[None], args.n)
            res[backend] = (pct(t, 50), pct(t, 99), pct(m, 50))
        name = f"{b.meta.model.name} {'x'.join(map(str, b.meta.input.size))}"
        rows.append((name, threads, res))

    print(f"single-image latency, PNG bytes -> probabilities, n={args.n}, cpu_count={os.cpu_count()}")
    print("end to end = PNG bytes -> read -> preprocess -> model -> probabilities; model = preprocessed input -> "
          "probabilities")
    print(f"{'model':<18} {'threads':>7} | {'torch p50':>9} {'torch p99':>9} {'onnx p50':>9} {'onnx p99':>9} "
          f"{'speed-up':>8} | {'model: torch p50':>16} {'onnx p50':>9} {'speed-up':>8}")
    for name, threads, res in rows:
        (tp50, tp99, tm), (op50, op99, om) = res["torch"], res["onnx"]
        print(f"{name:<18} {threads:>7} | {tp50:>7.3f}ms {tp99:>7.3f}ms {op50:>7.3f}ms {op99:>7.3f}ms "
              f"{tp50 / op50:>7.2f}x | {tm:>14.3f}ms {om:>7.3f}ms {tm / om:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
