"""How httpx's connection pool holds up under concurrent requests (the model-call path).

Starts benchmarks/fake_model.py (latency 0), sends N streaming /api/chat requests with C in
flight through one ``httpx.AsyncClient`` on the plain transport, then through Orchestra's
``ShardedTransport``, and prints requests/s, p50 and the worst case of each.

    python benchmarks/httpx_probe.py --requests 3000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from common import fake_model

from orchestra.llm.transport import ShardedTransport

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def probe(url: str, transport: httpx.AsyncBaseTransport, n: int, c: int) -> str:
    latencies: list[float] = []
    sent = 0
    async with httpx.AsyncClient(transport=transport, timeout=60) as client:

        async def one_client() -> None:
            nonlocal sent
            while sent < n:
                sent += 1
                start = time.perf_counter()
                async with client.stream("POST", f"{url}/api/chat", json=BODY) as response:
                    async for _ in response.aiter_lines():
                        pass
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(c)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return (
        f"{n / elapsed:.0f} requests/s, p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
        f"worst {latencies[-1] * 1000:.0f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    n, c = args.requests, args.concurrency
    with fake_model(0, Path(tempfile.mkdtemp())) as url:
        plain = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=2 * c, max_keepalive_connections=c)
        )
        print(f"one pool, {c} in flight:     ", await probe(url, plain, n, c))
        sharded = ShardedTransport(max_connections=2 * c)
        print(f"sharded ({sharded.pools} pools), {c} in flight:", await probe(url, sharded, n, c))
        print("one at a time:               ", await probe(url, httpx.AsyncHTTPTransport(), 500, 1))


if __name__ == "__main__":
    asyncio.run(main())
