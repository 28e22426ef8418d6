"""Running the service: uvicorn with connection-level limits, so slow or idle clients cannot starve it.

- **header timeout**: a connection must complete its request headers within ``header_timeout_s`` of opening
  (or of its previous response); otherwise it is closed (a half-sent header holds nothing for long);
- **body timeout**: enforced per upload by the app (408, ``body_timeout_s``); a slow body holds no admission slot;
- **keep-alive idle timeout**: ``keep_alive_s`` (uvicorn ``timeout_keep_alive``);
- **connection limit**: at most ``connections`` open connections (default :data:`CONNECTIONS`, at most half the
  process's descriptor limit): a new connection beyond it closes the oldest connection that is idle (no request
  head in progress or being served), so a flood of idle connections cannot exhaust the descriptors and real
  requests keep being accepted; uvicorn's ``limit_concurrency`` (503) sits a little above it for busy ones;
- **incomplete events**: request lines + headers are capped at ``MAX_HEADER_BYTES`` (h11
  ``max_incomplete_event_size``);
- **descriptor exhaustion**: ``accept()`` failing with EMFILE/ENFILE is logged as one line per minute, without a
  traceback (asyncio's default prints one traceback per retry).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time

log = logging.getLogger("medsight.serve")

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5.0
MAX_HEADER_BYTES = 64 * 1024
CONNECTIONS = 512
_RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def connection_limit(requested: int | None = None) -> int:
    """Connections served at once: ``requested`` (default :data:`CONNECTIONS`), at most half the soft
    descriptor limit."""
    n = requested or CONNECTIONS
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            n = min(n, max(8, soft // 2))
    except (ImportError, OSError, ValueError):
        pass
    return n


class _RateLimited:
    """A loop exception handler: resource exhaustion on accept is one line per ``every_s``; the rest as before."""

    def __init__(self, every_s: float = 60.0):
        self.every_s = every_s
        self.last = -float("inf")
        self.suppressed = 0

    def __call__(self, loop, context) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            now = time.monotonic()
            if now - self.last >= self.every_s:
                extra = f" ({self.suppressed} more since the last report)" if self.suppressed else ""
                log.error("cannot accept connections: %s (%s); new connections wait until descriptors are free%s",
                          errno.errorcode.get(exc.errno, exc.errno), exc.strerror, extra)
                self.last, self.suppressed = now, 0
            else:
                self.suppressed += 1
            return
        loop.default_exception_handler(context)


def install_loop_handler(loop: asyncio.AbstractEventLoop, every_s: float = 60.0) -> _RateLimited:
    handler = _RateLimited(every_s)
    loop.set_exception_handler(handler)
    return handler


def _protocol(header_timeout_s: float, max_connections: int):
    """uvicorn's h11 protocol with a header timeout (a connection that has not sent a complete request head within
    ``header_timeout_s`` of opening, or of its last response, is closed) and idle eviction (beyond
    ``max_connections`` open connections, the oldest idle one is closed)."""
    from collections import OrderedDict

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    idle: OrderedDict = OrderedDict()  # connections waiting for a request head, oldest first

    class GuardedH11(H11Protocol):
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)
            idle[self] = None
            idle.move_to_end(self)

        def _disarm(self) -> None:
            idle.pop(self, None)
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            while len(self.connections) > max_connections and idle:
                oldest, _ = idle.popitem(last=False)
                if oldest is not self and not oldest.transport.is_closing():
                    oldest.transport.close()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the request head is in: the body timeout (in the app) takes over

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return GuardedH11


def server_config(app, host: str, port: int, *, header_timeout_s: float = HEADER_TIMEOUT_S,
                  keep_alive_s: float = KEEP_ALIVE_S, connections: int | None = None, **kw):
    """The uvicorn ``Config`` for the service with the limits above."""
    import uvicorn

    cap = connection_limit(connections)
    return uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning",
                          http=_protocol(header_timeout_s, cap), timeout_keep_alive=max(1, round(keep_alive_s)),
                          limit_concurrency=cap + max(8, cap // 8), h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          backlog=1024, **kw)


def run_server(app, host: str, port: int, **kw) -> None:
    """Serve ``app`` on ``host:port`` until stopped (what ``medsight serve`` runs)."""
    import uvicorn

    uvicorn.Server(server_config(app, host, port, **kw)).run()
