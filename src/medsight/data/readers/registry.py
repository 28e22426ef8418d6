"""The reader registry and the one dispatch every entry point uses (files, bytes, folder walks, sniffing).

Readers are asked in registration order: first every reader's :meth:`Reader.sniff` (content: magic bytes),
then, when none claimed the content, every reader's :meth:`Reader.guess` (weak evidence: a short signature,
the name). The first answer wins.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from medsight.data.readers.base import Reader, fail
from medsight.data.readers.budget import DecodeBudget, resolve_budget
from medsight.data.readers.windowing import resolve_window
from medsight.errors import DataError

#: Bytes a sniffer sees (files: the first HEAD bytes; uploads: as many of them as there are).
HEAD = 4096
#: Format name of a gzip stream no reader claims (refused with its own message; never picked up by walks).
GZIP = "gzip"

_readers: list[Reader] = []
_lock = threading.Lock()
_SKIP_NAMES = {"dicomdir", "thumbs.db", "desktop.ini"}


def register_reader(reader: Reader, *, before: str | None = None) -> Reader:
    """Add ``reader`` to the registry (at the end, or before the reader named ``before``); a reader of the
    same name is replaced in place. Returns the reader (usable as a class decorator's target)."""
    if not getattr(reader, "name", ""):
        raise ValueError("a reader needs a name")
    with _lock:
        for i, r in enumerate(_readers):
            if r.name == reader.name:
                _readers[i] = reader
                return reader
        if before is None:
            _readers.append(reader)
        else:
            idx = next((i for i, r in enumerate(_readers) if r.name == before), None)
            if idx is None:
                raise ValueError(f"no reader named {before!r}")
            _readers.insert(idx, reader)
    return reader


def unregister_reader(name: str) -> None:
    with _lock:
        _readers[:] = [r for r in _readers if r.name != name]


def readers() -> list[Reader]:
    """The registered readers, in the order they are asked."""
    with _lock:
        return list(_readers)


def readable_suffixes() -> tuple[str, ...]:
    """Name suffixes of the formats read here (every registered reader's)."""
    out: list[str] = []
    for r in readers():
        out.extend(s for s in r.suffixes if s and s not in out)
    return tuple(out)


def find_reader(head: bytes, name: str = "") -> tuple[Reader | None, str | None]:
    """(reader, format name) for content ``head`` named ``name``; (None, None) when no reader claims it."""
    head = bytes(head[:HEAD])
    regs = readers()
    for r in regs:
        fmt = r.sniff(head)
        if fmt:
            return r, fmt
    for r in regs:
        fmt = r.guess(head, str(name))
        if fmt:
            return r, fmt
    return None, None


def sniff_format(head: bytes, name: str = "") -> str | None:
    """The format of content ``head`` (first bytes, >= 600 recommended) named ``name``: a registered reader's
    format name ('dicom', 'nifti', 'nifti-gz', 'png', 'jpeg', ...), 'gzip' for a gzip stream no reader reads
    (refused), or None (not a format read here)."""
    return find_reader(head, name)[1]


def file_format(path: str | os.PathLike) -> str | None:
    """:func:`sniff_format` of a file's first bytes and name; None when it cannot be opened."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(HEAD)
    except OSError:
        return None
    return sniff_format(head, Path(path).name)


def is_readable_name(name: str | os.PathLike) -> bool:
    """The name alone says the file is in a format read here (suffix; hidden files and DICOMDIR excluded)."""
    n = Path(name).name.lower()
    return not n.startswith(".") and n not in _SKIP_NAMES and n.endswith(readable_suffixes())


def is_readable_file(path: str | os.PathLike) -> bool:
    """A file to pick up when walking a folder: a readable suffix, or content a reader claims (suffix-less
    DICOM and friends). Hidden files and DICOMDIR are skipped."""
    p = Path(path)
    n = p.name.lower()
    if n.startswith(".") or n in _SKIP_NAMES:
        return False
    if n.endswith(readable_suffixes()):
        return True
    return file_format(p) not in (None, GZIP)


def walk_readable(root: str | os.PathLike) -> list[Path]:
    """Every file below ``root`` (recursively, sorted) that :func:`is_readable_file` accepts."""
    return sorted(f for f in Path(root).rglob("*") if not any(part.startswith(".") for part in f.relative_to(root).parts)
                  and f.is_file() and is_readable_file(f))


def _known() -> str:
    return "/".join(r.label or r.name.upper() for r in readers())


def read(
    source: str | os.PathLike | bytes | bytearray | memoryview,
    name: object | None = None,
    *,
    window: Any = None,
    budget: DecodeBudget | None = None,
    max_elements: int | None = None,
    series_uid: str | None = None,
) -> tuple[np.ndarray, dict]:
    """THE dispatch: a file path (or a folder holding one DICOM series) or an upload's bytes -> ``(array, meta)``
    through the reader that claims the content. ``name`` names the source in messages (and is the name hint
    for bytes); paths name themselves."""
    win = resolve_window(window)
    bud = resolve_budget(budget, max_elements)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label: object = name if name is not None else "upload"
        data = bytes(source)
        if not data:
            raise DataError(f"cannot read {label}: empty upload (0 bytes)")
        src: Path | bytes = data
        head, hint = data[:HEAD], str(label)
    elif isinstance(source, (str, os.PathLike)):
        p = Path(source)
        label = p if name is None else name
        if p.is_dir():
            from medsight.data.readers.dicom import read_dicom_series

            return read_dicom_series(p, window=win, series_uid=series_uid, budget=bud)
        if not p.exists():
            raise DataError(f"cannot read {label}: file not found")
        try:
            with open(p, "rb") as fh:
                head = fh.read(HEAD)
        except OSError as e:
            raise fail(label, e.strerror or e) from e
        src, hint = p, p.name
    else:
        raise DataError(f"cannot read {name}: expected a path or bytes, got {type(source).__name__}")
    reader, fmt = find_reader(head, hint)
    if fmt == GZIP or reader is None or fmt is None:
        if fmt == GZIP:
            raise fail(label, "gzip file that does not hold a NIfTI image")
        suffix = Path(hint).suffix
        raise fail(label, f"unrecognised file format (suffix {suffix or 'none'!r}, not {_known()})")
    return reader.read(src, label, fmt, window=win, budget=bud)


def read_image(
    path: str | os.PathLike,
    *,
    window: str | tuple[float, float] | None = None,
    series_uid: str | None = None,
    max_elements: int | None = None,
    budget: DecodeBudget | None = None,
) -> tuple[np.ndarray, dict]:
    """Read a scan into a float32 channel-first array and a metadata dict.

    ``path`` may be a file in any registered format or a folder holding one DICOM series (pick one with
    ``series_uid`` when it holds several). ``window`` applies a CT window (a name in ``WINDOWS``, ``'dicom'`` for
    the file's own VOI LUT / window, or ``(center, width)``) and scales the result to [0, 1]. ``budget``
    (default ``DEFAULT_BUDGET``; ``max_elements`` overrides its element cap) is enforced from the headers
    before decoding.
    """
    return read(Path(path), window=window, budget=budget, max_elements=max_elements, series_uid=series_uid)


def read_image_bytes(
    data: bytes,
    name: str,
    *,
    window: str | tuple[float, float] | None = None,
    max_elements: int | None = None,
    budget: DecodeBudget | None = None,
) -> tuple[np.ndarray, dict]:
    """Like :func:`read_image` for an uploaded file's bytes; ``name`` is only a hint and for messages."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"cannot read {name}: expected bytes, got {type(data).__name__}")
    return read(data, name, window=window, budget=budget, max_elements=max_elements)
