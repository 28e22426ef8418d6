"""What every reader shares: the :class:`Reader` interface, the one-line failure, the decoder-fault container,
capped inflation and the result contract (float32, channel-first, finite, non-empty)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medsight.errors import DataError

Source = "Path | bytes"


class Reader:
    """One file format. Subclass, then ``register_reader(MyReader())`` (``medsight.data.readers``).

    name      the format's name (``meta["format"]`` unless ``read`` says otherwise)
    suffixes  name suffixes its files usually carry (lower case, with the dot): folder walks pick such files up
              without opening them, and :meth:`guess` uses them as a tie-break
    sniff     "is this mine?" from the CONTENT: the first bytes (a few KiB; at least 600 when the source is that
              long). Return a format name (this reader's ``name`` or a variant such as ``'nifti-gz'``) or None.
              Only a signature the format defines (magic bytes) belongs here.
    guess     weak evidence, asked only when no reader's ``sniff`` claimed the content: a short or missing
              signature, or the name. Default: the name ends with one of ``suffixes``.
    read      decode ``source`` (a :class:`~pathlib.Path` to a file, or the bytes of an upload) within
              ``budget`` (checked from the headers BEFORE anything is inflated or decoded) into
              ``(float32 array (C, H, W) | (C, D, H, W), meta)``; every failure a :class:`DataError` naming
              ``name`` on one line (:func:`fail`). ``window`` is None, ``'dicom'`` or ``(center, width)``.
    """

    name: str = ""
    label: str = ""  # how messages name the format(s) (default: name in capitals)
    suffixes: tuple[str, ...] = ()

    def sniff(self, head: bytes) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def guess(self, head: bytes, name: str) -> str | None:
        return self.name if self.suffixes and str(name).lower().endswith(self.suffixes) else None

    def read(self, source: Path | bytes, name: object, fmt: str, *, window: Any, budget: Any) -> tuple[np.ndarray, dict]:
        raise NotImplementedError  # pragma: no cover - interface


def one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def fail(name: object, reason: object, cause: BaseException | None = None) -> DataError:
    """The reader's refusal: ``cannot read <name>: <reason>`` on one line."""
    err = DataError(f"cannot read {name}: {one_line(reason)}")
    if cause is not None:
        err.__cause__ = cause
    return err


class Contained:
    """Turn whatever a decoder raises (incl. BaseException subclasses such as pyo3's PanicException,
    never KeyboardInterrupt / SystemExit) into one DataError naming the file."""

    def __init__(self, name: object, stage: str):
        self.name, self.stage = name, stage

    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        if e is None or isinstance(e, (DataError, KeyboardInterrupt, SystemExit, GeneratorExit)):
            return False
        raise fail(self.name, f"{self.stage} ({type(e).__name__}: {e})", e) from e


def inflate(d, data: bytes, limit: int, out: bytearray | None = None) -> tuple[bytearray, bytes]:
    """Feed ``data`` to the decompressor ``d`` until ``limit`` output bytes (never more) or the end of the stream;
    returns (output, the input not yet consumed)."""
    out = bytearray() if out is None else out
    buf = data
    while len(out) < limit:
        chunk = d.decompress(buf, min(1 << 22, limit - len(out)))
        out += chunk
        buf = d.unconsumed_tail
        if d.eof or (not chunk and not buf):
            break
    return out, buf


def finish(arr: np.ndarray, meta: dict, name: object) -> tuple[np.ndarray, dict]:
    """The result contract: contiguous float32, non-empty, finite; ``meta['shape']`` and ``meta['private']`` set."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size == 0:
        raise fail(name, "image is empty")
    if not np.isfinite(arr).all():
        raise fail(name, "pixel values contain NaN or infinity")
    meta["shape"] = tuple(int(s) for s in arr.shape)
    meta.setdefault("private", {})
    return arr, meta


def path_of(source: object) -> Path | None:
    return source if isinstance(source, Path) else (Path(source) if isinstance(source, (str, os.PathLike)) else None)
