"""Files that may hold patient data are created 0600 (folders 0700) whatever the umask, and the umask is never
changed (no process-wide race)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from medsight import utils


@pytest.fixture
def open_umask():
    old = os.umask(0)  # the most permissive umask: only explicit modes keep files private
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_private_helpers(open_umask, tmp_path):
    d = utils.private_dir(tmp_path / "a" / "b")
    assert _mode(d) == 0o700
    with utils.private_open(d / "x.csv", "w") as fh:
        fh.write("id\n")
    assert _mode(d / "x.csv") == 0o600
    assert _mode(utils.atomic_write_bytes(d / "y.bin", b"1", private=True)) == 0o600
    assert _mode(utils.atomic_write_text(d / "z.txt", "1")) == 0o666  # not private: the umask (0 here) decides
    assert _mode(utils.write_json(d / "r.json", {"a": 1}, private=True)) == 0o600


def test_the_umask_is_never_touched(tmp_path):
    """utils no longer reads the umask by setting it; concurrent writers cannot widen another thread's files."""
    assert "os.umask(" not in Path(utils.__file__).read_text()
    seen = []

    def other_thread():
        for k in range(200):
            p = tmp_path / f"o{k}"
            with open(p, "w"):
                pass
            seen.append(_mode(p))

    t = threading.Thread(target=other_thread)
    t.start()
    for k in range(200):
        utils.atomic_write_bytes(tmp_path / f"m{k}", b"x", private=True)
    t.join()
    umask = os.umask(0o022)
    os.umask(umask)
    assert set(seen) == {0o666 & ~umask}


def test_predictions_and_cache_folders_are_private(open_umask, tmp_path):
    from medsight.data import cache
    from medsight.predict import write_predictions

    out = tmp_path / "preds.csv"
    write_predictions([], out, ["a", "b"])
    assert _mode(out) == 0o600
    root = tmp_path / "cache"
    tmp = cache._new_tmp(root, "k" * 32)
    assert _mode(root) == 0o700 and _mode(tmp) == 0o700
    with cache._building(root, "k" * 32):
        pass
    assert _mode(root / f".lock-{'k' * 16}") == 0o600


def test_a_built_dataset_cache_is_private(open_umask, tmp_path):
    """Decoded patient images in the cache: every folder 0700, every file 0600, with umask 0."""
    from tests.data.test_cache import _tree

    from medsight.data.sources import load_dataset

    root = _tree(tmp_path / "data", n=3, side=12)
    cdir = tmp_path / "cache"
    load_dataset(str(root), size=12, cache_dir=cdir)
    found = list(cdir.rglob("*"))
    assert any(p.name == "images.npy" for p in found)
    for p in [cdir, *found]:
        assert _mode(p) == (0o700 if p.is_dir() else 0o600), (p, oct(_mode(p)))
