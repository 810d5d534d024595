"""The server process around the app: uvicorn with limits, a header deadline, SIGTERM taken like Ctrl-C, a
bounded graceful stop, and the page opened once the socket serves.

- SIGTERM (systemd, `docker stop`) and SIGINT take one path: stop accepting, let in-flight answers end, at
  `shutdown_timeout` cancel what still runs (streams end with `finish_reason: "cancelled"` and `[DONE]`),
  then the caller closes the models and removes their scratch (uvicorn's own handler would re-raise the
  signal after the stop and kill the process before any `finally`).
- A connection must send its request headers within HEADER_SECONDS (uvicorn has no such deadline: a half-sent
  request would hold a socket forever); at most `max_connections` connections and tasks (503 above).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

try:  # httptools (C) parses bodies several times cheaper than h11 (pure Python): a flood costs the server less
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as BaseProtocol
except ImportError:  # pragma: no cover
    BaseProtocol = H11Protocol

log = logging.getLogger(__name__)
HEADER_SECONDS = 10.0
SHUTDOWN_SECONDS = 8.0  # docker stop waits 10 s before SIGKILL: cancel at 8, clean up before 10
MAX_CONNECTIONS = 128


class HeaderDeadline(BaseProtocol):
    """uvicorn's HTTP protocol with a deadline for each request's headers (from the connection's start, or
    the last answer)."""

    header_seconds = HEADER_SECONDS

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_seconds, self._headers_late)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()

    def _headers_late(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete  # no request's headers since the arm
        if waiting and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request headers in %s s", self.header_seconds)
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn.Server that (1) calls `on_ready(url)` on a thread once listening, (2) cancels in-flight work
    at `shutdown_timeout` (`cancel_all() -> int`), (3) does not re-raise SIGTERM/SIGINT after its stop."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        cancel_all: Callable[[], int],
        shutdown_timeout: float,
        on_ready: Callable[[], None] | None = None,
    ):
        super().__init__(config)
        self.cancel_all, self.shutdown_timeout, self.on_ready = cancel_all, shutdown_timeout, on_ready
        self.signals: list[int] = []

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            threading.Thread(target=self.on_ready, daemon=True, name="avgguf-open-browser").start()

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.shutdown_timeout, self._cancel)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _cancel(self) -> None:
        n = self.cancel_all()
        if n:
            log.warning("shutdown: cancelled %d request(s) still running after %.0f s", n, self.shutdown_timeout)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self.signals, self._captured_signals[:] = list(self._captured_signals), []


def run(
    app,
    sock,
    *,
    cancel_all: Callable[[], int],
    on_ready: Callable[[], None] | None = None,
    verbose: bool = False,
    shutdown_timeout: float = SHUTDOWN_SECONDS,
    max_connections: int = MAX_CONNECTIONS,
    header_timeout: float = HEADER_SECONDS,
) -> list[str]:
    """Serve on `sock` until SIGINT/SIGTERM; returns the names of the signals that stopped it."""
    http = type("HeaderDeadline", (HeaderDeadline,), {"header_seconds": header_timeout})
    config = uvicorn.Config(
        app,
        log_level="info" if verbose else "warning",
        http=http,
        limit_concurrency=max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(shutdown_timeout) + 1,
        lifespan="off",
    )
    server = Server(config, cancel_all=cancel_all, shutdown_timeout=shutdown_timeout, on_ready=on_ready)
    server.run(sockets=[sock])
    return [signal.Signals(s).name for s in server.signals]
