"""The dataset cache: files decoded once, kept on disk at their storage dtype, read back without decoding.

An *entry* is a folder ``<cache_dir>/<key>/`` holding ``.npy`` arrays and ``meta.json``; ``key`` is the sha256 of
what the arrays depend on, so a changed input makes a new entry and an unchanged one is found again:

- a folder / manifest: every file's path, size and mtime (ns), the preprocessing settings and :data:`VERSION`;
  one array ``images.npy`` ``(N, C, *size)`` in record order, uint8 when every preprocessed image is exactly
  ``k/255`` (8-bit files at their own size: lossless), else uint16 (``round(x * 65535)``: at most 0.5/65535 =
  7.6e-6 from the float preprocessing), plus ``hashes.json`` (per-image sha256, for the leakage check);
- a MedMNIST archive: its official MD5 plus its size and mtime; each member copied out of the zip as it is
  (``<split>_images.npy``, ``<split>_labels.npy``), streamed, so a 224 px release is never whole in memory.

An entry is built in a hidden temporary folder and renamed into place, ``meta.json`` written last with every
array's byte length and a sha256 of its first and last MiB: a missing or truncated array, a damaged header or bad
JSON is found on open (one-line warning, entry rebuilt); a full disk is refused before decoding when the free space
is known to be short, else the half-written folder is removed and one :class:`DataError` line says so.

Arrays are read either whole into memory (data that fits the memory budget) or as a :class:`DiskArray`: rows read
on demand with positioned reads (``os.preadv``), never memory-mapped, so a pass over a 20 GB split keeps only the
rows in hand in the process (the page cache is the kernel's, not the process's RSS).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from medsight.errors import DataError

log = logging.getLogger(__name__)

VERSION = 1
_EDGE = 1 << 20  # bytes hashed at each end of an array for the corruption check
_SLACK = 64 << 20  # free space kept beyond an entry's size


def default_cache_dir() -> Path:
    """``$MEDSIGHT_CACHE_DIR``, else ``$XDG_CACHE_HOME/medsight``, else ``~/.cache/medsight``."""
    env = os.environ.get("MEDSIGHT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medsight"


def resolve_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


# --------------------------------------------------------------------------------------------- memory budget
def memory_budget_bytes(budget_gb: float | None = None) -> int:
    """Bytes of decoded data one process may hold in memory: ``budget_gb``, else a quarter of the machine's RAM
    divided by the processes on this node (``LOCAL_WORLD_SIZE`` under torchrun)."""
    if budget_gb is not None:
        return int(budget_gb * 1e9)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return int(ram * 0.25 / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def choose_stream(nbytes: int, stream: str | bool = "auto", budget_gb: float | None = None) -> bool:
    """Stream (read batches from disk) or hold in memory: ``stream`` 'true'/'false' forces it, 'auto' streams
    when the stored arrays (``nbytes``) exceed the memory budget, and always under torchrun with several
    processes, where each rank then reads only its share of every batch instead of holding the whole split."""
    s = str(stream).lower()
    if s in ("true", "1", "yes", "on"):
        return True
    if s in ("false", "0", "no", "off"):
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    return nbytes > memory_budget_bytes(budget_gb)


# --------------------------------------------------------------------------------------------- reading
def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran or dtype.hasobject:
            raise ValueError("not a C-ordered plain array")
        return tuple(int(s) for s in shape), dtype, f.tell()


class DiskArray:
    """Rows of a ``.npy`` file, read on demand: ``a[i]``, ``a[i:j]``, ``a[[i, j]]`` return in-memory numpy arrays.

    ``rows`` selects (and orders) rows of the file; ``layout``: ``'first'`` (file is ``(N, C, *S)``), ``'none'``
    (file is ``(N, *S)``: a channel axis of 1 is added) or ``'last'`` (file is ``(N, *S, C)``: moved to axis 1).
    ``np.asarray(a)`` reads everything (what a caller that needs the whole array gets)."""

    def __init__(self, path: str | os.PathLike, rows: np.ndarray | None = None, layout: str = "first"):
        self.path = Path(path)
        shape, self.dtype, self._offset = _npy_header(self.path)
        self._file_rows = shape[0]
        self._row_shape = shape[1:]
        self._row_bytes = int(self.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64)))
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.layout = layout
        self._fd: int | None = None
        self._pid = -1

    # shape as the rest of medsight sees it: (N, C, *spatial)
    @property
    def shape(self) -> tuple[int, ...]:
        s = self._row_shape
        if self.layout == "none":
            s = (1, *s)
        elif self.layout == "last":
            s = (s[-1], *s[:-1])
        return (len(self), *s)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return len(self) * self._row_bytes

    def __len__(self) -> int:
        return self._file_rows if self.rows is None else len(self.rows)

    def __repr__(self) -> str:
        return f"DiskArray({self.path.name}, shape={self.shape}, dtype={self.dtype})"

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_fd"], d["_pid"] = None, -1
        return d

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def _file_rows_of(self, idx: np.ndarray) -> np.ndarray:
        return idx if self.rows is None else self.rows[idx]

    def take(self, idx) -> "DiskArray":
        """A DiskArray over the selected rows (no data read)."""
        out = DiskArray.__new__(DiskArray)
        out.__dict__.update(self.__getstate__())
        out.rows = self._file_rows_of(np.arange(len(self))[np.asarray(idx)] if not isinstance(idx, slice)
                                      else np.arange(len(self))[idx])
        return out

    def __getitem__(self, key):
        if isinstance(key, tuple):
            head, rest = key[0], key[1:]
            return self[head][(slice(None),) + rest] if not np.isscalar(head) else self[head][rest]
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if int(key) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {key} out of range for {n} rows")
            return self._read(self._file_rows_of(np.array([i])))[0]
        if isinstance(key, slice):
            return self._read(self._file_rows_of(np.arange(n)[key]))
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for {n} rows")
        return self._read(self._file_rows_of(idx))

    def __iter__(self):
        for i in range(0, len(self), 256):
            yield from self[i:i + 256]

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)

    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def _read(self, file_rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(file_rows), *self._row_shape), dtype=self.dtype)
        if len(file_rows):
            fd, rb = self._handle(), self._row_bytes
            buf = memoryview(out.reshape(-1).view(np.uint8))
            # consecutive file rows are read with one call
            breaks = np.flatnonzero(np.diff(file_rows) != 1) + 1
            starts = np.concatenate([[0], breaks])
            ends = np.concatenate([breaks, [len(file_rows)]])
            for a, b in zip(starts.tolist(), ends.tolist()):
                pos, want, done = self._offset + int(file_rows[a]) * rb, (b - a) * rb, 0
                while done < want:
                    got = os.preadv(fd, [buf[a * rb + done:b * rb]], pos + done)
                    if got <= 0:
                        raise DataError(f"dataset cache file {self.path} is shorter than its header says "
                                        "(clear it with `medsight cache clear`)")
                    done += got
        if self.layout == "none":
            return out[:, None]
        if self.layout == "last":
            return np.ascontiguousarray(np.moveaxis(out, -1, 1))
        return out


def load_array(path: Path, *, stream: bool, rows: np.ndarray | None = None, layout: str = "first"):
    """An entry's array as a :class:`DiskArray` (``stream``) or read into memory (rows selected, layout applied)."""
    if stream:
        return DiskArray(path, rows, layout)
    a = np.load(path, mmap_mode="r", allow_pickle=False)
    a = np.array(a if rows is None else a[np.asarray(rows, dtype=np.int64)])  # copies just the rows wanted
    if layout == "none":
        return a[:, None]
    if layout == "last":
        return np.ascontiguousarray(np.moveaxis(a, -1, 1))
    return a


# --------------------------------------------------------------------------------------------- entries
def _edge_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(_EDGE, size - _EDGE))
            h.update(f.read(_EDGE))
    return h.hexdigest()


def _array_facts(path: Path) -> dict:
    shape, dtype, offset = _npy_header(path)
    return {"bytes": path.stat().st_size, "shape": list(shape), "dtype": dtype.str, "offset": offset,
            "edges": _edge_digest(path)}


def check_entry(entry: Path) -> dict:
    """``meta.json`` of an intact entry; raises ``ValueError`` naming what is wrong otherwise."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError("meta.json is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"meta.json is unreadable ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("version") != VERSION or not isinstance(meta.get("arrays"), dict):
        raise ValueError(f"meta.json is not a version-{VERSION} cache entry")
    if meta.get("key") != entry.name:
        raise ValueError("meta.json belongs to another entry")
    for name, facts in meta["arrays"].items():
        p = entry / name
        if not p.is_file():
            raise ValueError(f"{name} is missing")
        if p.stat().st_size != facts.get("bytes"):
            raise ValueError(f"{name} has {p.stat().st_size} bytes, expected {facts.get('bytes')} (truncated?)")
        try:
            shape, dtype, offset = _npy_header(p)
        except (OSError, ValueError) as e:
            raise ValueError(f"{name} has a damaged header ({e})") from None
        if list(shape) != facts.get("shape") or dtype.str != facts.get("dtype") or offset != facts.get("offset"):
            raise ValueError(f"{name} header does not match meta.json")
        if _edge_digest(p) != facts.get("edges"):
            raise ValueError(f"{name} content does not match its checksum")
    for name, size in (meta.get("files") or {}).items():
        p = entry / name
        if not p.is_file() or p.stat().st_size != size:
            raise ValueError(f"{name} is missing or has the wrong size")
    return meta


def open_entry(cache_dir: Path, key: str) -> dict | None:
    """The intact entry ``key`` (its meta, with ``path``), or ``None``; a corrupt one is removed with a one-line
    warning so that it is rebuilt."""
    entry = cache_dir / key
    if not entry.is_dir():
        return None
    try:
        meta = check_entry(entry)
    except ValueError as e:
        log.warning("dataset cache entry %s is corrupt (%s); rebuilding it", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    meta["path"] = str(entry)
    return meta


@contextlib.contextmanager
def _building(cache_dir: Path, key: str):
    """One builder per entry: other processes wanting the same entry wait here, then find it built."""
    from medsight.utils import private_dir, private_open

    try:
        private_dir(cache_dir)  # decoded patient images: 0700 folders, 0600 files
        fh = private_open(cache_dir / f".lock-{key[:16]}", "a+")
    except OSError as e:
        raise DataError(f"cannot create the dataset cache in {cache_dir}: {e.strerror or e} "
                        "(set data.cache_dir to a writable folder)") from e
    with fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass  # no locking here: two processes may build the same entry, the first rename wins
        yield


def _new_tmp(cache_dir: Path, key: str) -> Path:
    from medsight.utils import private_dir

    try:
        private_dir(cache_dir)
        tmp = cache_dir / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(mode=0o700)
        os.chmod(tmp, 0o700)  # mkdir's mode is narrowed by the umask, never widened: set it
    except OSError as e:
        raise DataError(f"cannot create the dataset cache in {cache_dir}: {e.strerror or e} "
                        "(set data.cache_dir to a writable folder)") from e
    return tmp


def _check_space(cache_dir: Path, need: int) -> None:
    try:
        free = shutil.disk_usage(cache_dir).free
    except OSError:
        return
    if free < need + _SLACK:
        raise DataError(f"not enough disk space for the dataset cache in {cache_dir}: it needs about "
                        f"{(need + _SLACK) / 1e9:.2f} GB, {free / 1e9:.2f} GB are free (free space, or set "
                        "data.cache_dir to a larger disk)")


def _publish(tmp: Path, cache_dir: Path, key: str, meta: dict) -> dict:
    """Write meta.json (with every array's facts) last, fsync, and rename the folder into place."""
    meta = {**meta, "version": VERSION, "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "arrays": {p.name: _array_facts(p) for p in sorted(tmp.glob("*.npy"))},
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.suffix != ".npy"}}
    from medsight.utils import atomic_write_text

    atomic_write_text(tmp / "meta.json", json.dumps(meta), private=True)
    dest = cache_dir / key
    try:
        os.rename(tmp, dest)
    except OSError:
        if (dest / "meta.json").is_file():  # another process published the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise
    meta["path"] = str(dest)
    return meta


def _disk_error(cache_dir: Path, e: OSError) -> DataError:
    why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
    return DataError(f"cannot write the dataset cache in {cache_dir}: {why}; nothing was kept (free space, or set "
                     "data.cache_dir to another disk)")


# --------------------------------------------------------------------------------------------- folders
def folder_key(records: Sequence[dict], settings: dict) -> str:
    """sha256 of every file's path, size and mtime (ns), the preprocessing ``settings`` and :data:`VERSION`."""
    h = hashlib.sha256(json.dumps({"version": VERSION, "kind": "files", "settings": settings},
                                  sort_keys=True, default=str).encode())
    for rec in records:
        p = Path(rec["path"])
        try:
            st = p.stat()
            if p.is_dir():  # a DICOM series folder: its files' facts
                parts = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())
                facts = f"{st.st_mtime_ns}:{parts}"
            else:
                facts = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            facts = "missing"
        h.update(f"{p}\0{facts}\n".encode())
    return h.hexdigest()


def quantise(a: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """``a`` (float in [0, 1]) at the storage dtype; ``None`` when uint8 is asked for and would not be exact."""
    if np.dtype(dtype) == np.uint8:
        q = np.rint(a * np.float32(255)).astype(np.uint8)
        return q if np.array_equal(q.astype(np.float32) / np.float32(255), a) else None
    return np.rint(a.astype(np.float64) * 65535).astype(np.uint16)


class _Widen(Exception):
    """A later image needs more channels or a finer dtype than the layout chosen from the first one."""


def _decode_chunk(args):
    decode, start, paths = args
    out = []
    for p in paths:
        try:
            arr, meta = decode(p)
            out.append((arr, {"shape": meta.get("shape"), "channels": int(arr.shape[0])}, None))
        except DataError as e:
            out.append((None, None, {"path": str(p), "error": str(e)}))
    return start, out


def _chunks(paths: list[str], decode, size: int) -> Iterable:
    for s in range(0, len(paths), size):
        yield decode, s, paths[s:s + size]


def build_folder_entry(records: Sequence[dict], *, decode: Callable, settings: dict, cache_dir: Path,
                       workers: int = 0, channels: int | None = None) -> dict:
    """Decode every record once (``decode(path) -> (float32 (C, *size) in [0, 1], meta)``: the reader and the
    recipe) into an entry; returns its meta (``path``, ``dtype``, ``channels``, per-record ``shapes``,
    ``errors``). A cache hit decodes nothing. ``workers`` > 0 decodes in that many processes."""
    key = folder_key(records, settings)
    found = open_entry(cache_dir, key)
    if found is not None:
        return found
    with _building(cache_dir, key):
        found = open_entry(cache_dir, key)  # built meanwhile by another process (e.g. another torchrun rank)
        if found is not None:
            return found
        paths = [str(r["path"]) for r in records]
        c, dtype = channels or 1, np.uint8
        for p in paths[:16]:  # the layout guess: channels and dtype of the first readable image
            try:
                arr0, _ = decode(p)
            except DataError:
                continue
            c = channels or (3 if arr0.shape[0] == 3 else 1)
            dtype = np.uint8 if quantise(arr0, np.uint8) is not None else np.uint16
            break
        while True:
            try:
                return _build_folder(paths, decode, key, cache_dir, workers, c, dtype, settings, fixed=channels)
            except _Widen as w:
                c, dtype = w.args


def _build_folder(paths, decode, key, cache_dir, workers, c, dtype, settings, fixed):
    from medsight import progress
    from medsight.data.preprocess import convert_channels
    from medsight.data.splits import image_hash

    size = settings["size"]
    n = len(paths)
    row_bytes = int(np.dtype(dtype).itemsize * c * int(np.prod(size)))
    tmp = _new_tmp(cache_dir, key)  # creates cache_dir
    try:
        _check_space(cache_dir, n * row_bytes)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pool = None
    try:
        target = tmp / "images.npy"
        from medsight.utils import private_open

        private_open(target, "wb").close()  # created 0600 before any row is written
        m = np.lib.format.open_memmap(target, mode="w+", dtype=dtype, shape=(n, c, *size))  # header + sparse rows
        del m
        _, _, offset = _npy_header(target)
        shapes: list = [None] * n
        hashes: list = [None] * n
        errors: list[dict] = []
        jobs = _chunks(paths, decode, 32)
        if workers > 0:
            import multiprocessing as mp

            pool = mp.get_context("fork").Pool(workers)
            results = pool.imap(_decode_chunk, jobs)
        else:
            results = map(_decode_chunk, jobs)
        fd = os.open(target, os.O_WRONLY)
        try:
            with progress.task("decoding images into the dataset cache", total=n) as bar:
                for start, items in results:
                    for j, (arr, meta, err) in enumerate(items):
                        i = start + j
                        if err is not None:
                            errors.append(err)
                            continue
                        if arr.shape[0] == 3 and c == 1 and fixed is None:
                            raise _Widen(3, dtype)
                        arr = convert_channels(arr, c, paths[i])
                        q = quantise(arr, dtype)
                        if q is None:
                            raise _Widen(c, np.uint16)
                        q = np.ascontiguousarray(q)
                        os.pwrite(fd, q.tobytes(), offset + i * row_bytes)
                        shapes[i] = meta["shape"]
                        hashes[i] = image_hash(q)
                    bar.advance(len(items))
            os.fsync(fd)
        finally:
            os.close(fd)
        from medsight.utils import atomic_write_text

        atomic_write_text(tmp / "hashes.json", json.dumps(hashes), private=True)
        meta = {"kind": "files", "n": n, "dtype": np.dtype(dtype).str, "channels": c, "settings": settings,
                "shapes": shapes, "errors": errors, "source": os.path.commonpath(paths) if paths else ""}
        return _publish(tmp, cache_dir, key, meta)
    except OSError as e:
        raise _disk_error(cache_dir, e) from e
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- MedMNIST archives
def archive_key(path: Path, md5: str) -> str:
    st = path.stat()
    return hashlib.sha256(json.dumps({"version": VERSION, "kind": "npz", "md5": md5, "name": path.name,
                                      "size": st.st_size, "mtime_ns": st.st_mtime_ns}).encode()).hexdigest()


def find_archive_entry(path: Path, md5: str, cache_dir: Path) -> dict | None:
    """The entry of an archive already extracted (same MD5, size and mtime), without re-hashing the archive."""
    return open_entry(cache_dir, archive_key(path, md5)) if path.is_file() else None


def extract_archive(path: Path, md5: str, cache_dir: Path, keys: Sequence[str]) -> dict:
    """Copy each ``keys`` member of an ``.npz`` (``<key>.npy``) into an entry, streamed; returns its meta."""
    key = archive_key(path, md5)
    found = open_entry(cache_dir, key)
    if found is not None:
        return found
    with _building(cache_dir, key):
        found = open_entry(cache_dir, key)
        return found if found is not None else _extract(path, md5, cache_dir, keys, key)


def _extract(path: Path, md5: str, cache_dir: Path, keys: Sequence[str], key: str) -> dict:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path}: not a valid .npz archive ({type(e).__name__}: {e})") from e
    with zf:
        infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        missing = [k for k in keys if k not in infos]
        if missing:
            raise DataError(f"{path} lacks keys {', '.join(missing)}")
        tmp = _new_tmp(cache_dir, key)
        from medsight.utils import private_open

        try:
            _check_space(cache_dir, sum(infos[k].file_size for k in keys))
            for k in keys:
                with zf.open(infos[k]) as src, private_open(tmp / f"{k}.npy", "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                    dst.flush()
                    os.fsync(dst.fileno())
                try:
                    _npy_header(tmp / f"{k}.npy")
                except ValueError as e:
                    raise DataError(f"{path}: member {k} is not a plain array ({e})") from e
            return _publish(tmp, cache_dir, key, {"kind": "npz", "source": str(path), "md5": md5})
        except OSError as e:
            raise _disk_error(cache_dir, e) from e
        except (zipfile.BadZipFile, EOFError) as e:
            raise DataError(f"cannot read {path}: not a valid .npz archive ({type(e).__name__}: {e})") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------- ls / clear
def list_entries(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per entry: key, kind, source, images, bytes, created, ok (and why not)."""
    d = resolve_dir(cache_dir)
    rows = []
    if not d.is_dir():
        return rows
    for e in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
        size = sum(f.stat().st_size for f in e.iterdir() if f.is_file())
        try:
            m = check_entry(e)
            rows.append({"key": e.name, "kind": m.get("kind"), "source": m.get("source"), "n": m.get("n"),
                         "bytes": size, "created": m.get("created"), "ok": True, "problem": None})
        except ValueError as err:
            rows.append({"key": e.name, "kind": None, "source": None, "n": None, "bytes": size, "created": None,
                         "ok": False, "problem": str(err)})
    return rows


def clear(cache_dir: str | os.PathLike | None = None, key: str | None = None) -> tuple[int, int]:
    """Remove every entry (or those whose key starts with ``key``) and left-over temporary folders;
    returns (entries removed, bytes freed)."""
    d = resolve_dir(cache_dir)
    if not d.is_dir():
        return 0, 0
    n = freed = 0
    for e in list(d.iterdir()):
        if not e.is_dir():
            if e.name.startswith(".lock-") and key is None:
                e.unlink(missing_ok=True)
            continue
        tmp = e.name.startswith(".tmp-")
        if key is not None and (tmp or not e.name.startswith(key)):
            continue
        if tmp and not _stale_tmp(e):
            continue  # another process is building it now
        freed += sum(f.stat().st_size for f in e.rglob("*") if f.is_file())
        shutil.rmtree(e, ignore_errors=True)
        n += not tmp
    return n, freed


def _stale_tmp(p: Path) -> bool:
    try:
        pid = int(p.name.split("-")[2])
        os.kill(pid, 0)
        return False
    except (ValueError, IndexError, ProcessLookupError):
        return True
    except PermissionError:
        return False
