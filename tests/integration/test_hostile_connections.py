"""Slow and idle connections are bounded (issue 16, item 7): a connection that never finishes
its headers is closed after ``[server] header_timeout``, an idle kept-alive one after
``keepalive_timeout``, and beyond ``max_connections`` requests get 503.

The service runs as its own process (tests/fixtures/hostile.py); its ``[server]`` settings come
from ``ORCHESTRA_SERVER__*`` variables, which the child process inherits (the fixture's file
already has a ``[server]`` table, which TOML does not let ``extra_toml`` open again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.hostile import HostileService, hostile_service
from tests.fixtures.servers import wait_until

HEADER_TIMEOUT = 2
KEEPALIVE_TIMEOUT = 1
#: How much later than its timeout the service may close a connection (2 busy cores).
MARGIN = 3.0

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
async def svc(
    tmp_path: Path, fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[HostileService]:
    """The service with short header and keep-alive timeouts."""
    monkeypatch.setenv("ORCHESTRA_SERVER__HEADER_TIMEOUT", str(HEADER_TIMEOUT))
    monkeypatch.setenv("ORCHESTRA_SERVER__KEEPALIVE_TIMEOUT", str(KEEPALIVE_TIMEOUT))
    async with hostile_service(tmp_path, fake_ollama.url) as service:
        yield service


async def connect(service: HostileService) -> Connection:
    url = urlsplit(service.url)
    return await asyncio.open_connection(url.hostname, url.port)


async def get_health(conn: Connection) -> int:
    """Send GET /health on a kept-alive connection and read the whole answer; its status."""
    reader, writer = conn
    writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await asyncio.wait_for(reader.readexactly(length), timeout=10)
    return status


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Wait (at most ``timeout`` seconds) for the service to close the connection; what it
    sent before closing."""
    received = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


async def slowloris(service: HostileService, timeout: float) -> tuple[float, bytes]:
    """Connect, start a request and send one more header line a second, never finishing the
    headers, until the service closes the connection; (seconds it stayed open, what the
    service sent)."""
    loop = asyncio.get_running_loop()
    # Before connecting: the service's timer starts when it accepts, and this loop may get
    # back to a connection well after that (200 of them at once, on busy cores: all 200 were
    # once stamped 0.7 s late, and looked closed 0.7 s early).
    started = loop.time()
    reader, writer = await connect(service)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    line = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    received = await closed_by_server(reader, 1.0)
                except TimeoutError:
                    line += 1
                    try:
                        writer.write(b"X-Slow-%d: still coming\r\n" % line)
                        await writer.drain()
                    except ConnectionError:
                        received = b""
                    else:
                        continue
                return loop.time() - started, received
    finally:
        writer.close()


async def test_slowloris_connections_are_closed_after_the_header_timeout_and_health_holds(
    svc: HostileService,
) -> None:
    async with svc.watch() as watch:
        results = await asyncio.gather(
            *(slowloris(svc, HEADER_TIMEOUT + MARGIN) for _ in range(200))
        )
    watch.assert_held()
    open_for = [seconds for seconds, _ in results]
    assert all(received == b"" for _, received in results)
    # Closed by the header timeout: not at once, and not long after it.
    assert min(open_for) > HEADER_TIMEOUT - 0.5, min(open_for)
    assert max(open_for) < HEADER_TIMEOUT + MARGIN, max(open_for)


async def test_idle_and_stalled_connections_are_closed(svc: HostileService) -> None:
    """A new connection that sends nothing, and a kept-alive one that starts its next request
    and stalls (any byte cancels uvicorn's keep-alive timer), are closed after the header
    timeout; a kept-alive one that stays idle, after the keep-alive timeout."""
    loop = asyncio.get_running_loop()

    # Each clock starts before the service's can (see slowloris): a late start here would
    # make a connection look closed early.
    async def silent() -> float:
        started = loop.time()
        reader, writer = await connect(svc)
        try:
            assert await closed_by_server(reader, HEADER_TIMEOUT + MARGIN) == b""
        finally:
            writer.close()
        return loop.time() - started

    async def kept_alive(then_send: bytes) -> float:
        reader, writer = await connect(svc)
        try:
            started = loop.time()
            assert await get_health((reader, writer)) == 200
            writer.write(then_send)
            await writer.drain()
            assert await closed_by_server(reader, HEADER_TIMEOUT + MARGIN) == b""
        finally:
            writer.close()
        return loop.time() - started

    nothing, idle, stalled = await asyncio.gather(silent(), kept_alive(b""), kept_alive(b"G"))
    assert HEADER_TIMEOUT - 0.5 < nothing < HEADER_TIMEOUT + MARGIN
    assert HEADER_TIMEOUT - 0.5 < stalled < HEADER_TIMEOUT + MARGIN
    # Well before uvicorn's own default of 5 s: the setting is at work.
    assert KEEPALIVE_TIMEOUT - 0.5 < idle < 5 - 0.5


async def test_beyond_max_connections_requests_get_503_until_connections_close(
    tmp_path: Path, fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHESTRA_SERVER__MAX_CONNECTIONS", "20")
    monkeypatch.setenv("ORCHESTRA_SERVER__KEEPALIVE_TIMEOUT", "60")
    async with hostile_service(tmp_path, fake_ollama.url) as svc:
        held: list[Connection] = []
        try:
            for _ in range(20):
                held.append(await connect(svc))
                assert await get_health(held[-1]) == 200
            for _ in range(3):
                extra = await connect(svc)
                try:
                    assert await get_health(extra) == 503
                    assert await closed_by_server(extra[0], MARGIN) == b""
                finally:
                    extra[1].close()
            # The connections within the limit are served as before.
            for conn in held:
                assert await get_health(conn) == 200
        finally:
            for _, writer in held:
                writer.close()

        async def answers() -> bool:
            conn = await connect(svc)
            try:
                return await get_health(conn) == 200
            finally:
                conn[1].close()
                with contextlib.suppress(ConnectionError):
                    await conn[1].wait_closed()

        await wait_until(answers, timeout=10, interval=0.05)


BODY_TIMEOUT = 2


@pytest.fixture
async def slow_body_svc(
    tmp_path: Path, fake_ollama: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[HostileService]:
    """The service with a short body timeout and room for 20 connections."""
    monkeypatch.setenv("ORCHESTRA_SERVER__BODY_TIMEOUT", str(BODY_TIMEOUT))
    monkeypatch.setenv("ORCHESTRA_SERVER__MAX_CONNECTIONS", "20")
    async with hostile_service(tmp_path, fake_ollama.url) as service:
        yield service


async def start_post(service: HostileService, path: str, length: int, first: bytes) -> Connection:
    """Connect and send a POST's headers (saying ``length`` bytes of body) and ``first``."""
    conn = await connect(service)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    )
    conn[1].write(head.encode() + first)
    await conn[1].drain()
    return conn


async def trickled(service: HostileService, path: str, every: float) -> tuple[float, bytes]:
    """POST to ``path`` saying a body of 1000 bytes, and send one byte each ``every`` seconds
    (none after the first when ``every`` is 0) until the service closes the connection;
    (seconds it stayed open, what the service sent)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await start_post(service, path, 1000, b"k")
    received = b""
    try:
        async with asyncio.timeout(BODY_TIMEOUT + MARGIN):
            while True:
                try:
                    async with asyncio.timeout(every or None):
                        while chunk := await reader.read(65536):
                            received += chunk
                        return loop.time() - started, received
                except TimeoutError:
                    with contextlib.suppress(ConnectionError):
                        writer.write(b"e")
                        await writer.drain()
                except ConnectionResetError:
                    return loop.time() - started, received
    finally:
        writer.close()


@pytest.mark.parametrize("path", ["/api/v1/tasks", "/ui/login"])
async def test_a_body_that_stops_arriving_is_answered_408_and_its_connection_closed(
    slow_body_svc: HostileService, path: str
) -> None:
    seconds, received = await trickled(slow_body_svc, path, every=0)
    assert BODY_TIMEOUT - 0.5 < seconds < BODY_TIMEOUT + MARGIN, seconds
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received
    assert b"connection: close" in head.lower()
    if path.startswith("/ui"):  # the dashboard's own error page
        assert b"text/html" in head and b"<html" in body.lower(), received
    else:
        assert json.loads(body)["code"] == "body_timeout"


async def test_a_body_sent_slowly_but_steadily_is_served(slow_body_svc: HostileService) -> None:
    """The timeout is between two reads, not for the whole body (as nginx's)."""
    body = b'{"template": "no-such-template", "params": {}}'
    reader, writer = await start_post(slow_body_svc, "/api/v1/tasks", len(body), b"")
    try:
        for piece in (body[:10], body[10:20], body[20:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(BODY_TIMEOUT * 0.6)  # the pace tested: longer in all than it
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 404 "), head


async def test_trickled_logins_are_cut_and_health_answers_again(
    slow_body_svc: HostileService,
) -> None:
    """More trickled logins than max_connections, a byte a second (within the timeout
    between reads): the login's whole body must arrive within the body timeout."""
    results = await asyncio.gather(*(trickled(slow_body_svc, "/ui/login", 1.0) for _ in range(25)))
    # Those the service took are answered 408, the rest refused 503 (over the limit); a
    # byte sent just as the service closed may reset the connection before its answer is read.
    answered = [received for _, received in results if received]
    assert all(r.startswith((b"HTTP/1.1 408 ", b"HTTP/1.1 503 ")) for r in answered)
    assert max(seconds for seconds, _ in results) < BODY_TIMEOUT + MARGIN
    response = await slow_body_svc.client.get("/health")
    assert response.status_code == 200


FORM = {"content-type": "application/x-www-form-urlencoded"}


async def test_a_large_login_form_is_refused_413_before_it_is_parsed(
    slow_body_svc: HostileService,
) -> None:
    """The login's form is the only body read before any credential: 2 MB of ``a=&a=&…``
    (under max_body_bytes) held the event loop for seconds while it was parsed. It is refused
    from its Content-Length, and, sent in chunks without one, once over the cap; /health
    answers meanwhile."""
    big = b"a=&" * 700_000

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"a=&" * 1000

    async with slow_body_svc.watch() as watch:
        whole = await slow_body_svc.client.post("/ui/login", content=big, headers=FORM)
        chunked = await slow_body_svc.client.post("/ui/login", content=chunks(), headers=FORM)
    watch.assert_held()
    for refused in (whole, chunked):
        assert refused.status_code == 413
        assert refused.headers["content-type"].startswith("text/html")
    # A form under the cap is read as before (no key: the page says so).
    small = await slow_body_svc.client.post("/ui/login", content=b"key=&next=", headers=FORM)
    assert small.status_code in (401, 303), small.text
