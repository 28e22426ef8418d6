"""medsight.progress: silent without a sink; the long library steps report through it when one is installed."""

from __future__ import annotations

import numpy as np

from medsight import progress


class Recorder:
    """A sink that records every event; ``steps()`` summarises them per description."""

    def __init__(self):
        self.events: list[tuple] = []

    def start(self, key, description, total):
        self.events.append(("start", key, description, total))

    def advance(self, key, amount):
        self.events.append(("advance", key, amount))

    def finish(self, key):
        self.events.append(("finish", key))

    def steps(self) -> dict:
        out = {}
        for e in self.events:
            if e[0] == "start":
                out[e[2]] = {"key": e[1], "total": e[3], "done": 0, "finished": False}
        for e in self.events:
            for s in out.values():
                if s["key"] == e[1]:
                    if e[0] == "advance":
                        s["done"] += e[2]
                    elif e[0] == "finish":
                        s["finished"] = True
        return out


def test_no_sink_is_silent_and_transparent():
    assert progress.get_sink() is None
    assert list(progress.track(iter([1, 2, 3]), "x")) == [1, 2, 3]
    with progress.task("y", total=2) as t:
        t.advance(2)  # nothing to report to, nothing raised


def test_track_and_task_report_start_advance_finish():
    rec = Recorder()
    with progress.using(rec):
        assert list(progress.track([10, 20, 30], "reading")) == [10, 20, 30]
        t = progress.task("predicting", total=5)
        t.advance(2)
        t.advance(3)
        t.close()
        t.close()  # a second close reports nothing
        gen = progress.track(range(100), "abandoned")
        next(gen)
        gen.close()  # a step left early still finishes
    assert progress.get_sink() is None
    steps = rec.steps()
    assert steps["reading"] == {"key": steps["reading"]["key"], "total": 3, "done": 3, "finished": True}
    assert steps["predicting"]["total"] == 5 and steps["predicting"]["done"] == 5 and steps["predicting"]["finished"]
    assert steps["abandoned"]["total"] == 100 and steps["abandoned"]["finished"]
    assert sum(1 for e in rec.events if e[0] == "finish") == 3


def test_qc_and_user_dataset_loading_report_per_image(tmp_path):
    from PIL import Image

    from medsight.data.quality import run_qc
    from medsight.data.sources import load_dataset

    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(tmp_path / "tree" / cls / f"{i}.png")
    rec = Recorder()
    with progress.using(rec):
        report = run_qc({"train": (np.zeros((6, 8, 8), np.uint8), np.zeros(6)),
                         "test": (np.ones((2, 8, 8), np.uint8), np.zeros(2))})
        ds = load_dataset(str(tmp_path / "tree"), size=16)
    assert report["n_records"] == 8 and sum(len(s.labels) for s in ds.splits.values()) == 12
    steps = rec.steps()
    assert steps["QC: reading images"]["total"] == 8 and steps["QC: reading images"]["done"] == 8
    decode = steps["decoding images into the dataset cache"]  # user data is decoded once, into the cache
    assert decode["total"] == 12 and decode["done"] == 12
    assert all(s["finished"] for s in steps.values())


def test_predict_and_evaluate_report_progress(served_bundle, breast_files, breast):
    from medsight.bundle import load_bundle
    from medsight.evaluate import evaluate_splits
    from medsight.predict import Predictor

    files = breast_files["png"][:5]
    rec = Recorder()
    with progress.using(rec):
        results = Predictor(served_bundle, backend="torch").predict_paths(files, batch_size=2)
        evaluate_splits(load_bundle(served_bundle), breast, ("val", "test"), n_boot=0)
    assert len(results) == 5
    steps = rec.steps()
    bar = steps["predicting 5 files, by batch"]  # 5 files in batches of 2
    assert bar["total"] == 3 and bar["done"] == 3 and bar["finished"]
    per_split = steps["metrics and bootstrap CIs per split"]
    assert per_split["total"] == 2 and per_split["done"] == 2 and per_split["finished"]
