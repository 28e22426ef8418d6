"""SIGKILL a training run mid-epoch, resume it with --resume: same final weights as an uninterrupted run."""

import signal
import subprocess
import time

import torch

from _subproc import env, medsight_cmd
from medsight.bundle import staging_dir
from tests.conftest import make_npz


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    npz = make_npz(tmp_path / "data.npz", n=(1500, 16, 16), shape=(28, 28))
    args = ["train", "--data", str(npz), "--model", "simple_cnn", "--epochs", "4", "--batch-size", "16",
            "--seed", "11", "--augment", "--set", "train.threads=1", "--no-progress", "--device", "cpu"]
    full, part = tmp_path / "full", tmp_path / "part"
    r = subprocess.run(medsight_cmd(*args, "--out", str(full)), env=env(), capture_output=True, text=True,
                       timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]

    proc = subprocess.Popen(medsight_cmd(*args, "--out", str(part)), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last = staging_dir(part) / "checkpoints" / "last.pt"  # the run builds beside OUT until it is complete
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert last.exists(), "no checkpoint appeared"
    time.sleep(0.1)  # into the next epoch
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert killed, "the run finished before it could be killed; make the epochs longer"
    assert not (part / "model.pt").exists() and not part.exists()
    ck = torch.load(last, weights_only=True)
    assert ck["epoch"] < 3  # it really was interrupted before the end

    r = subprocess.run(medsight_cmd(*args, "--out", str(part), "--resume"), env=env(), capture_output=True,
                       text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not staging_dir(part).exists()
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    fa = torch.load(full / "model.pt", weights_only=True)
    fb = torch.load(part / "model.pt", weights_only=True)
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=1e-6)
    assert a["best_epoch"] == b["best_epoch"]


def _digests(folder):
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigkill_during_a_retrain_leaves_the_old_bundle_unchanged(tmp_path):
    from medsight.predict import Predictor

    npz = make_npz(tmp_path / "data.npz", n=(1500, 16, 16), shape=(28, 28))
    out = tmp_path / "bundle"
    base = ["train", "--data", str(npz), "--model", "simple_cnn", "--batch-size", "16", "--set", "train.threads=1",
            "--no-progress", "--device", "cpu", "--set", "train.n_boot=0", "--out", str(out)]
    r = subprocess.run(medsight_cmd(*base, "--epochs", "1"), env=env(), capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    before = _digests(out)
    x = Predictor(out).probabilities(torch.rand(2, 1, 28, 28).numpy())

    # retraining into the same folder without --overwrite is refused, in one line
    r = subprocess.run(medsight_cmd(*base, "--epochs", "1"), env=env(), capture_output=True, text=True, timeout=150)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    proc = subprocess.Popen(medsight_cmd(*base, "--epochs", "6", "--overwrite", "--seed", "5"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ck = staging_dir(out) / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not ck.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert killed and ck.exists(), "the retrain finished (or never checkpointed) before it could be killed"
    assert _digests(out) == before  # not one byte of the old bundle changed
    again = Predictor(out).probabilities(torch.rand(2, 1, 28, 28).numpy())
    assert again.shape == x.shape
    # the next retrain starts clean (the stale staging folder is discarded) and replaces the bundle when done
    r = subprocess.run(medsight_cmd(*base, "--epochs", "1", "--overwrite", "--seed", "5"), env=env(),
                       capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _digests(out)["model.pt"] != before["model.pt"] and not staging_dir(out).exists()
