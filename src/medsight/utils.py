"""Small shared helpers: atomic writes, private files and folders (0600 / 0700), seeding, devices, JSON that survives
NaN."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: deid, qc and the readers' tools never load it
    import torch


#: Modes of what may hold patient data: files 0600, folders 0700, whatever the process umask.
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def private_dir(path: str | Path) -> Path:
    """Create ``path`` and its missing parents, each 0700, and make ``path`` itself 0700; the umask is neither read
    nor changed (an existing folder that is ours is tightened; one we do not own is left as it is)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:  # made by another process meanwhile
            pass
        else:
            os.chmod(d, PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask
    try:
        if path.stat().st_uid == os.getuid():
            os.chmod(path, PRIVATE_DIR_MODE)
    except OSError:
        pass
    return path


def private_open(path: str | Path, mode: str = "w", **kw: Any):
    """``open(path, mode)`` for a file that may hold patient data: created 0600 (``os.open`` with that mode, then
    ``fchmod``, so neither the umask nor a race with other threads widens it). Modes: ``w``, ``a``, ``x``,
    ``a+`` (text or binary, as ``open``)."""
    base = mode.replace("b", "").replace("t", "")
    flags = {"w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
             "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL, "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND,
             "w+": os.O_RDWR | os.O_CREAT | os.O_TRUNC}.get(base)
    if flags is None:
        raise ValueError(f"private_open: unsupported mode {mode!r}")
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, mode, **kw)
    except BaseException:
        os.close(fd)
        raise


def _temp_beside(path: Path, perm: int) -> tuple[int, str]:
    """A new temporary file in ``path``'s folder, created with ``perm`` (the kernel applies the umask to it)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), perm), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def atomic_write_bytes(path: str | Path, data: bytes, *, private: bool = False) -> Path:
    """Write via a temp file in the same folder + fsync + rename: a crash leaves the old file or the new one.
    The file gets the permissions a plain ``open()`` would give it (0666 less the umask, applied by the kernel at
    creation), or 0600 with ``private`` (files that may hold patient data)."""
    path = Path(path)
    if private:
        private_dir(path.parent)  # missing folders of a private file are 0700 too
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path, PRIVATE_FILE_MODE if private else 0o666)
    try:
        if private:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_private(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary 0600 file beside ``path`` (same suffix) for a writer that wants a path (csv, pyarrow); fsynced
    and renamed onto ``path`` when the block ends without an error, removed otherwise."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.partial{suffix or path.suffix}"  # the writer may read
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE_MODE)
    os.fchmod(fd, PRIVATE_FILE_MODE)  # the format from the suffix
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str, *, private: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), private=private)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def json_safe(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays and tuples to plain JSON types; NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def write_json(path: str | Path, obj: Any, *, private: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2) + "\n", private=private)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch

    torch.manual_seed(seed)


def pick_device(name: str | None = None) -> torch.device:
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
