"""Compressed pixel data codestreams (JPEG, JPEG-LS, JPEG 2000 / HTJ2K, RLE): the frame sizes their own headers
declare (checked against the DICOM header before decoding), and the marker segments that carry text rather than
pixels (comments, application segments), found and removed without re-encoding a pixel."""

from __future__ import annotations

import struct

JPEG_TS = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}  # JPEG baseline/extended/lossless, JPEG-LS
J2K_TS = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
           "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}  # JPEG 2000, HTJ2K
RLE_TS = "1.2.840.10008.1.2.5"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # 0xF7: JPEG-LS SOF55


def jpeg_frame_size(buf: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from a JPEG or JPEG-LS frame header (SOFn / SOF55). ValueError if absent."""
    if buf[:2] != b"\xff\xd8":
        raise ValueError("JPEG frame does not start with an SOI marker")
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            raise ValueError(f"malformed JPEG marker at byte {i}")
        m = buf[i + 1]
        if m == 0xFF:
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:
            i += 2
            continue
        if m == 0xD9:
            break
        seg = int.from_bytes(buf[i + 2:i + 4], "big")
        if seg < 2:
            raise ValueError(f"malformed JPEG segment length at byte {i}")
        if m in _SOF:
            if i + 10 > n or seg < 8:
                raise ValueError("truncated JPEG frame header")
            rows = int.from_bytes(buf[i + 5:i + 7], "big")
            cols = int.from_bytes(buf[i + 7:i + 9], "big")
            return rows, cols, buf[i + 9]
        if m == 0xDA:
            raise ValueError("JPEG scan before any frame header")
        i += 2 + seg
    raise ValueError("no JPEG frame header (SOF) found")


def j2k_frame_size(buf: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ segment (or a JP2 file's codestream)."""
    pos = 0
    if buf[:4] != b"\xff\x4f\xff\x51":
        if buf[4:8] != b"jP  ":
            raise ValueError("not a JPEG 2000 codestream (no SOC/SIZ markers)")
        pos = buf.find(b"\xff\x4f\xff\x51", 0, 1 << 16)
        if pos < 0:
            raise ValueError("JP2 file without a JPEG 2000 codestream")
    siz = buf[pos + 4:pos + 4 + 38]
    if len(siz) < 38:
        raise ValueError("truncated JPEG 2000 SIZ segment")
    x, y, x0, y0 = struct.unpack(">4I", siz[4:20])
    comps = int.from_bytes(siz[36:38], "big")
    if x <= x0 or y <= y0:
        raise ValueError(f"invalid JPEG 2000 image area ({x}x{y} from offset {x0},{y0})")
    return y - y0, x - x0, comps


def rle_check(buf: bytes, segments: int) -> None:
    """Validate a DICOM RLE frame's 64-byte header: segment count and increasing in-range offsets."""
    if len(buf) < 64:
        raise ValueError(f"RLE frame of {len(buf)} bytes has no 64-byte header")
    head = struct.unpack("<16I", buf[:64])
    n, offsets = head[0], head[1:]
    if n != segments:
        raise ValueError(f"RLE header lists {n} segments; Samples per Pixel x bytes per sample needs {segments}")
    offs = list(offsets[:n])
    if offs[0] != 64 or any(b <= a for a, b in zip(offs, offs[1:])) or offs[-1] >= len(buf) or any(offsets[n:]):
        raise ValueError(f"RLE segment offsets {offs} are not increasing within the {len(buf)}-byte frame")


# ----------------------------------------------------------------------------- text-bearing segments

_APP14 = 0xEE  # Adobe: colour transform flag the decoder needs
_COM = 0xFE


def _jpeg_segments(buf: bytes):
    """Walk a JPEG / JPEG-LS frame: yields ('seg', marker, start, end) for marker segments (and bare markers,
    end = start + 2), ('data', None, start, end) for entropy-coded data. ValueError when malformed."""
    if buf[:2] != b"\xff\xd8":
        raise ValueError("JPEG frame does not start with an SOI marker")
    yield ("seg", 0xD8, 0, 2)
    i, n = 2, len(buf)
    while i < n:
        if buf[i] != 0xFF:
            raise ValueError(f"malformed JPEG marker at byte {i}")
        if i + 1 >= n:
            raise ValueError("truncated JPEG marker")
        m = buf[i + 1]
        if m == 0xFF:  # fill byte
            yield ("data", None, i, i + 1)
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD7:
            yield ("seg", m, i, i + 2)
            i += 2
            continue
        if m == 0xD9:
            yield ("seg", m, i, i + 2)
            if n > i + 2:
                yield ("tail", None, i + 2, n)
            return
        if i + 4 > n:
            raise ValueError("truncated JPEG segment")
        seg = int.from_bytes(buf[i + 2:i + 4], "big")
        if seg < 2 or i + 2 + seg > n:
            raise ValueError(f"malformed JPEG segment length at byte {i}")
        yield ("seg", m, i, i + 2 + seg)
        i += 2 + seg
        if m == 0xDA:  # entropy-coded data up to the next marker (not RSTn, stuffing or fill)
            j = i
            while j < n - 1:
                if buf[j] == 0xFF:
                    b = buf[j + 1]
                    if b >= 0xC0 and not 0xD0 <= b <= 0xD7 and b != 0xFF:
                        break
                    j += 2 if b != 0xFF else 1
                    continue
                j += 1
            else:
                j = n
            yield ("data", None, i, j)
            i = j
    raise ValueError("JPEG frame without an EOI marker")


def _keep_jpeg_segment(m: int, body: bytes) -> bytes | None:
    """The segment to write for marker ``m`` with payload ``body`` (None: drop it)."""
    if m == _COM or (0xE0 <= m <= 0xEF and m != _APP14):
        return None
    if m == _APP14:
        if body[:5] != b"Adobe" or len(body) < 12:
            return None
        body = body[:12]  # 'Adobe', version, flags0, flags1, transform: nothing else survives
        return b"\xff" + bytes([m]) + (len(body) + 2).to_bytes(2, "big") + body
    return b""  # keep as it was


def strip_jpeg(buf: bytes) -> bytes:
    """A JPEG / JPEG-LS frame without COM and APPn segments (APP14 'Adobe' kept, cut to its 12 defined bytes) and
    without bytes after EOI; the entropy-coded data are copied unchanged. ValueError when malformed."""
    out = bytearray()
    for kind, m, a, b in _jpeg_segments(buf):
        if kind == "tail":
            continue
        if kind == "seg" and m is not None and b - a > 2:
            new = _keep_jpeg_segment(m, buf[a + 4:b])
            if new is None:
                continue
            out += new if new else buf[a:b]
        else:
            out += buf[a:b]
    return bytes(out)


def jpeg_text_segments(buf: bytes) -> bytes:
    """Every byte of a JPEG / JPEG-LS frame except its entropy-coded data (what a verifier must search)."""
    return b"".join(buf[a:b] for kind, _, a, b in _jpeg_segments(buf) if kind != "data")


_J2K_SOT, _J2K_SOD, _J2K_EOC, _J2K_COM, _J2K_TLM = 0xFF90, 0xFF93, 0xFFD9, 0xFF64, 0xFF55


def _j2k_walk(buf: bytes, pos: int = 0):
    """Walk a JPEG 2000 codestream from ``pos``: yields ('seg', marker, start, end) and ('data', None, start, end)
    (tile-part bitstreams). ValueError when malformed."""
    if buf[pos:pos + 2] != b"\xff\x4f":
        raise ValueError("JPEG 2000 codestream does not start with SOC")
    yield ("seg", 0xFF4F, pos, pos + 2)
    i, n = pos + 2, len(buf)
    tile_end = None
    while i < n:
        if i + 2 > n:
            raise ValueError("truncated JPEG 2000 marker")
        m = int.from_bytes(buf[i:i + 2], "big")
        if m == _J2K_EOC:
            yield ("seg", m, i, i + 2)
            if n > i + 2:
                yield ("tail", None, i + 2, n)
            return
        if m == _J2K_SOD:
            if tile_end is None:
                raise ValueError("SOD outside a tile-part")
            end = n if tile_end == 0 else tile_end
            if end > n or end < i + 2:
                raise ValueError("JPEG 2000 tile-part length out of range")
            yield ("seg", m, i, i + 2)
            yield ("data", None, i + 2, end)
            i, tile_end = end, None
            continue
        if m >> 8 != 0xFF or i + 4 > n:
            raise ValueError(f"malformed JPEG 2000 marker at byte {i}")
        seg = int.from_bytes(buf[i + 2:i + 4], "big")
        if seg < 2 or i + 2 + seg > n:
            raise ValueError(f"malformed JPEG 2000 segment length at byte {i}")
        if m == _J2K_SOT:
            if seg != 10:
                raise ValueError("malformed SOT segment")
            psot = struct.unpack(">I", buf[i + 6:i + 10])[0]
            tile_end = 0 if psot == 0 else i + psot
        yield ("seg", m, i, i + 2 + seg)
        i += 2 + seg
    raise ValueError("JPEG 2000 codestream without an EOC marker")


def _strip_j2k_codestream(buf: bytes) -> bytes:
    items = [it for it in _j2k_walk(buf) if it[0] != "tail"]
    dropped_in_tiles = any(m == _J2K_COM for k, m, a, b in items[1:]) and any(m == _J2K_SOT for _, m, _, _ in items)
    out = bytearray()
    sot_at = None  # (index in out of the SOT's Psot field, bytes removed from this tile-part so far)
    removed = 0
    for kind, m, a, b in items:
        if kind == "seg" and m == _J2K_SOT:
            if sot_at is not None:
                _fix_psot(out, sot_at, removed)
            sot_at, removed = len(out) + 6, 0
            out += buf[a:b]
            continue
        if kind == "seg" and (m == _J2K_COM or (m == _J2K_TLM and dropped_in_tiles)):
            if sot_at is not None:
                removed += b - a
            continue
        if kind == "seg" and m == _J2K_EOC and sot_at is not None:
            _fix_psot(out, sot_at, removed)
            sot_at = None
        out += buf[a:b]
    if sot_at is not None:
        _fix_psot(out, sot_at, removed)
    return bytes(out)


def _fix_psot(out: bytearray, at: int, removed: int) -> None:
    psot = struct.unpack(">I", out[at:at + 4])[0]
    if psot and removed:
        struct.pack_into(">I", out, at, psot - removed)


def _jp2_boxes(buf: bytes):
    i, n = 0, len(buf)
    while i + 8 <= n:
        lbox = struct.unpack(">I", buf[i:i + 4])[0]
        tbox = buf[i + 4:i + 8]
        hdr = 8
        if lbox == 1:
            if i + 16 > n:
                raise ValueError("truncated JP2 box")
            lbox, hdr = struct.unpack(">Q", buf[i + 8:i + 16])[0], 16
        elif lbox == 0:
            lbox = n - i
        if lbox < hdr or i + lbox > n:
            raise ValueError("malformed JP2 box length")
        yield tbox, i, i + hdr, i + lbox
        i += lbox


def _is_jp2(buf: bytes) -> bool:
    return buf[4:8] == b"jP  "


def strip_j2k(buf: bytes) -> bytes:
    """A JPEG 2000 / HTJ2K frame without COM marker segments (main and tile-part headers; Psot adjusted, TLM dropped
    when a tile-part shrank) and without bytes after EOC; a JP2 file keeps only its signature, file type, header
    and codestream boxes. Tile bitstreams are copied unchanged. ValueError when malformed."""
    if not _is_jp2(buf):
        return _strip_j2k_codestream(buf)
    out = bytearray()
    for tbox, a, body, b in _jp2_boxes(buf):
        if tbox == b"jp2c":
            cs = _strip_j2k_codestream(buf[body:b])
            out += struct.pack(">I", 8 + len(cs)) + b"jp2c" + cs
        elif tbox in (b"jP  ", b"ftyp", b"jp2h"):
            out += buf[a:b]
    return bytes(out)


def j2k_text_segments(buf: bytes) -> bytes:
    """Every byte of a JPEG 2000 frame except its tile bitstreams (what a verifier must search)."""
    if not _is_jp2(buf):
        return b"".join(buf[a:b] for kind, _, a, b in _j2k_walk(buf) if kind != "data")
    parts = []
    for tbox, a, body, b in _jp2_boxes(buf):
        if tbox == b"jp2c":
            parts.append(buf[a:body] + b"".join(buf[body + x:body + y] for k, _, x, y in _j2k_walk(buf[body:b])
                                                 if k != "data"))
        else:
            parts.append(buf[a:b])
    return b"".join(parts)


def strip_frame(frame: bytes, tsuid: str) -> bytes:
    """``frame`` of transfer syntax ``tsuid`` without text-bearing segments (RLE and unknown syntaxes: as is)."""
    if tsuid in JPEG_TS:
        return strip_jpeg(frame)
    if tsuid in J2K_TS:
        return strip_j2k(frame)
    return frame


def frame_text(frame: bytes, tsuid: str) -> bytes:
    """The bytes of ``frame`` a verifier searches: all but the entropy-coded data (RLE / unknown: every byte)."""
    if tsuid in JPEG_TS:
        return jpeg_text_segments(frame)
    if tsuid in J2K_TS:
        return j2k_text_segments(frame)
    if tsuid == RLE_TS and len(frame) >= 64:
        return frame[:64]
    return frame
