"""Downloads that cannot leave a half-written or unverified file behind: a temporary file beside the target,
the MD5 or sha256 checked, then renamed into place. Used for the MedMNIST archives (:mod:`medsight.data.sources`)
and pretrained weights (:mod:`medsight.pretrained`)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

from medsight import progress
from medsight.errors import DataError
from medsight.utils import sha256_file


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str | None = None, timeout: float = 60.0, *,
             sha256: str | None = None) -> Path:
    """Download to ``dest`` atomically (temp file + rename), verifying the MD5 (or the sha256, or its leading hex
    digits) before the rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            size = resp.headers.get("Content-Length")
            with progress.task(f"downloading {dest.name} (MB)", total=int(size) / 1e6 if size else None) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.advance(len(block) / 1e6)
        if md5 is not None and (got := md5sum(Path(tmp))) != md5:
            raise DataError(f"downloaded {url} has MD5 {got}, expected {md5}; refusing it")
        if sha256 is not None and not (got := sha256_file(tmp)).startswith(sha256.lower()):
            raise DataError(f"downloaded {url} has sha256 {got[:16]}..., expected {sha256}; refusing it")
        os.replace(tmp, dest)
    except OSError as e:
        raise DataError(f"cannot download {url} to {dest}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
