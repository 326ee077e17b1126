"""The HTTP server: uvicorn, configured from ``[server]``, plus the one bound uvicorn lacks.

uvicorn closes a keep-alive connection left idle for ``timeout_keep_alive`` seconds and answers
503 to a request over its connection limit (``limit_concurrency``). It never times out a
connection that has not finished sending a request's headers, though: a new connection that
sends nothing, one that sends a header line a second and never ends them ("slowloris"), and a
keep-alive connection that sends one byte (any byte cancels uvicorn's keep-alive timer) all
stay open for good. :class:`HeaderTimeoutProtocol` closes such a connection ``header_timeout``
seconds after it opened, or after the first byte of its next request arrived.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from orchestra import logs
from orchestra.config import ServerSettings

log = logs.get("orchestra.http")


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request's headers."""

    #: Seconds a request's headers may take to arrive; :func:`server_config` sets it.
    header_timeout: float = 10.0

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # Part of a request's headers (after a keep-alive pause, the first part): keep the
            # timer that runs, or start one.
            if self._header_timer is None and not self.transport.is_closing():
                self._start_header_timer()
        else:
            # The headers are in: the request is the application's now (or the connection is
            # closing, or switching protocol).
            self._stop_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            host, port = self.client or ("", 0)
            log.info("http.header_timeout", client=f"{host}:{port}", seconds=self.header_timeout)
            self.transport.close()


def server_config(app: Any, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration that serves ``app`` as ``settings`` say.

    Args:
        app: The ASGI application.
        settings: ``[server]``: where to listen, and the connection limits.
        options: Further ``uvicorn.Config`` options.
    """
    protocol = type(
        "HeaderTimeoutProtocol",
        (HeaderTimeoutProtocol,),
        {"header_timeout": settings.header_timeout},
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        timeout_keep_alive=settings.keepalive_timeout,
        # uvicorn counts the connection asking among those open (``>= limit``), so one more
        # serves exactly max_connections at once; a request on a connection beyond them gets
        # 503 and the connection is closed.
        limit_concurrency=settings.max_connections + 1,
        log_config=None,
        lifespan="on",
        **options,
    )
