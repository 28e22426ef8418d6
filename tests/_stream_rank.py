"""Run by tests/test_streaming.py, alone or under torchrun: train streamed from the dataset cache, record which
train rows this rank's reader processes read, and save the final weights.

    python tests/_stream_rank.py <folder> <out_dir>
"""

import json
import os
import sys
from pathlib import Path

import torch

from medsight.config import load_config
from medsight.data.cache import DiskArray
from medsight.pipeline import load_data_for
from medsight.train import fit

folder, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ.get("RANK", "0"))
log = out / f"rows_rank{rank}.txt"


class Recording(DiskArray):
    def _read(self, file_rows):
        if torch.utils.data.get_worker_info() is not None:  # the epoch's batches (not input stats or validation)
            with open(log, "a") as fh:
                fh.write(" ".join(map(str, file_rows.tolist())) + "\n")
        return super()._read(file_rows)


cfg = load_config(None, {"data.name": folder, "data.size": 16, "data.stream": True, "data.workers": 1,
                         "model.name": "simple_cnn", "train.epochs": 2, "train.batch_size": 8, "train.seed": 3,
                         "train.threads": 1, "augment.enabled": True, "train.device": "cpu"})
data = load_data_for(cfg)
images = data.splits["train"].images
assert isinstance(images, DiskArray)
images.__class__ = Recording
res = fit(cfg, data)
if rank == 0:
    torch.save(res.model.state_dict(), out / "weights.pt")
    (out / "train_rows.json").write_text(json.dumps(images.rows.tolist() if images.rows is not None
                                                    else list(range(len(images)))))
