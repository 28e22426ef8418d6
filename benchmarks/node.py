"""The DICOM node's loop against a real Orthanc: N single-image CR series pushed to the node's Storage SCP at
once, through the worklist and the bundle, results (SR + Secondary Capture) stored back by STOW-RS (or C-STORE).

Reports series per minute, p50 / p95 time from arrival (the instance written to the worklist) to the results
stored in Orthanc (the job marked sent after the PACS answered), and how each job's processing time splits into
inference + building the result DICOM versus transport + bookkeeping. The reference, in the same process: the
same files through ``Predictor.predict_file(explain=True)`` alone (what `medsight predict` + a heatmap costs).

    python benchmarks/node.py --series 200 [--send dimse] [--out benchmarks/results/node]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO / "benchmarks"))
from _common import bundle_or_train  # noqa: E402 (after the sys.path line)


def _node_fixtures():
    """tests/node/conftest.py (the Orthanc the tests start), loaded by path: one helper for tests and benchmark."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("node_conftest", _REPO / "tests" / "node" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_nf = _node_fixtures()
ORTHANC_AET, Orthanc, make_series, node_config = _nf.ORTHANC_AET, _nf.Orthanc, _nf.make_series, _nf.node_config


def _pct(v: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(v), q)) if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=200)
    ap.add_argument("--send", choices=("dicomweb", "dimse"), default="dicomweb")
    ap.add_argument("--bundle", default=None, help="bundle to run (default: train a tiny --model)")
    ap.add_argument("--model", default="simple_cnn", help="model of the bundle trained when --bundle is not given")
    ap.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    args = ap.parse_args()

    import pydicom
    import torch
    from pynetdicom import AE

    from medsight.data.sources import load_dataset
    from medsight.node.config import parse_config
    from medsight.node.service import Node
    from medsight.predict import Predictor

    torch.set_num_threads(1)
    bundle = bundle_or_train(args.bundle, args.model)
    images = np.asarray(load_dataset("breastmnist", size=28).split("test").images)
    series = make_series(images, args.series)
    tmp = Path(tempfile.mkdtemp(prefix="medsight-bench-node-"))

    # reference: inference + heatmap alone, same files, same process
    pred = Predictor(bundle, threads=1)
    files = []
    for i, s in enumerate(series):
        f = tmp / "ref" / f"{i:04d}.dcm"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(s["files"][0])
        files.append(f)
    pred.predict_file(files[0], explain=True)
    t0 = time.perf_counter()
    for f in files:
        pred.predict_file(f, explain=True)
    ref_s = (time.perf_counter() - t0) / len(files)

    orthanc = Orthanc(tmp / "orthanc").start()
    try:
        from _subproc import free_port

        port = free_port()
        raw = node_config(tmp, bundle, orthanc, port=port, send=args.send, stable_age_s=0.5)
        node = Node(parse_config(raw, tmp)).start()
        try:
            ae = AE(ae_title="PUSHER")
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", ["1.2.840.10008.1.2.1"])
            datasets = [pydicom.dcmread(io.BytesIO(s["files"][0])) for s in series]
            t_start = time.time()
            a = ae.associate("127.0.0.1", port, ae_title="MEDSIGHT")
            for ds in datasets:
                assert a.send_c_store(ds).Status == 0
            a.release()
            t_pushed = time.time()
            deadline = time.time() + 3600
            while node.wl.counts()["sent"] < len(series):
                if time.time() > deadline or node.wl.counts()["failed"]:
                    raise SystemExit(f"node did not finish: {node.wl.counts()}")
                time.sleep(0.1)
            t_end = time.time()
            jobs = node.wl.jobs()
            running_at = {}
            for j in jobs:
                for _, to, _, at in node.wl.history(j["id"]):
                    if to == "running":
                        running_at[j["id"]] = at  # the last (successful) run
        finally:
            node.stop()
    finally:
        orthanc.stop()

    lat = [j["updated_at"] - j["arrived_at"] for j in jobs]
    proc = [j["updated_at"] - running_at[j["id"]] for j in jobs]
    total_proc = sum(proc)
    shares = {k: sum(j[k] for j in jobs) / total_proc for k in ("infer_s", "build_s", "send_s")}
    res = {
        "series": len(series), "send": args.send, "stable_age_s": raw["stable_age_s"], "threads": 1,
        "push_s": t_pushed - t_start, "wall_s": t_end - t_start,
        "series_per_min": len(series) / ((t_end - t_start) / 60),
        "arrival_to_stored_p50_s": _pct(lat, 50), "arrival_to_stored_p95_s": _pct(lat, 95),
        "processing_per_series_s": total_proc / len(jobs),
        "share_inference": shares["infer_s"],
        "share_building_result_dicom": shares["build_s"],
        "share_transport": shares["send_s"],
        "share_bookkeeping": 1 - sum(shares.values()),
        "reference_predict_explain_per_series_s": ref_s,
    }
    res["model"] = pred.bundle.meta["model"]["name"]
    md = [f"# medsight node: {len(series)} series through the loop ({args.send}, Orthanc {ORTHANC_AET})", "",
          "| measure | value |", "|---|---|"]
    md += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in res.items()]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        Path(args.out + ".md").write_text(text)
        Path(args.out + ".json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
