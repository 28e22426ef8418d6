"""`qc`, `deid` and `predict`'s reader on decompression bombs and lying headers, beside honest files: peak RSS
(getrusage, a fresh interpreter per command and file) and seconds. Writes results/tool_bombs.md.

    PYTHONPATH=src python benchmarks/tool_bombs.py
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests._subproc import env  # noqa: E402
from tests.data.test_bombs import BOMBS, _explicit_le, _image_ds, _part10, _pydicom_file  # noqa: E402
from tests.data.test_readers import _BOMB_RUN, deflated_honest_gib  # noqa: E402


def honest_big_deflated() -> bytes:
    """A 7000 x 7000 16-bit image of zeros, deflated (~96 KB): within the tools' budget, so it is read."""
    ds = _image_ds(7000, 7000, pixels=False)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    body = _explicit_le(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 7000 * 7000 * 2)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return _part10(c.compress(body) + c.compress(b"\0" * (7000 * 7000 * 2)) + c.flush(), "1.2.840.10008.1.2.1.99")


CASES = {
    "reference: MR_small.dcm": lambda: _pydicom_file("MR_small.dcm"),
    "reference: 7000x7000 deflated (honest)": honest_big_deflated,
    "deflate_honest_gib.dcm": deflated_honest_gib,
    **{name: build for name, (build, _) in BOMBS.items() if name.endswith((".dcm", ".nii.gz")) and "multiframe" not in name
       and "volume" not in name},
}


def main() -> None:
    rows = ["| file | command | peak RSS MiB | seconds | result |", "|---|---|---|---|---|"]
    for label, build in CASES.items():
        name = label.split(": ")[-1].split(" ")[0] if label.startswith("reference") else label
        name = name if name.endswith((".dcm", ".gz")) else "honest.dcm"
        with tempfile.TemporaryDirectory() as t:
            d = Path(t)
            (d / "in").mkdir()
            (d / "in" / name).write_bytes(build())
            for kind, extra in (("qc", []), ("deid", [str(d / "out")]), ("predict", [name])):
                r = subprocess.run([sys.executable, "-c", _BOMB_RUN, kind, str(d / "in"), *extra], capture_output=True,
                                   text=True, env=env(), timeout=600, check=False)
                got = json.loads(r.stdout.strip().splitlines()[-1])
                err = (got["err"] or "read").split(": ", 1)[-1] if got["err"] else "read / written"
                rows.append(f"| {label} | {kind} | {got['peak_mib']:.0f} | {got['seconds']:.2f} | {err[:80]} |")
                print(rows[-1], flush=True)
    out = HERE / "results" / "tool_bombs.md"
    out.write_text("# qc / deid / predict reader on bombs (fresh interpreter each; predict = the 28x28 model's budget)\n\n"
                   "Peak RSS is getrusage's ru_maxrss of the child, which starts from the forking parent's RSS: an upper "
                   "bound.\n\n"
                   + "\n".join(rows) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
