"""The HTTP server: uvicorn, configured from ``[server]``, plus the one bound uvicorn lacks.

uvicorn closes a keep-alive connection left idle for ``timeout_keep_alive`` seconds and answers
503 to a request over its connection limit (``limit_concurrency``). It never times out a
connection that has not finished sending a request's headers, though: a new connection that
sends nothing, one that sends a header line a second and never ends them ("slowloris"), and a
keep-alive connection that sends one byte (any byte cancels uvicorn's keep-alive timer) all
stay open for good. The protocols here close such a connection ``header_timeout`` seconds after
it opened, or after the first byte of its next request arrived.

Nor does it time out a request's body: the app's reads of it do (api/slow_body.py), but a body
the app answered without reading all of it is read on (and dropped) by uvicorn for as long
as its bytes come, however slowly. The protocols here close such a connection when no byte
of that rest came for ``body_timeout`` seconds.

uvicorn parses HTTP with h11 (pure Python), or with httptools (C) when it is installed (the
``fast`` extra, with uvloop, which uvicorn picks up by itself); :func:`server_config` uses
httptools when it can: a request costs the service less CPU (benchmarks/RESULTS.md).

Neither bounds a request's headers as a whole: h11 refuses 16 KiB of headers only while they
are incomplete (the same headers arriving in one read pass), httptools never. The protocols
here answer 400 and close the connection when a request's headers (its target, and each header
line's name and value) exceed :data:`MAX_HEAD_BYTES`, or when that much arrived and they are
still incomplete.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from orchestra import logs
from orchestra.config import ServerSettings

log = logs.get("orchestra.http")

#: The largest a request's headers may be, in bytes: its target, and each header line's name
#: and value plus 4 (": " and the line's end). Larger ones are answered 400 (README, Security).
MAX_HEAD_BYTES = 16 * 1024


class HeadersTooLarge(Exception):
    """A request's headers exceed :data:`MAX_HEAD_BYTES` (raised in a parser callback, which
    the parser turns into its own error: uvicorn then answers 400 and closes)."""


def head_line_bytes(name: bytes, value: bytes) -> int:
    """What one header line counts toward :data:`MAX_HEAD_BYTES`."""
    return len(name) + len(value) + 4


class _Deadline:
    """What a deadline mixed into a uvicorn HTTP protocol class uses of the protocol."""

    # The protocol's own, set in its __init__ and connection_made.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    client: tuple[str, int] | None

    def _too_late(self, event: str, seconds: float, **more: Any) -> None:
        """Close the connection (unless it is closing) for a deadline missed: ``event``."""
        if not self.transport.is_closing():
            host, port = self.client or ("", 0)
            log.info(event, client=f"{host}:{port}", seconds=seconds, **more)
            self.transport.close()


class _HeaderDeadline(_Deadline):
    """The header deadline, for a uvicorn HTTP protocol class to mix in. The protocol starts
    the timer when the connection opens, tells :meth:`_headers_pending` after each chunk of
    data whether a request's headers are still incomplete, and stops the timer when the
    connection is lost."""

    #: Seconds a request's headers may take to arrive; :func:`server_config` sets it.
    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def _headers_pending(self, pending: bool) -> None:
        """After a chunk of data: whether a request's headers are still incomplete."""
        if pending:
            # Part of a request's headers (after a keep-alive pause, the first part): keep the
            # timer that runs, or start one.
            if self._header_timer is None and not self.transport.is_closing():
                self._start_header_timer()
        else:
            # The headers are in: the request is the application's now (or the connection is
            # closing, or switching protocol).
            self._stop_header_timer()

    def _start_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._too_late("http.header_timeout", self.header_timeout)


class _BodyDeadline(_Deadline):
    """The deadline for the rest of a body its request's answer left unread, for a uvicorn
    HTTP protocol class to mix in: the protocol tells :meth:`_unread_body` after each chunk
    of data and when an answer ends whether such a rest is still to come; the connection is
    closed when no byte of it came for ``body_timeout`` seconds."""

    #: Seconds between two reads of such a rest; :func:`server_config` sets it.
    body_timeout: float = 30.0
    _body_timer: asyncio.TimerHandle | None = None

    def _unread_body(self, pending: bool) -> None:
        """After a chunk of data, or an answer's end: whether the rest of a body the answer
        left unread is still to come (the timer starts again: bytes came)."""
        self._stop_body_timer()
        if pending and not self.transport.is_closing():
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_too_slow)

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_too_slow(self) -> None:
        self._body_timer = None
        self._too_late("http.body_timeout", self.body_timeout, answered=True)


class _BoundedConnection(h11.Connection):
    """h11's connection, refusing a request whose headers exceed :data:`MAX_HEAD_BYTES`
    (h11 bounds only the headers it is still waiting for, by its
    ``max_incomplete_event_size``)."""

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            size = len(event.target) + sum(head_line_bytes(n, v) for n, v in event.headers)
            if size > MAX_HEAD_BYTES:
                log.info("http.headers_too_large", bytes=size, limit=MAX_HEAD_BYTES)
                # uvicorn answers the protocol error 400 ("Invalid HTTP request received.").
                raise h11.RemoteProtocolError("request headers too large", 431)
        return event


class HeaderTimeoutProtocol(_HeaderDeadline, _BodyDeadline, H11Protocol):
    """uvicorn's HTTP/1.1 protocol on h11 with a deadline for each request's headers, and
    for the rest of a body its answer left unread; the headers' size bounded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _BoundedConnection(h11.SERVER, MAX_HEAD_BYTES)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._headers_pending(self.conn.their_state is h11.IDLE)
        self._unread_body(self._body_after_answer())

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._unread_body(self._body_after_answer())

    def _body_after_answer(self) -> bool:
        answered = self.cycle is not None and self.cycle.response_complete
        return answered and self.conn.their_state is h11.SEND_BODY

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self._stop_body_timer()
        super().connection_lost(exc)


@functools.cache
def httptools_protocol() -> type[asyncio.Protocol] | None:
    """uvicorn's HTTP/1.1 protocol on httptools with a deadline for each request's headers,
    and for the rest of a body its answer left unread; None when httptools is not
    installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HttpToolsHeaderTimeoutProtocol(_HeaderDeadline, _BodyDeadline, HttpToolsProtocol):
        #: Whether a request's headers are incomplete: from the connection's start, and from
        #: the first byte of each request until its headers end (the parser's callbacks).
        _in_headers = True
        #: The current request's headers parsed so far, as :data:`MAX_HEAD_BYTES` counts.
        _head_bytes = 0
        #: Bytes received in reads that began and ended within the current request's
        #: headers (the parser keeps an unfinished header line until its end).
        _pending_bytes = 0
        #: Whether a request began, and whether one's headers ended, during the read being
        #: parsed: what of that read is the current request's (pipelined requests may come
        #: before it in the same read).
        _began = _ended = False
        #: Whether the current request's body is still to come (uvicorn's own flag stops
        #: being kept once the answer is complete).
        _in_body = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_header_timer()

        def data_received(self, data: bytes) -> None:
            self._began = self._ended = False
            super().data_received(data)
            if self._in_headers and not self.transport.is_closing():
                if not self._began:  # all of it the current request's unfinished headers
                    self._pending_bytes += len(data)
                elif not self._ended:  # it began here (after at most a body's last bytes)
                    self._pending_bytes = len(data)
                # else: other requests' heads came first; counted from the next read on
                if self._pending_bytes > MAX_HEAD_BYTES:
                    log.info("http.headers_too_large", bytes=self._pending_bytes)
                    self.send_400_response("Invalid HTTP request received.")
            self._headers_pending(self._in_headers)
            self._unread_body(self._body_after_answer())

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._unread_body(self._body_after_answer())

        def _body_after_answer(self) -> bool:
            answered = self.cycle is not None and self.cycle.response_complete
            return answered and self._in_body

        def _count_head(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > MAX_HEAD_BYTES:
                log.info("http.headers_too_large", bytes=self._head_bytes)
                raise HeadersTooLarge  # uvicorn answers the parser's error 400

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers = self._began = True
            self._head_bytes = self._pending_bytes = 0

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(head_line_bytes(name, value))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._ended = self._in_body = True
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_body = False
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            self._stop_body_timer()
            super().connection_lost(exc)

    return HttpToolsHeaderTimeoutProtocol


def server_config(app: Any, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration that serves ``app`` as ``settings`` say.

    Args:
        app: The ASGI application.
        settings: ``[server]``: where to listen, and the connection limits.
        options: Further ``uvicorn.Config`` options.
    """
    base = httptools_protocol() or HeaderTimeoutProtocol
    timeouts = {"header_timeout": settings.header_timeout, "body_timeout": settings.body_timeout}
    protocol = type(base.__name__, (base,), timeouts)
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


class UvicornNotes(logging.Filter):
    """What uvicorn logs of a start or a stop that the service says better itself.

    - A lifespan that failed with an error the CLI prints itself (a traceback, then
      "Application startup failed") is dropped: one clean message, not a traceback.
    - A request the stop's HTTP drain ended (its cancel, and an answer left unfinished:
      :func:`orchestra.api.app` answers it, or leaves it visibly cut) is a warning: an error
      on every deploy pages whoever alerts on errors.
    """

    def __init__(self, runtime: Any) -> None:
        super().__init__()
        self.runtime = runtime

    def filter(self, record: logging.LogRecord) -> bool:
        if self.runtime.startup_error is not None:
            return False
        if self.runtime.stopping and record.levelno >= logging.ERROR and _at_stop(record):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _at_stop(record: logging.LogRecord) -> bool:
    """Whether ``record`` is uvicorn's word on requests a stop outlived: their cancel, or an
    answer left unfinished."""
    text = record.getMessage()
    return (text.startswith("Cancel ") and "graceful shutdown exceeded" in text) or text.startswith(
        "ASGI callable returned without completing response"
    )


class Stoppable(Protocol):
    """What :class:`Server` tells when a stop signal arrives, and what the supervisor's
    link (:class:`orchestra.supervised.Link`) asks of it (the app's runtime)."""

    def request_stop(self, *, hurry: bool = False) -> None: ...

    @property
    def owner(self) -> str: ...

    async def rescue(self, owner: str, cause: str) -> None: ...


class Server(uvicorn.Server):
    """uvicorn's server, told three things more: on a stop signal the workers stop claiming
    at once (``runtime.request_stop``; uvicorn then drains HTTP, and the lifespan stops the
    pool), a second stop signal skips the waits, and ``on_started`` is called once the
    lifespan started and the server listens.

    Unlike uvicorn's, it does not raise the stop signal again once stopped: a graceful stop
    ends :meth:`run` normally, and ``orchestra serve`` exits 0 (uvicorn's re-raised SIGTERM
    killed it, 143)."""

    def __init__(
        self,
        config: uvicorn.Config,
        runtime: Stoppable,
        on_started: Callable[[Server], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.on_started = on_started
        #: SIGTERMs and SIGINTs this process received.
        self._stop_signals = 0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """SIGTERM or SIGINT (uvicorn's handler for both). The first stops gracefully; a
        second, either one, hurries (:meth:`request_stop`)."""
        self._stop_signals += 1
        hurry = self._stop_signals > 1
        # uvicorn's flags, set here at once (the loop may be busy); not uvicorn's list of
        # signals to raise again after the stop.
        self.should_exit = True
        self.force_exit = self.force_exit or hurry
        stop = functools.partial(self.request_stop, hurry=hurry, signal=signal.Signals(sig).name)
        try:
            asyncio.get_running_loop().call_soon_threadsafe(stop)
        except RuntimeError:  # no loop runs yet (or any more): nothing claims
            pass

    def request_stop(
        self, *, hurry: bool = False, signal: str | None = None, by: str | None = None
    ) -> None:
        """Stop (in the event loop): the workers stop claiming now, uvicorn drains HTTP, the
        lifespan gives running tasks their grace. ``hurry`` skips those waits: uvicorn's for
        open connections, and the workers' grace (running tasks are handed back at once).

        Args:
            hurry: Skip the waits (a second stop signal).
            signal: The signal that asked, for the log.
            by: Who asked, when not a signal to this process (the supervisor).
        """
        said = {k: v for k, v in (("signal", signal), ("by", by)) if v is not None}
        if hurry:
            log.warning("server.stop_hurried", **said, skips="HTTP drain and shutdown_grace")
        else:
            log.info("server.stop_requested", **said)
        self.should_exit = True
        self.force_exit = self.force_exit or hurry
        self.runtime.request_stop(hurry=hurry)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup, then ``on_started`` when it listens; the objects of the started
        service are frozen (:func:`freeze_heap`)."""
        await super().startup(sockets)
        if self.started and self.should_exit:
            # A stop signal while the lifespan started, before there was a pool to tell.
            self.runtime.request_stop(hurry=self.force_exit)
        if self.started:
            # uvicorn says where it listens only on sockets it bound itself: say it here
            # (the port a --port 0 start was given, too).
            log.info("server.listening", urls=_listening(self.servers))
            freeze_heap()
        if self.started and self.on_started is not None:
            self.on_started(self)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown; after a second signal (``force_exit``) uvicorn skips the
        lifespan's shutdown (the loop's end would cancel it: a traceback in the log, the
        database left unclosed): it runs here, hurried (running tasks are handed back at
        once)."""
        await super().shutdown(sockets)
        done = getattr(self.lifespan, "shutdown_event", None)  # uvicorn's LifespanOn
        if self.force_exit and isinstance(done, asyncio.Event) and not done.is_set():
            await self.lifespan.shutdown()


def _listening(servers: list[Any]) -> list[str]:
    """The URLs ``servers`` (asyncio's) listen on: ``http://HOST:PORT``."""
    urls = []
    for server in servers:
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            urls.append(f"http://{f'[{host}]' if ':' in host else host}:{port}")
    return urls


def freeze_heap() -> None:
    """Keep what the started service holds for its whole life out of the garbage collector's
    way.

    Python's full collection walks every object it tracks, on the event loop: with the
    modules, templates and connections of a started service (about 140,000 objects) it held
    the loop for 100–120 ms, and a task submitted meanwhile waited that long to be claimed.
    Frozen (:func:`gc.freeze`), they are never walked again, and a full collection looks only
    at what came later (5 ms). For a process that is the service's own (``orchestra serve``):
    a cycle of frozen objects that later becomes garbage is never collected (the templates
    a SIGHUP reload replaces: a few hundred KB each time)."""
    gc.collect()
    gc.freeze()
    log.info("service.heap_frozen", objects=gc.get_freeze_count())
