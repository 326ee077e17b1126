"""The HTTP server as ``orchestra serve`` configures it (api/server.py).

Each protocol, h11 and httptools (the ``fast`` extra; skipped when it is not installed),
closes a connection whose request headers do not arrive within ``header_timeout`` and leaves
alone one that is idle between requests; the access log is written only when asked for.
A tiny ASGI app stands in for the service: what is tested is the server around it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import structlog
import uvicorn

from orchestra import logs
from orchestra.api.server import HeaderTimeoutProtocol, httptools_protocol, server_config
from orchestra.config import LoggingSettings, ServerSettings
from tests.fixtures.servers import free_socket, wait_until

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
#: How much later than its timeout the server may close a connection (2 busy cores).
MARGIN = 3.0
HAS_HTTPTOOLS = importlib.util.find_spec("httptools") is not None
PROTOCOLS = [
    "h11",
    pytest.param(
        "httptools",
        marks=pytest.mark.skipif(not HAS_HTTPTOOLS, reason="httptools is not installed"),
    ),
]
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers every request with 200 "ok"."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def serving(protocol: str = "auto") -> AsyncIterator[Connection]:
    """The app served as :func:`server_config` says (with ``protocol``'s header deadline);
    yields a connection to it."""
    settings = ServerSettings(
        header_timeout=HEADER_TIMEOUT, body_timeout=BODY_TIMEOUT, keepalive_timeout=30
    )
    config = server_config(app, settings)
    if protocol != "auto":
        base = HeaderTimeoutProtocol if protocol == "h11" else httptools_protocol()
        assert base is not None
        timeouts = {"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT}
        config.http = type(base.__name__, (base,), timeouts)
    sock = free_socket()
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started or task.done(), timeout=15)
        host, port = sock.getsockname()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            yield reader, writer
        finally:
            writer.close()
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)
        sock.close()


async def get(conn: Connection) -> bytes:
    """Send a whole request on the connection; the answer's body."""
    reader, writer = conn
    writer.write(REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    assert head.startswith(b"HTTP/1.1 200 ")
    return await asyncio.wait_for(reader.readexactly(2), timeout=10)


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Wait (at most the header timeout plus the margin) for the server to close the
    connection; what it sent before closing."""
    received = b""
    async with asyncio.timeout(HEADER_TIMEOUT + MARGIN):
        while chunk := await reader.read(65536):
            received += chunk
    return received


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_request_whose_headers_stall_is_closed_after_the_header_timeout(
    protocol: str,
) -> None:
    async with serving(protocol) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
        assert await closed_by_server(reader) == b""


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_kept_alive_connection_that_starts_a_request_and_stalls_is_closed(
    protocol: str,
) -> None:
    async with serving(protocol) as conn:
        assert await get(conn) == b"ok"
        conn[1].write(b"G")
        assert await closed_by_server(conn[0]) == b""


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_the_rest_of_a_body_left_unread_must_keep_arriving_after_the_answer(
    protocol: str,
) -> None:
    """The app answers without reading the body; the body's rest then stops arriving (after
    a byte, which cancels uvicorn's keep-alive timer): the connection is closed after the
    body timeout."""
    async with serving(protocol) as (reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\nab")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.readexactly(2), timeout=10) == b"ok"
        for _ in range(3):  # while it keeps arriving, the connection stays
            await asyncio.sleep(BODY_TIMEOUT / 2)
            writer.write(b"c")
        assert not reader.at_eof()
        assert await closed_by_server(reader) == b""


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_idle_kept_alive_connection_outlives_the_header_timeout(protocol: str) -> None:
    async with serving(protocol) as conn:
        assert await get(conn) == b"ok"
        # Idle between requests is the keep-alive timeout's business (30 s here), not the
        # header deadline's: the time itself is what is tested.
        await asyncio.sleep(HEADER_TIMEOUT * 3)
        assert await get(conn) == b"ok"
        assert await get(conn) == b"ok"


def test_httptools_parses_requests_when_it_is_installed() -> None:
    protocol = server_config(app, ServerSettings()).http
    assert isinstance(protocol, type)
    expected = httptools_protocol() if HAS_HTTPTOOLS else HeaderTimeoutProtocol
    assert expected is not None and issubclass(protocol, expected)


@pytest.mark.parametrize("access_log", [False, True])
async def test_the_access_log_is_written_only_when_asked_for(access_log: bool) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    access = logging.getLogger("uvicorn.access")
    saved = (root.handlers[:], root.level, access.propagate, structlog.get_config())
    try:
        logs.setup(LoggingSettings(format="json", access_log=access_log), out)
        async with serving() as conn:
            assert await get(conn) == b"ok"
    finally:
        root.handlers[:], level, access.propagate, config = saved
        root.setLevel(level)
        structlog.configure(**config)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    requests = [line["event"] for line in lines if line["logger"] == "uvicorn.access"]
    assert len(requests) == (1 if access_log else 0)
    assert all(r.endswith(' - "GET / HTTP/1.1" 200') for r in requests)
