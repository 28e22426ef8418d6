"""The dataset cache: decode once, find again by files + recipe, detect corruption, refuse a full disk in one line,
MedMNIST archives extracted once; DiskArray reads rows like numpy indexing; `medsight cache ls|clear`."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsight.data import cache, folders
from medsight.data.sources import load_dataset, load_medmnist
from medsight.errors import DataError


def _tree(root: Path, n: int = 8, side: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for s in ("train", "val", "test"):
        for c in ("benign", "malignant"):
            (root / s / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(root / s / c / f"{i}.png")
    return root


@pytest.fixture
def counting(monkeypatch):
    """Count the reader's calls (folders decode with read_image; workers=0 for small folders: in this process)."""
    calls = []
    real = folders.read_image

    def read(path, **kw):
        calls.append(str(path))
        return real(path, **kw)

    monkeypatch.setattr(folders, "read_image", read)
    return calls


def _entries(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_second_load_decodes_nothing_and_gives_the_same_arrays(tmp_path, counting):
    root, cdir = _tree(tmp_path / "tree"), tmp_path / "cache"
    a = load_dataset(str(root), size=20, cache_dir=cdir)
    assert len(counting) >= 48  # every file decoded once (plus the probes)
    counting.clear()
    b = load_dataset(str(root), size=20, cache_dir=cdir)
    assert counting == []  # a cache hit: no file decoded, not even the 2D/3D probe
    for s in ("train", "val", "test"):
        np.testing.assert_array_equal(a.splits[s].images, b.splits[s].images)
        assert a.splits[s].ids == b.splits[s].ids
    # 8-bit PNGs at their own size are stored as uint8, exactly the files' pixels
    first = sorted(root.glob("train/benign/*.png"))[0]
    i = b.splits["train"].ids.index(str(first.relative_to(root)))
    assert b.splits["train"].images.dtype == np.uint8
    np.testing.assert_array_equal(b.splits["train"].images[i, 0], np.asarray(Image.open(first)))
    assert len(_entries(cdir)) == 1


def test_resized_images_are_uint16_within_half_a_step(tmp_path):
    root = _tree(tmp_path / "tree", n=3, side=21)
    ds = load_dataset(str(root), size=16, cache_dir=tmp_path / "cache")
    assert ds.splits["train"].images.dtype == np.uint16
    f = sorted(root.glob("train/benign/*.png"))[0]
    x = folders.decode_record(f, size=[16, 16], window=None, intensity="auto", percentiles=(0.5, 99.5))[0]
    i = ds.splits["train"].ids.index(str(f.relative_to(root)))
    err = np.abs(ds.splits["train"].images[i].astype(np.float64) / 65535 - x).max()
    assert 0 < err <= 0.5 / 65535 + 1e-9


def test_key_changes_with_a_file_mtime_or_the_recipe(tmp_path, counting):
    root, cdir = _tree(tmp_path / "tree"), tmp_path / "cache"
    load_dataset(str(root), size=20, cache_dir=cdir)
    f = next(root.glob("val/malignant/*.png"))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    counting.clear()
    load_dataset(str(root), size=20, cache_dir=cdir)
    assert len(counting) >= 48 and len(_entries(cdir)) == 2  # stale: a new entry, decoded again
    counting.clear()
    load_dataset(str(root), size=12, cache_dir=cdir)  # another recipe
    assert len(counting) >= 48 and len(_entries(cdir)) == 3
    counting.clear()
    load_dataset(str(root), size=12, cache_dir=cdir)
    assert counting == []


@pytest.mark.parametrize("damage", ["truncate", "meta", "missing", "flip_tail", "hashes"])
def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, counting, caplog, damage):
    root, cdir = _tree(tmp_path / "tree"), tmp_path / "cache"
    a = load_dataset(str(root), size=20, cache_dir=cdir)
    (entry,) = _entries(cdir)
    img = entry / "images.npy"
    if damage == "truncate":
        with open(img, "r+b") as fh:
            fh.truncate(img.stat().st_size - 100)
    elif damage == "meta":
        (entry / "meta.json").write_text("{not json")
    elif damage == "missing":
        img.unlink()
    elif damage == "flip_tail":
        with open(img, "r+b") as fh:
            fh.seek(-1, os.SEEK_END)
            b = fh.read(1)
            fh.seek(-1, os.SEEK_END)
            fh.write(bytes([b[0] ^ 0xFF]))
    else:
        (entry / "hashes.json").write_text("[]")
    counting.clear()
    with caplog.at_level(logging.WARNING, logger="medsight.data.cache"):
        b = load_dataset(str(root), size=20, cache_dir=cdir)
    warnings = [r.getMessage() for r in caplog.records if r.name == "medsight.data.cache"]
    assert len(warnings) == 1 and "corrupt" in warnings[0] and "rebuilding" in warnings[0], warnings
    assert "\n" not in warnings[0]
    assert len(counting) >= 48  # rebuilt from the files
    for s in a.splits:
        np.testing.assert_array_equal(a.splits[s].images, b.splits[s].images)
    assert cache.check_entry(entry)["n"] == 48


def test_full_disk_is_one_line_and_leaves_no_half_entry(tmp_path, monkeypatch):
    root, cdir = _tree(tmp_path / "tree"), tmp_path / "cache"

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.os, "pwrite", full)
    with pytest.raises(DataError) as e:
        load_dataset(str(root), size=20, cache_dir=cdir)
    msg = str(e.value)
    assert "\n" not in msg and "the disk is full" in msg and str(cdir) in msg and "nothing was kept" in msg
    assert [p for p in cdir.iterdir() if p.is_dir()] == []  # no entry, no temporary folder


def test_known_short_disk_is_refused_before_decoding(tmp_path, monkeypatch, counting):
    root, cdir = _tree(tmp_path / "tree"), tmp_path / "cache"
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(DataError, match=r"not enough disk space for the dataset cache .* 0\.00 GB are free"):
        load_dataset(str(root), size=20, cache_dir=cdir)
    assert len(counting) <= 2  # the probes only: the folder was not decoded
    assert [p for p in cdir.iterdir() if p.is_dir()] == []


def test_unreadable_file_error_is_kept_and_repeated_without_decoding(tmp_path, counting):
    root, cdir = _tree(tmp_path / "tree"), tmp_path / "cache"
    (root / "train" / "benign" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"1 of 49 files could not be loaded: .*bad\.png"):
        load_dataset(str(root), size=20, cache_dir=cdir)
    counting.clear()
    with pytest.raises(DataError, match=r"1 of 49 files could not be loaded: .*bad\.png"):
        load_dataset(str(root), size=20, cache_dir=cdir)
    assert counting == []


def test_medmnist_archive_extracted_once_then_memory_or_disk(tmp_path, medmnist_dir, monkeypatch):
    from medsight.data import sources

    cdir = tmp_path / "cache"
    a = load_medmnist("breastmnist", 28, root=medmnist_dir, download_missing=False, cache_dir=cdir)
    assert isinstance(a.splits["train"].images, np.ndarray)
    (entry,) = _entries(cdir)
    assert {p.name for p in entry.glob("*.npy")} == {f"{s}_{k}.npy" for s in ("train", "val", "test")
                                                     for k in ("images", "labels")}
    # the same archive again: neither re-hashed (MD5) nor decompressed
    monkeypatch.setattr(sources, "md5sum", lambda p: pytest.fail("archive hashed again"))
    monkeypatch.setattr(sources, "read_npz", lambda p: pytest.fail("archive read again"))
    b = load_medmnist("breastmnist", 28, root=medmnist_dir, download_missing=False, cache_dir=cdir, stream=True)
    tr = b.splits["train"].images
    assert isinstance(tr, cache.DiskArray) and tr.shape == a.splits["train"].images.shape
    np.testing.assert_array_equal(tr[:], a.splits["train"].images)
    np.testing.assert_array_equal(b.splits["train"].labels, a.splits["train"].labels)
    assert b.classes == a.classes and b.in_channels == 1 and b.input_size == (28, 28)


def test_disk_array_indexes_like_numpy(tmp_path):
    ref = np.arange(7 * 2 * 3 * 4, dtype=np.uint16).reshape(7, 2, 3, 4)
    np.save(tmp_path / "a.npy", ref)
    d = cache.DiskArray(tmp_path / "a.npy")
    assert d.shape == ref.shape and d.dtype == ref.dtype and len(d) == 7 and d.ndim == 4
    for key in (3, -1, slice(1, 5), slice(None, None, 2), [4, 0, 4, 6], np.array([True, False] * 3 + [True]),
                (slice(2, 4), 1)):
        np.testing.assert_array_equal(d[key], ref[key])
    sub = d.take([6, 2, 3])
    np.testing.assert_array_equal(sub[:], ref[[6, 2, 3]])
    np.testing.assert_array_equal(sub[1:], ref[[2, 3]])
    np.testing.assert_array_equal(np.asarray(d), ref)
    with pytest.raises(IndexError):
        d[7]
    # file layouts (N, *S) and (N, *S, C) read as (N, C, *S)
    np.save(tmp_path / "g.npy", ref[:, 0])
    np.save(tmp_path / "rgb.npy", np.moveaxis(ref[:, :, :3, :3], 1, -1).copy())
    g = cache.DiskArray(tmp_path / "g.npy", layout="none")
    np.testing.assert_array_equal(g[[1, 2]], ref[[1, 2], :1])
    rgb = cache.DiskArray(tmp_path / "rgb.npy", layout="last")
    assert rgb.shape == (7, 2, 3, 3)
    np.testing.assert_array_equal(rgb[2:4], ref[2:4, :, :3, :3])


def test_choose_stream_follows_the_budget(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cache.choose_stream(2_000_000_000, "auto", 1.0) is True
    assert cache.choose_stream(500_000_000, "auto", 1.0) is False
    assert cache.choose_stream(10, True, 1.0) is True and cache.choose_stream(10, "true") is True
    assert cache.choose_stream(10**15, False) is False
    # under torchrun with several processes each rank streams its own share instead of holding the whole split
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cache.choose_stream(10, "auto", 1.0) is True and cache.choose_stream(10, False) is False


def test_cache_ls_and_clear(tmp_path, capsys):
    from medsight.cli import main

    root, cdir = _tree(tmp_path / "tree", n=2), tmp_path / "cache"
    load_dataset(str(root), size=20, cache_dir=cdir)
    load_dataset(str(root), size=10, cache_dir=cdir)
    bad = _entries(cdir)[0]
    (bad / "meta.json").write_text("{")
    capsys.readouterr()
    assert main(["cache", "ls", "--dir", str(cdir)]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "corrupt" in out and "files" in out
    assert main(["cache", "clear", "--dir", str(cdir)]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert _entries(cdir) == []
    rows = json.loads(json.dumps(cache.list_entries(cdir)))
    assert rows == []
