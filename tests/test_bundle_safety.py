"""Bundles that cannot lie or run code: crafted checkpoints and weights are refused, artefacts are hashed, a
failed write leaves the previous bundle as it was, and outputs honour the umask."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest

from medsight.bundle import load_bundle, staging_dir
from medsight.config import load_config
from medsight.errors import MedsightError
from medsight.pipeline import run_training
from tests.conftest import make_npz


class _Exploit:
    """Unpickling this runs ``open(marker, 'w')``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cfg(npz, **extra):
    return load_config(None, {"data.name": str(npz), "data.size": 16, "model.width": 0.25, "train.epochs": 1,
                              "train.n_boot": 0, "train.threads": 1, **extra})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    npz = make_npz(root / "d.npz", n=(48, 16, 16))
    out, _, _ = run_training(_cfg(npz), root / "bundle")
    return npz, out


def test_crafted_checkpoint_runs_no_code_on_resume(trained, tmp_path):
    npz, _ = trained
    out = tmp_path / "run"
    (staging_dir(out) / "checkpoints").mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(staging_dir(out) / "checkpoints" / "last.pt", "wb") as fh:
        pickle.dump({"model": _Exploit(marker)}, fh)
    with pytest.raises(MedsightError, match="unreadable"):
        run_training(_cfg(npz), out, resume=True)
    assert not marker.exists()


def test_crafted_weights_run_no_code(trained, tmp_path):
    import shutil

    _, out = trained
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    marker = tmp_path / "pwned"
    with open(copy / "model.pt", "wb") as fh:
        pickle.dump(_Exploit(marker), fh)
    meta = json.loads((copy / "bundle.json").read_text())
    del meta["files"]  # even without the hash check, weights_only=True refuses to run code
    (copy / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(MedsightError, match="cannot load weights"):
        load_bundle(copy)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "ood.npz", "config.yaml", "history.csv"])
def test_artefacts_are_hashed_and_checked(trained, tmp_path, name):
    import shutil

    npz, out = trained
    meta = json.loads((out / "bundle.json").read_text())
    assert name in meta["files"] and len(meta["files"][name]) == 64
    other_root = tmp_path / "other"
    other, _, _ = run_training(_cfg(npz, **{"train.seed": 3}), other_root) if name in ("model.pt", "ood.npz") \
        else (None, None, None)
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    if other is not None:  # another run's file mixed into this bundle
        shutil.copy(other / name, copy / name)
    else:
        with open(copy / name, "a") as fh:
            fh.write("\n# edited\n")
    with pytest.raises(MedsightError, match=f"{name} does not match the sha256"):
        load_bundle(copy)


def test_disk_full_is_one_line_and_keeps_the_old_bundle(trained, tmp_path, monkeypatch):
    import shutil

    import medsight.pipeline as pipeline

    npz, out = trained
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_history", full)
    with pytest.raises(MedsightError, match="No space left on device") as e:
        run_training(_cfg(npz), copy, overwrite=True)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    load_bundle(copy)


def test_outputs_honour_the_umask(trained, tmp_path):
    npz, _ = trained
    old = os.umask(0o022)
    try:
        out, _, _ = run_training(_cfg(npz), tmp_path / "b")
    finally:
        os.umask(old)
    for name in ("model.pt", "bundle.json", "metrics.json", "ood.npz"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
