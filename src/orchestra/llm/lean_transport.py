"""HTTP/1.1 over asyncio streams for plain-HTTP model servers: ``LeanTransport``.

Why: a model call through httpx's own transport spends most of its Python in httpcore (h11's
state machine, anyio's stream wrappers, the pool's per-request bookkeeping), several times what
httpx's client layer and the provider cost together. A local model server speaks plain
HTTP/1.1 on a loopback or LAN address; reading its answers needs little more than
``readuntil(b"\\r\\n\\r\\n")`` and a length or a chunk size. ``benchmarks/httpx_probe.py``
measures both transports; the figures are in ``benchmarks/RESULTS.md``.

What it does: one keep-alive pool of connections per host and port (the most recently used is
taken first, so the warm ones stay warm; those idle longer than ``keepalive_expiry``, or closed
by the server, are dropped), at most ``max_connections`` requests at once (a request holds its
slot until its response is closed), request bodies whole or chunked, response bodies framed by
Content-Length, chunked encoding, or the end of the connection, streamed as they arrive. httpx's
connect, read, write and pool timeouts apply as they do on its own transport. Every failure is
the httpx exception httpcore would raise for it (``ConnectError``, ``ReadTimeout``,
``RemoteProtocolError``…), so the providers' error handling does not know which transport ran.

A request on a reused connection that the server had already closed (the close and the request
crossed on the wire) is sent once more on a new connection, as long as no byte of an answer
came back and its body can be sent again. A server that did take the request and then hung up
without a word gets it twice, which a task's own retries allow already.

What it leaves to httpx: other schemes (``https://`` goes to ``fallback``), proxies (the
client's ``mounts``, see :mod:`orchestra.llm.transport`), content decoding (gzip), cookies,
redirects. HTTP/1.0 servers work, without keep-alive. Upgrades (101) are refused.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import AsyncIterator

import httpx

from orchestra.tls import client_context

#: Seconds an idle connection is kept (httpcore's default).
KEEPALIVE_EXPIRY = 5.0
#: Most bytes one read of a body returns.
READ_SIZE = 64 * 1024
#: Longest response head (status line and headers) or chunk-size line accepted.
HEAD_LIMIT = 64 * 1024

_Address = tuple[str, int]
_NO_BODY_STATUS = frozenset({204, 304})


class _StaleConnection(Exception):
    """A reused connection was closed by the server before any byte of an answer came back."""


class _Connection:
    """One TCP connection to a server."""

    __slots__ = ("address", "idle_since", "reader", "writer")

    def __init__(
        self, address: _Address, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.address = address
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def reusable(self, now: float, expiry: float) -> bool:
        """Still open, and not idle for too long."""
        return (
            now - self.idle_since < expiry
            and not self.reader.at_eof()
            and self.reader.exception() is None
            and not self.writer.is_closing()
        )

    def close(self) -> None:
        self.writer.close()


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 for ``http://`` URLs over asyncio streams; other schemes go to ``fallback``."""

    def __init__(
        self,
        max_connections: int = 100,
        fallback: httpx.AsyncBaseTransport | None = None,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._fallback = fallback or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=max_connections), verify=client_context()
        )
        self._expiry = keepalive_expiry
        self._idle: dict[_Address, deque[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._closed = False

    @property
    def connections(self) -> int:
        """Connections open now (in use or idle)."""
        return len(self._open)

    @property
    def idle(self) -> int:
        """Connections open and waiting for a request."""
        return sum(len(idle) for idle in self._idle.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and return its response with the body still to be read."""
        url = request.url
        if url.scheme != "http":
            return await self._fallback.handle_async_request(request)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        await self._take_slot(request, timeouts.get("pool"))
        try:
            address = (url.raw_host.decode("ascii"), url.port or 80)
            head = _request_head(request)
            try:
                body: bytes | None = request.content
            except httpx.RequestNotRead:
                body = None  # a streamed body: sent as it comes, and only once
            connection = self._reuse(address)
            if connection is not None:
                try:
                    return await self._exchange(connection, request, head, body, timeouts, True)
                except _StaleConnection:
                    if body is None:
                        raise httpx.RemoteProtocolError(
                            "Server disconnected without sending a response.", request=request
                        ) from None
            connection = await self._connect(address, request, timeouts.get("connect"))
            return await self._exchange(connection, request, head, body, timeouts, False)
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        """Close every connection, and the fallback's."""
        self._closed = True
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()
        await self._fallback.aclose()

    async def _take_slot(self, request: httpx.Request, timeout: float | None) -> None:
        if not self._slots.locked():
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(timeout):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout("no connection free in time", request=request) from exc

    def _reuse(self, address: _Address) -> _Connection | None:
        idle = self._idle.get(address)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.reusable(now, self._expiry):
                return connection
            self._discard(connection)
        return None

    def finished(self, connection: _Connection, reusable: bool) -> None:
        """A response is closed: keep its connection for the next request or close it, and
        free its slot."""
        if reusable and not self._closed:
            self._put_back(connection)
        else:
            self._discard(connection)
        self._slots.release()

    def _put_back(self, connection: _Connection) -> None:
        now = time.monotonic()
        connection.idle_since = now
        idle = self._idle.setdefault(connection.address, deque())
        idle.append(connection)
        # The oldest wait at the left: drop the expired ones, so a burst's extra connections
        # do not stay open for good.
        while idle and now - idle[0].idle_since >= self._expiry:
            self._discard(idle.popleft())

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._open.discard(connection)

    async def _connect(
        self, address: _Address, request: httpx.Request, timeout: float | None
    ) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await _open_connection(*address)
        except TimeoutError as exc:
            raise httpx.ConnectTimeout("timed out while connecting", request=request) from exc
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
        connection = _Connection(address, reader, writer)
        self._open.add(connection)
        return connection

    async def _exchange(
        self,
        connection: _Connection,
        request: httpx.Request,
        head: bytes,
        body: bytes | None,
        timeouts: dict[str, float | None],
        reused: bool,
    ) -> httpx.Response:
        """Write the request, read the response's head; the body is read by the response."""
        read_timeout = timeouts.get("read")
        try:
            try:
                await self._send(connection, request, head, body, timeouts.get("write"))
                async with asyncio.timeout(read_timeout):
                    version, status, reason, headers = await _read_head(connection.reader)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                if reused and not getattr(exc, "partial", b""):
                    raise _StaleConnection from exc
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request
                ) from exc
            except _WriteTimeout as exc:
                raise httpx.WriteTimeout("timed out while writing", request=request) from exc
            except TimeoutError as exc:
                raise httpx.ReadTimeout("timed out while reading", request=request) from exc
            except OSError as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
            except (ValueError, asyncio.LimitOverrunError) as exc:
                raise httpx.RemoteProtocolError(
                    f"malformed response head: {exc}", request=request
                ) from exc
            stream = _Body(self, connection, request, status, headers, version, read_timeout)
        except BaseException:
            self._discard(connection)
            raise
        return httpx.Response(
            status,
            headers=headers,
            stream=stream,
            extensions={"http_version": version, "reason_phrase": reason},
        )

    async def _send(
        self,
        connection: _Connection,
        request: httpx.Request,
        head: bytes,
        body: bytes | None,
        timeout: float | None,
    ) -> None:
        """Write the request (a lost connection raises ``ConnectionError``, as a read would)."""
        writer = connection.writer
        if body is not None:
            if len(body) < READ_SIZE:
                writer.write(head + body)  # one send for the usual small JSON body
            else:
                writer.write(head)
                writer.write(body)
            await _drain(writer, timeout)
            return
        writer.write(head)
        chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
        async for part in request.stream:  # type: ignore[union-attr]
            if part:
                writer.write(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
                await _drain(writer, timeout)
        if chunked:
            writer.write(b"0\r\n\r\n")
        await _drain(writer, timeout)


class _WriteTimeout(Exception):
    """Writing the request took longer than the write timeout."""


async def _drain(writer: asyncio.StreamWriter, timeout: float | None) -> None:
    """Wait until the kernel took what was written, when it has not taken it all already."""
    if writer.transport.get_write_buffer_size() == 0 and not writer.is_closing():
        return
    try:
        async with asyncio.timeout(timeout):
            await writer.drain()
    except TimeoutError as exc:
        raise _WriteTimeout from exc


async def _open_connection(
    host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the first of ``host``'s addresses that answers; if none does, raise the
    first one's error (asyncio's own would merge them into one without an errno, and the
    providers' messages name the errno: "Connection refused")."""
    loop = asyncio.get_running_loop()
    first: OSError | None = None
    for family, _type, _proto, _name, sockaddr in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        try:
            return await asyncio.open_connection(
                str(sockaddr[0]), port, family=family, limit=HEAD_LIMIT
            )
        except OSError as exc:
            first = first or exc
    raise first or OSError(f"no address for {host}")


def _request_head(request: httpx.Request) -> bytes:
    """The request line and headers, as httpx prepared them (Host, Content-Length…)."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode("ascii"), request.url.raw_path)]
    lines += [b"%s: %s" % (name, value) for name, value in request.headers.raw]
    head = b"\r\n".join(lines)
    if head.count(b"\n") != len(lines) - 1 or head.count(b"\r") != len(lines) - 1:
        raise httpx.LocalProtocolError("a header holds a line break", request=request)
    return head + b"\r\n\r\n"


async def _read_head(
    reader: asyncio.StreamReader,
) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    """(HTTP version, status, reason, headers) of the next final response (1xx are skipped)."""
    while True:
        lines = (await reader.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(code) != 3:
            raise ValueError(f"bad status line {lines[0][:80]!r}")
        status = int(code)
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in b" \t" or line[:1] in b" \t":
                raise ValueError(f"bad header line {line[:80]!r}")
            headers.append((name, value.strip(b" \t")))
        if status == 101:
            raise ValueError("the server switched protocols")
        if status >= 200:
            return version, status, reason, headers


class _Body(httpx.AsyncByteStream):
    """A response body, read as it arrives; closing it gives its connection back."""

    def __init__(
        self,
        transport: LeanTransport,
        connection: _Connection,
        request: httpx.Request,
        status: int,
        headers: list[tuple[bytes, bytes]],
        version: bytes,
        read_timeout: float | None,
    ) -> None:
        self._transport = transport
        self._connection: _Connection | None = connection
        self._request = request
        self._timeout = read_timeout
        self._keep_alive = version == b"HTTP/1.1"
        #: Bytes of the body still to come; None: chunked (``_chunked``) or until the end.
        self._left: int | None = None
        self._chunked = False
        self._chunk_left = 0
        self._in_chunk = False
        self._complete = False
        length: bytes | None = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                if length is not None and value != length:
                    raise httpx.RemoteProtocolError("conflicting Content-Length", request=request)
                length = value
            elif lower == b"transfer-encoding":
                if value.lower() != b"chunked":
                    raise httpx.RemoteProtocolError(
                        f"unsupported Transfer-Encoding {value[:40]!r}", request=request
                    )
                self._chunked = True
            elif lower == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    self._keep_alive = False
                elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                    self._keep_alive = True
        if request.method == "HEAD" or status in _NO_BODY_STATUS:
            self._left = 0
        elif self._chunked:
            pass
        elif length is not None:
            if not length.isdigit():
                raise httpx.RemoteProtocolError(
                    f"bad Content-Length {length[:40]!r}", request=request
                )
            self._left = int(length)
        else:
            self._keep_alive = False  # the body ends when the connection does
        if self._left == 0:
            self._complete = True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._complete or self._connection is None:
            raise StopAsyncIteration
        request = self._request
        try:
            async with asyncio.timeout(self._timeout):
                data = await self._read(self._connection.reader)
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out while reading", request=request) from exc
        except asyncio.IncompleteReadError as exc:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body", request=request
            ) from exc
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise httpx.RemoteProtocolError(
                f"malformed chunked body: {exc}", request=request
            ) from exc
        if not data:
            raise StopAsyncIteration
        return data

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        """The next piece of the body; b"" at its end (``_complete`` is set then)."""
        if self._chunked:
            return await self._read_chunk(reader)
        if self._left is None:
            data = await reader.read(READ_SIZE)
            self._complete = not data
            return data
        data = await reader.read(min(self._left, READ_SIZE))
        if not data:
            raise asyncio.IncompleteReadError(b"", self._left)
        self._left -= len(data)
        self._complete = self._left == 0
        return data

    async def _read_chunk(self, reader: asyncio.StreamReader) -> bytes:
        if self._chunk_left == 0:
            if self._in_chunk and await reader.readexactly(2) != b"\r\n":
                raise ValueError("a chunk does not end with CRLF")
            line = await reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)  # ValueError when it is no number
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers: not used
                self._complete = True
                return b""
            self._chunk_left = size
            self._in_chunk = True
        data = await reader.read(min(self._chunk_left, READ_SIZE))
        if not data:
            raise asyncio.IncompleteReadError(b"", self._chunk_left)
        self._chunk_left -= len(data)
        return data

    async def aclose(self) -> None:
        """Give the connection back when the body was read to its end, else close it."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        self._transport.finished(connection, reusable=self._complete and self._keep_alive)
