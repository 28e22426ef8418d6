"""Progress reporting: library code reports how far a long step has got, a front end renders it.

Library code never prints. It calls :func:`track` (wraps an iterable) or :func:`task` (a handle with
``advance``/``close``); both cost nothing when no sink is installed, which is the default (library use,
the REST service, tests). The CLI installs a sink that draws Rich progress bars on stderr::

    from medsight import progress

    for f in progress.track(files, "de-identifying"):
        ...

    bar = progress.task("predicting", total=len(files))
    ...
    bar.advance(len(chunk))
    bar.close()

A sink is any object with the three methods of :class:`ProgressSink`. Keys are opaque integers chosen here.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Protocol, TypeVar

T = TypeVar("T")


class ProgressSink(Protocol):
    def start(self, key: int, description: str, total: Optional[float]) -> None:
        """A step began; ``total`` is None when its length is unknown."""

    def advance(self, key: int, amount: float) -> None:
        """The step made ``amount`` units of progress."""

    def finish(self, key: int) -> None:
        """The step ended (done, failed or abandoned)."""


_sink: Optional[ProgressSink] = None
_next_key = 0


def get_sink() -> Optional[ProgressSink]:
    return _sink


def set_sink(sink: Optional[ProgressSink]) -> Optional[ProgressSink]:
    """Install ``sink`` (None: report nothing); returns the previous one."""
    global _sink
    previous, _sink = _sink, sink
    return previous


@contextmanager
def using(sink: Optional[ProgressSink]) -> Iterator[Optional[ProgressSink]]:
    """Install ``sink`` for the duration of a ``with`` block."""
    previous = set_sink(sink)
    try:
        yield sink
    finally:
        set_sink(previous)


class Task:
    """Handle for one step; a no-op when no sink was installed when it started."""

    __slots__ = ("_sink", "key")

    def __init__(self, description: str, total: Optional[float] = None):
        global _next_key
        self._sink = _sink
        self.key = _next_key
        _next_key += 1
        if self._sink is not None:
            self._sink.start(self.key, description, total)

    def advance(self, amount: float = 1) -> None:
        if self._sink is not None:
            self._sink.advance(self.key, amount)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.finish(self.key)
            self._sink = None

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def task(description: str, total: Optional[float] = None) -> Task:
    """Start a step of ``total`` units (None: unknown length); call ``advance`` and finally ``close``."""
    return Task(description, total)


def track(items: Iterable[T], description: str, total: Optional[float] = None) -> Iterator[T]:
    """Yield ``items``, advancing one unit per item; ``total`` defaults to ``len(items)`` when it has one."""
    if _sink is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Task(description, total) as t:
        for item in items:
            yield item
            t.advance()
