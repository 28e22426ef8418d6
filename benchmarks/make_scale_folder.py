"""Build the scale benchmark's folder of PNGs from real MedMNIST images (not stored in the repo).

Each file is a real PneumoniaMNIST image (28 px, official split) resampled to ``--size`` px (bicubic) with seeded
Gaussian noise (sigma 6 grey levels), written as 8-bit PNG under ``<out>/<split>/<class>/``. The train split holds
``--n`` images (the originals cycled, each copy with its own noise), val and test ``--n-eval`` each.

    python benchmarks/make_scale_folder.py --out /tmp/medsight_scale/folder --n 100000 --size 224
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

CLASSES = ("normal", "pneumonia")


def _write(job):
    out, split, start, stop, size, src_path = job
    from PIL import Image

    with np.load(src_path) as z:
        key = "train" if split == "train" else split
        imgs, labels = z[f"{key}_images"], z[f"{key}_labels"].reshape(-1)
    for i in range(start, stop):
        j = i % len(imgs)
        rng = np.random.default_rng(1_000_003 * ("train", "val", "test").index(split) + i)
        big = Image.fromarray(imgs[j]).resize((size, size), Image.BICUBIC)
        a = np.asarray(big, dtype=np.float32) + rng.normal(0, 6.0, (size, size)).astype(np.float32)
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        p = Path(out) / split / CLASSES[int(labels[j])] / f"{split}_{i:06d}.png"
        Image.fromarray(a).save(p, compress_level=1)
    return stop - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--n-eval", type=int, default=2_000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--src", default=os.path.join(os.environ.get("MEDSIGHT_DATA_DIR", ""), "pneumoniamnist.npz"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    for s in ("train", "val", "test"):
        for c in CLASSES:
            (out / s / c).mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, n in (("train", a.n), ("val", a.n_eval), ("test", a.n_eval)):
        for start in range(0, n, 1000):
            jobs.append((str(out), split, start, min(n, start + 1000), a.size, a.src))
    t0, done = time.perf_counter(), 0
    with Pool(a.workers) as pool:
        for k in pool.imap_unordered(_write, jobs):
            done += k
            print(f"{done} files, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"wrote {done} PNGs to {out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
