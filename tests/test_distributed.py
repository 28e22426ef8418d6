"""`torchrun --nproc-per-node 2 -m medsight train` (gloo, CPU) == one process with the same global batch."""

import pytest

import subprocess
import sys

import torch

from _subproc import env, medsight_cmd
from tests.conftest import make_npz


def _weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=False)


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz", n=(27, 8, 8), shape=(16, 16))
    # 27 = 3 full batches of 8 + a batch of 3 that splits 2/1 over the ranks; augmentation incl. noise is on
    common = ["train", "--data", str(npz), "--model", "simple_cnn", "--epochs", "2", "--batch-size", "8",
              "--seed", "5", "--augment", "--set", "train.threads=1", "--no-progress", "--device", "cpu"]
    single, multi = tmp_path / "single", tmp_path / "ddp"
    r1 = subprocess.run(medsight_cmd(*common, "--out", str(single)), env=env(), capture_output=True, text=True,
                        timeout=120)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                         "--master-port", "29613", "-m", "medsight", *common, "--out", str(multi)],
                        env=env(), capture_output=True, text=True, timeout=180)
    assert r2.returncode == 0, (r2.stdout[-2000:], r2.stderr[-3000:])
    a, b = _weights(single), _weights(multi)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    ha, hb = a["history"], b["history"]
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb] == [1, 2]
    for x, y in zip(ha, hb):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-4
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-4
        assert x.get("val_auc") == y.get("val_auc") or abs(x["val_auc"] - y["val_auc"]) < 1e-6
    assert (multi / "model.pt").is_file() and (multi / "metrics.json").is_file()
