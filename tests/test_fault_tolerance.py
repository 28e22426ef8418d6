"""SIGKILL a training run mid-epoch, resume it with --resume: same final weights as an uninterrupted run."""

import signal
import subprocess
import time

import torch

from _subproc import env, medsight_cmd
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
    last = part / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert last.exists(), "no checkpoint appeared"
    time.sleep(0.1)  # into the next epoch
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert killed, "the run finished before it could be killed; make the epochs longer"
    assert not (part / "model.pt").exists()
    ck = torch.load(last, weights_only=False)
    assert ck["epoch"] < 3  # it really was interrupted before the end

    r = subprocess.run(medsight_cmd(*args, "--out", str(part), "--resume"), env=env(), capture_output=True,
                       text=True, timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(last, weights_only=False)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    fa = torch.load(full / "model.pt", weights_only=True)
    fb = torch.load(part / "model.pt", weights_only=True)
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=1e-6)
    assert a["best_epoch"] == b["best_epoch"]
