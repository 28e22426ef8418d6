"""PNG / JPEG / TIFF / BMP / GIF / WebP through Pillow (multi-page TIFF as a volume)."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medsight.data.readers.base import Reader, fail, finish
from medsight.data.readers.budget import DecodeBudget
from medsight.data.readers.windowing import FILE_WINDOW, apply_window
from medsight.errors import DataError

#: format name -> its signature test
_MAGIC = (
    ("png", lambda h: h.startswith(b"\x89PNG\r\n\x1a\n")),
    ("jpeg", lambda h: h.startswith(b"\xff\xd8\xff")),
    ("tiff", lambda h: h[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
    ("bmp", lambda h: h.startswith(b"BM")),
    ("gif", lambda h: h.startswith(b"GIF8")),
    ("webp", lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
)


class PillowReader(Reader):
    name = "pillow"
    label = "PNG/JPEG/TIFF/BMP/GIF/WebP"
    suffixes = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")

    def sniff(self, head: bytes) -> str | None:
        return next((fmt for fmt, test in _MAGIC if test(head)), None)

    def guess(self, head: bytes, name: str) -> str | None:
        return None  # these formats all have a signature: a name alone is not enough

    def read(self, source, name, fmt, *, window, budget):
        src = source if isinstance(source, Path) else io.BytesIO(bytes(source))
        return _read_pillow(src, name, fmt, window=window, budget=budget)


def _read_pillow(src, name, fmt, *, window, budget: DecodeBudget) -> tuple[np.ndarray, dict]:
    from medsight.errors import optional_import

    Image = optional_import("PIL.Image", "pillow")
    ImageOps = optional_import("PIL.ImageOps", "pillow")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                w, h = img.size
                n_frames = int(getattr(img, "n_frames", 1) or 1)
                use_frames = n_frames if img.format == "TIFF" and n_frames > 1 else 1
                bands = len(img.getbands())
                budget.check(name, w * h * max(bands, 1) * use_frames, use_frames)  # before any pixel is decoded
                frames = []
                for i in range(use_frames):
                    img.seek(i)
                    img.load()
                    frames.append(_pil_frame(img, Image, ImageOps))
                pil_format = img.format
                info = dict(img.info)
    except (DataError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # PIL.UnidentifiedImageError, OSError (truncated), DecompressionBomb*, ...
        raise fail(name, f"cannot decode {fmt.upper()} image ({type(e).__name__}: {e})", e) from e
    arrs = [f[0] for f in frames]
    photometric, value_range, bits = frames[0][1], frames[0][2], frames[0][3]
    if len({a.shape for a in arrs}) != 1:
        raise fail(name, "TIFF pages differ in size")
    if use_frames > 1:
        arr = np.stack(arrs, axis=1)  # (C, D, H, W)
    else:
        arr = arrs[0]
    meta: dict[str, Any] = {
        "format": (pil_format or fmt).lower().replace("mpo", "jpeg"),
        "modality": "OT",
        "photometric": photometric,
        "bits": bits,
        "spacing": (1.0,) * (arr.ndim - 1),
        "orientation": None,
        "value_range": value_range,
        "window": None,
        "private": {},
    }
    dpi = info.get("dpi")
    if dpi and arr.ndim == 3:
        try:
            mm = [25.4 / float(v) for v in dpi[:2]]
            if all(math.isfinite(v) and v > 0 for v in mm):
                meta["spacing"] = (mm[1], mm[0])
        except (TypeError, ValueError, ZeroDivisionError):
            pass
    if window is not None and window != FILE_WINDOW and photometric != "RGB":
        c, w = window
        arr = apply_window(arr, c, w)
        meta["window"] = (float(c), float(w))
        meta["value_range"] = (0.0, 1.0)
    return finish(arr, meta, name)


def _pil_frame(img, Image, ImageOps):
    """One Pillow frame -> ((C,H,W) float32, photometric, value_range, bits)."""
    if img.format in ("JPEG", "MPO"):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "P" or mode == "PA":
        pal = img.convert("RGB")
        a = np.asarray(pal)
        if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
            return a[..., 0][None].astype(np.float32), "MONOCHROME2", (0.0, 255.0), 8
        return np.moveaxis(a, -1, 0).astype(np.float32), "RGB", (0.0, 255.0), 8
    if mode == "1":
        return (np.asarray(img, dtype=np.uint8) * 255)[None].astype(np.float32), "MONOCHROME2", (0.0, 255.0), 1
    if mode in ("L", "LA"):
        a = np.asarray(img.convert("L") if mode == "LA" else img)
        return a[None].astype(np.float32), "MONOCHROME2", (0.0, 255.0), 8
    if mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32)
        return a[None], "MONOCHROME2", (0.0, 65535.0), 16
    if mode == "I":
        a = np.asarray(img)
        if a.size and a.min() >= 0 and a.max() <= 65535 and img.format == "PNG":
            return a[None].astype(np.float32), "MONOCHROME2", (0.0, 65535.0), 16
        return a[None].astype(np.float32), "MONOCHROME2", None, 32
    if mode == "F":
        return np.asarray(img, dtype=np.float32)[None], "MONOCHROME2", None, 32
    if mode in ("RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "La"):
        a = np.asarray(img if mode == "RGB" else img.convert("RGB"))
        return np.moveaxis(a, -1, 0).astype(np.float32), "RGB", (0.0, 255.0), 8
    if mode in ("I;16B", "I;16L", "I;16N"):
        a = np.asarray(img).astype(np.float32)
        return a[None], "MONOCHROME2", (0.0, 65535.0), 16
    a = np.asarray(img.convert("RGB"))
    return np.moveaxis(a, -1, 0).astype(np.float32), "RGB", (0.0, 255.0), 8
