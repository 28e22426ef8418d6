"""Streaming from the dataset cache: training reads batches from disk with the same order and the same result as
the in-memory path; run_model reads one batch at a time; predict holds a bounded number of files; under torchrun
each rank reads only its shard, and the ranks together read the split once per epoch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.config import load_config
from medsight.data.cache import DiskArray
from medsight.inference import run_model
from medsight.pipeline import load_data_for
from medsight.train import fit
from tests._subproc import env

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path, n: int = 20, side: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    counts = {"train": n, "val": 6, "test": 6}
    for s, k in counts.items():
        for c in ("a", "b"):
            (root / s / c).mkdir(parents=True)
            for i in range(k):
                img = rng.integers(0, 256, (side, side), dtype=np.uint8)
                if c == "b":
                    img[: side // 2] //= 3  # a learnable difference
                Image.fromarray(img).save(root / s / c / f"{i}.png")
    return root


def _cfg(root, tmp_path, stream, **extra):
    return load_config(None, {"data.name": str(root), "data.size": 16, "data.stream": stream,
                              "data.cache_dir": str(tmp_path / "cache"), "model.name": "simple_cnn",
                              "train.epochs": 2, "train.batch_size": 8, "train.threads": 1, "augment.enabled": True,
                              "train.seed": 1, **extra})


def test_streamed_training_equals_in_memory(tmp_path):
    root = _tree(tmp_path / "tree")
    mem_cfg = _cfg(root, tmp_path, False)
    mem_data = load_data_for(mem_cfg)
    assert isinstance(mem_data.splits["train"].images, np.ndarray)
    mem = fit(mem_cfg, mem_data)
    st_cfg = _cfg(root, tmp_path, True, **{"data.workers": 2})
    st_data = load_data_for(st_cfg)
    assert isinstance(st_data.splits["train"].images, DiskArray)
    st = fit(st_cfg, st_data)
    assert mem.extra["streamed"] is False and st.extra["streamed"] is True
    a, b = mem.model.state_dict(), st.model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same inputs, same batches, same augmentation: bit-identical
    assert [h["train_loss"] for h in mem.history] == [h["train_loss"] for h in st.history]
    assert [h["val_loss"] for h in mem.history] == [h["val_loss"] for h in st.history]


def test_auto_streams_above_the_memory_budget(tmp_path):
    root = _tree(tmp_path / "tree", n=4)
    small = load_data_for(_cfg(root, tmp_path, "auto", **{"data.memory_budget_gb": 1.0}))
    big = load_data_for(_cfg(root, tmp_path, "auto", **{"data.memory_budget_gb": 1e-6}))
    assert isinstance(small.splits["train"].images, np.ndarray)
    assert isinstance(big.splits["val"].images, DiskArray)


def test_run_model_reads_one_batch_at_a_time(tmp_path):
    root = _tree(tmp_path / "tree")
    data = load_data_for(_cfg(root, tmp_path, True))
    images = data.splits["train"].images
    sizes = []

    class Counting(DiskArray):
        def _read(self, file_rows):
            sizes.append(len(file_rows))
            return super()._read(file_rows)

    images.__class__ = Counting
    torch.manual_seed(0)
    from medsight.models import create_model

    model = create_model("simple_cnn", spatial_dims=2, in_channels=1, num_outputs=1, input_size=(16, 16))
    streamed = run_model(model, images, batch_size=7, tta_flip=[2], features=True)
    assert sizes == [7] * 5 + [5]  # 40 rows, never more than a batch in memory
    whole = run_model(model, np.asarray(DiskArray(images.path, images.rows)), batch_size=7, tta_flip=[2],
                      features=True)
    torch.testing.assert_close(streamed.logits, whole.logits, rtol=0, atol=0)
    torch.testing.assert_close(streamed.features, whole.features, rtol=0, atol=0)


@pytest.fixture
def bundle(tmp_path):
    from medsight.pipeline import run_training

    root = _tree(tmp_path / "tree", n=8)
    cfg = _cfg(root, tmp_path, False, **{"train.epochs": 1, "train.n_boot": 0, "augment.enabled": False})
    out, _, _ = run_training(cfg, tmp_path / "bundle")
    return out, root


def test_predict_holds_a_bounded_number_of_files(bundle, tmp_path, monkeypatch):
    from medsight.predict import Predictor

    out, root = bundle
    files = sorted(root.rglob("*.png")) * 3  # 120 inputs
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    files.insert(50, bad)
    p = Predictor(out)
    loads = []
    real = Predictor.load_file

    def counting(self, path, **kw):
        loads.append(path)
        return real(self, path, **kw)

    monkeypatch.setattr(Predictor, "load_file", counting)
    it = p.iter_predictions(files, batch_size=8, workers=0)
    first = next(it)
    assert len(loads) == 8  # the first row comes out after one batch, not after reading all 121 files
    rows = [first, *it]
    assert len(rows) == 121 and [r.file for r in rows] == [str(f) for f in files]
    assert rows[50].error and "bad.png" in rows[50].error and all(r.ok for i, r in enumerate(rows) if i != 50)
    # decode workers (a batch ahead): the same rows in the same order
    monkeypatch.setattr(Predictor, "load_file", real)
    par = list(p.iter_predictions(files, batch_size=8, workers=2))
    assert [r.to_dict() for r in par] == [r.to_dict() for r in rows]


def test_predict_workers_memory_stays_bounded(bundle, tmp_path):
    """Peak Python-heap memory of predicting many files with decode workers does not grow with the file count."""
    import tracemalloc

    from medsight.predict import Predictor

    out, root = bundle
    p = Predictor(out)
    few, many = sorted(root.rglob("*.png"))[:16], sorted(root.rglob("*.png")) * 8  # 16 vs 320 files
    peaks = []
    for files in (few, many):
        tracemalloc.start()
        n = sum(1 for _ in p.iter_predictions(files, batch_size=8, workers=2))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert n == len(files)
    # 20x the files: the peak grows by the per-file result objects at most, not by 20x the decoded arrays
    assert peaks[1] < peaks[0] * 3, peaks


@pytest.mark.slow
def test_two_torchrun_ranks_read_disjoint_shards_that_cover_the_split(tmp_path):
    root = _tree(tmp_path / "tree", n=21)  # 42 train images: batches of 8, the last one (2) split 1/1
    e = env(MEDSIGHT_CACHE_DIR=str(tmp_path / "cache"))
    script = str(REPO / "tests" / "_stream_rank.py")
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    r1 = subprocess.run([sys.executable, script, str(root), str(single)], env=e, capture_output=True, text=True,
                        timeout=180)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                         "29617", script, str(root), str(multi)], env=e, capture_output=True, text=True, timeout=240)
    assert r2.returncode == 0, (r2.stdout[-2000:], r2.stderr[-3000:])
    entries = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(entries) == 1  # one cache entry, built once (under a lock), read by both ranks
    train_rows = set(json.loads((multi / "train_rows.json").read_text()))
    assert len(train_rows) == 42

    def reads(path):
        return [list(map(int, line.split())) for line in path.read_text().splitlines() if line.strip()]

    one = reads(single / "rows_rank0.txt")
    r0, r1_ = reads(multi / "rows_rank0.txt"), reads(multi / "rows_rank1.txt")
    assert len(one) == len(r0) == len(r1_) == 2 * 6  # 2 epochs x 6 batches
    for step in range(12):
        a, b = set(r0[step]), set(r1_[step])
        assert not a & b  # disjoint shards
        assert sorted(a | b) == sorted(one[step])  # together: the single process's batch
        assert len(r0[step]) + len(r1_[step]) == len(one[step])
    for epoch in range(2):
        seen = [i for s in range(6 * epoch, 6 * epoch + 6) for i in r0[s] + r1_[s]]
        assert sorted(seen) == sorted(train_rows)  # every row once per epoch
    a, b = torch.load(single / "weights.pt"), torch.load(multi / "weights.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)  # the DDP tolerance of test_distributed.py


def test_whole_job_streamed_equals_in_memory(tmp_path):
    """Training, calibration, OOD fitting, metrics and the shift battery read a streamed split batch by batch and
    give the same numbers as in memory."""
    from medsight.bundle import load_bundle
    from medsight.pipeline import run_training
    from medsight.shift import evaluate_shift

    root = _tree(tmp_path / "tree", n=12)
    outs = {}
    for stream in (False, True):
        cfg = _cfg(root, tmp_path, stream, **{"train.epochs": 1, "train.n_boot": 20, "train.ood": True})
        data = load_data_for(cfg)
        out, res, metrics = run_training(cfg, tmp_path / f"run_{stream}", data=data)
        b = load_bundle(out)
        test = data.splits["test"]
        shift = evaluate_shift(b.model, b.task, test.images, test.labels, corruptions=["gaussian_noise"],
                               severities=(2,), seed=0)
        with np.load(out / "ood.npz") as z:
            ood = {k: z[k].tolist() for k in z.files}
        outs[stream] = (res.extra["streamed"], metrics, b.meta.threshold, b.meta.temperature, b.meta.ood,
                        ood, shift)
    assert outs[False][0] is False and outs[True][0] is True
    assert outs[False][5]  # the OOD detector was fitted (on the training split's features)
    assert outs[False][1:] == outs[True][1:]
