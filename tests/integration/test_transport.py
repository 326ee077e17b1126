"""The sharded transport under the shared client: spreads requests, loses no count."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from orchestra.llm.transport import ShardedTransport
from tests.fixtures.fake_ollama import running_fake_ollama
from tests.fixtures.servers import free_port

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_requests_spread_over_pools_and_all_run_at_once() -> None:
    transport = ShardedTransport(max_connections=40, pool_size=8)
    assert transport.pools == 5
    async with (
        running_fake_ollama(latency=0.3) as fake,
        httpx.AsyncClient(transport=transport, timeout=10) as client,
    ):

        async def call() -> int:
            async with client.stream("POST", f"{fake.url}/api/chat", json=CHAT) as response:
                lines = [line async for line in response.aiter_lines() if line]
                return len(lines)

        started = asyncio.get_running_loop().time()
        counts = await asyncio.gather(*(call() for _ in range(40)))
        elapsed = asyncio.get_running_loop().time() - started
        assert all(n > 1 for n in counts)
        # Forty 0.3 s calls on forty connections overlap: all in flight together.
        assert fake.max_in_flight == 40
        assert elapsed < 0.3 * 3
        assert transport.in_flight == (0,) * 5


async def test_counts_come_back_after_failures_and_early_close() -> None:
    transport = ShardedTransport(max_connections=4, pool_size=2)
    async with (
        running_fake_ollama() as fake,
        httpx.AsyncClient(transport=transport, timeout=5) as client,
    ):
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{free_port()}/")
        async with client.stream("POST", f"{fake.url}/api/chat", json=CHAT) as response:
            async for _line in response.aiter_lines():
                break  # closed before the end of the body
        assert transport.in_flight == (0, 0)
        assert (await client.get(f"{fake.url}/api/version")).status_code == 200
        assert transport.in_flight == (0, 0)
