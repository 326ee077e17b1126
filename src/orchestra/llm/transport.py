"""The transport under the service's one shared ``httpx.AsyncClient``: its connections, split
into small pools.

Why: httpcore's pool checks every pooled connection (a ``getpeername`` and a readability poll
each) whenever a request starts or ends, so its cost per request grows with the number of
connections. With 64 model calls in flight on one pool, a local server that answers at once
got 286 requests/s and some calls waited 4.7 s (encode/httpx#3215); the same load over eight
pools of eight connections got 740/s with a worst case of 0.35 s
(``benchmarks/httpx_probe.py``). ``ShardedTransport`` keeps the
one client (one place for timeouts, one ``aclose``) and gives each request to the pool with the
fewest requests in flight, so every pool stays small and busy. ``benchmarks/`` measures it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import httpx

#: Connections per pool: small enough that the per-request scan stays cheap.
POOL_SIZE = 8


class _Counted(httpx.AsyncByteStream):
    """A response body that tells its pool when it is closed (the request is over then)."""

    def __init__(self, stream: httpx.AsyncByteStream, in_flight: list[int], index: int) -> None:
        self._stream = stream
        self._in_flight = in_flight
        self._index = index
        self._open = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if self._open:
            self._open = False
            self._in_flight[self._index] -= 1
        await self._stream.aclose()


class ShardedTransport(httpx.AsyncBaseTransport):
    """Several ``httpx.AsyncHTTPTransport`` pools behind one transport."""

    def __init__(self, max_connections: int, pool_size: int = POOL_SIZE) -> None:
        shards = max(1, math.ceil(max_connections / pool_size))
        per_pool = math.ceil(max_connections / shards)
        limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
        self._pools = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(shards)]
        self._in_flight = [0] * shards

    @property
    def pools(self) -> int:
        """How many pools the connections are split into."""
        return len(self._pools)

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Requests under way in each pool (a request ends when its response is closed)."""
        return tuple(self._in_flight)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the pool with the fewest requests in flight."""
        index = min(range(len(self._pools)), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        try:
            response = await self._pools[index].handle_async_request(request)
        except BaseException:
            self._in_flight[index] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Counted(response.stream, self._in_flight, index)
        return response

    async def aclose(self) -> None:
        """Close every pool's connections."""
        for pool in self._pools:
            await pool.aclose()
