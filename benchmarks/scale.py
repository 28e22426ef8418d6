"""Real-size data: the dataset cache and the streaming paths on a folder of 224 px PNGs.

The folder is made by ``benchmarks/make_scale_folder.py`` (real PneumoniaMNIST images resampled to 224 px with
noise; never in the repo). Each measured step runs as its own process, watched by a sampler that reads
``/proc`` every 0.2 s: the peak RSS of the main process and the peak PSS summed over it and its children
(DataLoader / decode workers share the parent's pages; PSS counts a shared page once in total, RSS once per process).

    python benchmarks/make_scale_folder.py --out /tmp/medsight_scale/folder --n 100000 --size 224
    python benchmarks/scale.py --folder /tmp/medsight_scale/folder --work /tmp/medsight_scale/run

Steps: (1) data preparation, first run (decode into the cache) and second run (cache hit); (2) one epoch of
streamed training over the whole train split (``medsight train``, simple_cnn width 0.25, 1 compute thread,
1 reader process); (3) ``medsight predict`` over ``--predict-n`` files; (4) in-memory vs streamed training
throughput on a subset that fits (same model, same cached inputs, one process, back to back).
Results: ``benchmarks/results/scale.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _children(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


def _kb(path: str, field: str) -> int:
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; wall seconds, peak RSS of the process itself and peak PSS of its tree (MB)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        peak = {"rss_main_mb": 0.0, "pss_tree_mb": 0.0, "rss_tree_mb": 0.0, "procs": 1}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                pids = _children(proc.pid)
                rss_main = _kb(f"/proc/{proc.pid}/status", "VmRSS:") / 1024
                pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) / 1024
                rss = sum(_kb(f"/proc/{p}/status", "VmRSS:") for p in pids) / 1024
                peak["rss_main_mb"] = max(peak["rss_main_mb"], rss_main)
                peak["pss_tree_mb"] = max(peak["pss_tree_mb"], pss)
                peak["rss_tree_mb"] = max(peak["rss_tree_mb"], rss)
                peak["procs"] = max(peak["procs"], len(pids))
                stop.wait(0.2)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        stop.set()
        th.join()
    res = {"seconds": round(time.perf_counter() - t0, 2), "rc": rc, **{k: round(v, 1) for k, v in peak.items()}}
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {rc}); see {log}")
    return res


PREP = """
import sys, time, json
from medsight.data.sources import load_dataset
t = time.perf_counter()
ds = load_dataset(sys.argv[1], size=int(sys.argv[2]), cache_dir=sys.argv[3], stream=True)
print(json.dumps({"prep_seconds": time.perf_counter() - t, "splits": {k: len(v) for k, v in ds.splits.items()},
                  "dtype": str(ds.splits["train"].images.dtype), "type": type(ds.splits["train"].images).__name__}))
"""

THROUGHPUT = """
import sys, json, time
import numpy as np, torch
from medsight.config import load_config
from medsight.data.sources import load_dataset
from medsight.data.dataset import Split
from medsight.train import fit
folder, size, cache_dir, k, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ds = load_dataset(folder, size=size, cache_dir=cache_dir, stream=True)
tr, va = ds.splits["train"], ds.splits["val"]
rows = np.random.default_rng(0).permutation(len(tr))[:k]
out = {}
weights = {}
for mode in ("memory", "stream") * 3:
    img = tr.images.take(rows)
    ds.splits["train"] = Split(images=np.asarray(img) if mode == "memory" else img, labels=tr.labels[rows])
    ds.splits["val"] = Split(images=np.asarray(va.images.take(np.arange(256))), labels=va.labels[:256])
    cfg = load_config(None, {"model.name": "simple_cnn", "model.width": 0.25, "train.epochs": 1,
                             "train.batch_size": 64, "train.threads": 1, "data.workers": workers, "train.seed": 0})
    r = fit(cfg, ds)
    sec = r.history[0]["seconds"]
    out.setdefault(mode, []).append(k / sec)
    weights[mode] = r.model.state_dict()
same = all(torch.equal(weights["memory"][n], weights["stream"][n]) for n in weights["memory"])
print(json.dumps({"images": k, "memory_img_s": out["memory"], "stream_img_s": out["stream"], "same_weights": same}))
"""


TRAIN = """
import sys, json, time
import numpy as np
from medsight.config import load_config
from medsight.data.dataset import Split
from medsight.pipeline import load_data_for, run_training
folder, size, cache_dir, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
cfg = load_config(None, {"data.name": folder, "data.size": size, "data.cache_dir": cache_dir, "data.stream": True,
                         "data.workers": 1, "model.name": "simple_cnn", "model.width": 0.25, "train.epochs": 1,
                         "train.batch_size": 64, "train.threads": 1, "train.ood": False, "train.n_boot": 100,
                         "train.device": "cpu"})
t = time.perf_counter()
ds = load_data_for(cfg)  # the whole folder (all splits), streamed from the cache
load_s = time.perf_counter() - t
tr = ds.splits["train"]
full = len(tr)
if n < full:  # the epoch runs over the first n rows of a seeded permutation of the train split
    rows = np.sort(np.random.default_rng(0).permutation(full)[:n])
    ds.splits["train"] = Split(images=tr.images.take(rows), labels=tr.labels[rows], ids=[tr.ids[i] for i in rows])
bundle, result, metrics = run_training(cfg, out, data=ds)
print(json.dumps({"load_seconds": load_s, "train_split": full, "epoch_images": len(ds.splits["train"]),
                  "epoch_seconds": result.history[0]["seconds"], "streamed": result.extra["streamed"],
                  "test_auc": metrics["test"].get("auc")}))
"""


def _last_json(log: Path) -> dict:
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no result line in {log}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--predict-n", type=int, default=4000, help="files predicted (from the train split)")
    ap.add_argument("--subset", type=int, default=4096, help="train images of the in-memory vs streamed comparison")
    ap.add_argument("--train-n", default="2000,10000", help="images per streamed training epoch (comma-separated runs)")
    ap.add_argument("--steps", default="prep,train,predict,throughput")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cache_dir = work / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", MEDSIGHT_CACHE_DIR=str(cache_dir))
    res_path = Path(a.out) / "scale.json"
    result = json.loads(res_path.read_text()) if res_path.is_file() else {}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                         "note": "2 cores shared with other jobs; compute 1 thread (train.threads=1)"}
    steps = a.steps.split(",")
    n_files = sum(1 for _ in Path(a.folder).rglob("*.png"))
    result["folder"] = {"files": n_files, "size": a.size, "bytes": sum(p.stat().st_size for p in Path(a.folder).rglob("*.png"))}

    def save():
        Path(a.out).mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(result, indent=2))
        (Path(a.out) / "scale.md").write_text(to_markdown(result))

    if "prep" in steps:
        shutil.rmtree(cache_dir, ignore_errors=True)
        for run in ("first", "second"):
            log = work / f"prep_{run}.log"
            m = run_measured([PY, "-c", PREP, a.folder, str(a.size), str(cache_dir)], env, log)
            result.setdefault("prep", {})[run] = {**m, **_last_json(log)}
            print(run, result["prep"][run], flush=True)
            save()
        result["prep"]["second_over_first"] = round(result["prep"]["second"]["prep_seconds"]
                                                    / result["prep"]["first"]["prep_seconds"], 4)
        save()
    bundle = work / "bundle"
    if "train" in steps:
        for n in [int(v) for v in a.train_n.split(",")]:
            shutil.rmtree(bundle, ignore_errors=True)
            log = work / f"train_{n}.log"
            m = run_measured([PY, "-c", TRAIN, a.folder, str(a.size), str(cache_dir), str(n), str(bundle)], env, log)
            r = _last_json(log)
            r["img_s"] = round(r["epoch_images"] / r["epoch_seconds"], 1)
            result.setdefault("train", {})[str(n)] = {**m, **r}
            print("train", n, result["train"][str(n)], flush=True)
            save()
    if "predict" in steps:
        files = sorted(Path(a.folder, "train").rglob("*.png"))[: a.predict_n]
        lst = work / "predict_inputs"
        shutil.rmtree(lst, ignore_errors=True)
        lst.mkdir()
        for f in files:  # a folder of links: the predict input is a folder, as a user would pass it
            (lst / f"{f.parent.name}_{f.name}").symlink_to(f)
        out = work / "predictions.csv"
        cmd = [PY, "-m", "medsight", "predict", str(bundle), str(lst), "--out", str(out), "--batch-size", "64",
               "--workers", "1"]
        m = run_measured(cmd, env, work / "predict.log")
        rows = sum(1 for _ in open(out)) - 1
        if "files" in result.get("predict", {}):  # an older single-run layout
            result["predict"] = {str(result["predict"]["files"]): result["predict"]}
        result.setdefault("predict", {})[str(rows)] = {**m, "files": rows, "img_s": round(rows / m["seconds"], 1)}
        print("predict", result["predict"][str(rows)], flush=True)
        save()
    if "throughput" in steps:
        log = work / "throughput.log"
        m = run_measured([PY, "-c", THROUGHPUT, a.folder, str(a.size), str(cache_dir), str(a.subset), "1"], env, log)
        r = _last_json(log)
        import statistics

        best_m, best_s = max(r["memory_img_s"]), max(r["stream_img_s"])
        med = statistics.median(s / m_ for s, m_ in zip(r["stream_img_s"], r["memory_img_s"]))
        result["throughput"] = {**r, "ratio_best": round(best_s / best_m, 3), "ratio_median_pairs": round(med, 3),
                                **{f"process_{k}": v for k, v in m.items()}}
        print("throughput", result["throughput"], flush=True)
        save()
    save()
    print(to_markdown(result))
    return 0


def to_markdown(r: dict) -> str:
    L = ["# Real-size data: dataset cache and streaming (benchmarks/scale.py)", ""]
    m, f = r.get("machine", {}), r.get("folder", {})
    L.append(f"Machine: {m.get('cpus')} CPU cores ({m.get('note')}), Python {m.get('python')}. Folder: "
             f"{f.get('files')} PNGs at {f.get('size')} px ({(f.get('bytes') or 0) / 1e9:.2f} GB). Memory: peak RSS "
             "of the main process and peak PSS of it plus its worker processes (sampled every 0.2 s).")
    L.append("")
    L.append("| step | seconds | peak RSS main (MB) | peak PSS all processes (MB) | notes |")
    L.append("|---|---:|---:|---:|---|")
    p = r.get("prep", {})
    for run in ("first", "second"):
        if run in p:
            x = p[run]
            L.append(f"| data preparation, {run} run | {x['prep_seconds']:.1f} | {x['rss_main_mb']:.0f} | "
                     f"{x['pss_tree_mb']:.0f} | splits {x['splits']}, stored {x['dtype']} |")
    if "second_over_first" in p:
        L.append(f"| second / first | {100 * p['second_over_first']:.2f}% | | | |")
    for _, t in sorted(r.get("train", {}).items(), key=lambda kv: int(kv[0])):
        L.append(f"| train 1 epoch, streamed: {t['epoch_images']} of the {t['train_split']} train images | "
                 f"{t['seconds']:.0f} (epoch {t['epoch_seconds']:.0f}) | {t['rss_main_mb']:.0f} | "
                 f"{t['pss_tree_mb']:.0f} | {t['img_s']} img/s; process total incl. loading the whole folder from "
                 "the cache, validation, calibration, test metrics, bundle |")
    pred = r.get("predict", {})
    pred = {str(pred["files"]): pred} if "files" in pred else pred
    for _, q in sorted(pred.items(), key=lambda kv: int(kv[0])):
        L.append(f"| `medsight predict` | {q['seconds']:.0f} | {q['rss_main_mb']:.0f} | {q['pss_tree_mb']:.0f} | "
                 f"{q['files']} files, {q['img_s']} img/s, 1 decode worker, torch threads as the bundle sets (2 here) |")
    if "throughput" in r:
        h = r["throughput"]
        L.append("")
        L.append(f"In-memory vs streamed training, {h['images']} images that fit, same model (simple_cnn width 0.25, "
                 "1 thread), same cached inputs, alternated in one process (memory, stream, memory, stream, ...):")
        L.append("")
        L.append("| path | img/s (runs) |")
        L.append("|---|---|")
        L.append(f"| in memory | {', '.join(f'{v:.1f}' for v in h['memory_img_s'])} |")
        L.append(f"| streamed (1 reader process) | {', '.join(f'{v:.1f}' for v in h['stream_img_s'])} |")
        L.append("")
        L.append(f"Streamed / in-memory: {100 * h['ratio_best']:.1f}% (best run each), "
                 f"{100 * h.get('ratio_median_pairs', float('nan')):.1f}% (median over the back-to-back pairs). "
                 f"Final weights identical: {h['same_weights']}.")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
