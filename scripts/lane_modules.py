"""A pytest plugin for measuring a lane: which medsight modules the selected tests imported (in the pytest
process; modules only a subprocess imports are not seen), and the CPU seconds the session and each test used.

    PYTHONPATH=src:scripts python -m pytest -p lane_modules -m unit tests      # not with -n (xdist)

Prints "lane touches N of M medsight modules" (and the untouched ones), then "lane CPU: ..." with the session's
CPU seconds (this process and its finished subprocesses, all threads) and the tests that used the most. CPU
seconds do not depend on what else runs on the machine, so they estimate the lane's time on a quiet machine
better than a wall clock on a busy one. Without coverage installed this is the check that the lane reaches every
module.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "medsight"


def _all_modules() -> set[str]:
    out = set()
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.add(".".join(parts))
    return out


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


_START = (_cpu(), time.perf_counter())
_PER_TEST: dict[str, float] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = _cpu()
    yield
    _PER_TEST[item.nodeid] = _cpu() - t0


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    every = _all_modules()
    seen = {m for m in sys.modules if m in every}
    if "medsight.__main__" in every and "medsight.cli" in seen:
        # `python -m medsight` (run in subprocesses by the CLI tests) is two lines that call cli.main
        seen.add("medsight.__main__")
    missing = sorted(every - seen)
    terminalreporter.write_line(f"lane touches {len(seen)} of {len(every)} medsight modules"
                                + (f"; not imported: {', '.join(missing)}" if missing else ""))
    cpu, wall = _cpu(), time.perf_counter() - _START[1]  # CPU since the process started
    tests = sum(_PER_TEST.values())
    terminalreporter.write_line(f"lane CPU: {cpu:.1f} s in {wall:.1f} s wall ({len(_PER_TEST)} tests: {tests:.1f} s; "
                                f"start-up and collection: {cpu - tests:.1f} s); most CPU:")
    for nodeid, c in sorted(_PER_TEST.items(), key=lambda kv: -kv[1])[:25]:
        terminalreporter.write_line(f"  {c:6.2f} s  {nodeid}")
