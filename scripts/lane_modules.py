"""A pytest plugin: at the end of the session, which medsight modules the selected tests imported (in the pytest
process; modules only a subprocess imports are not seen), and which they did not.

    PYTHONPATH=src:scripts python -m pytest -p lane_modules -m unit tests

Prints one line "lane touches N of M medsight modules", then the untouched ones (none: the lane touches every
module). Without coverage installed this is the check that the unit lane reaches every module.
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medsight"


def _all_modules() -> set[str]:
    out = set()
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.add(".".join(parts))
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    every = _all_modules()
    seen = {m for m in sys.modules if m in every}
    if "medsight.__main__" in every and "medsight.cli" in seen:
        # `python -m medsight` (run in subprocesses by the CLI tests) is two lines that call cli.main
        seen.add("medsight.__main__")
    missing = sorted(every - seen)
    terminalreporter.write_line(f"lane touches {len(seen)} of {len(every)} medsight modules"
                                + (f"; not imported: {', '.join(missing)}" if missing else ""))
