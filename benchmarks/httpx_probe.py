"""What a model call costs the service's Python, on each transport the shared client can have.

Starts benchmarks/fake_model.py (latency 0, its own process) and makes Ollama /api/chat calls
through ``OllamaProvider`` (the service's own code path: httpx's client, the transport, JSON
decoding), answered whole and streamed, one at a time and many in flight. For each transport it
prints the CPU this process spent per call (user + system, so the loopback socket's kernel work
counts too; the median of ``--rounds`` rounds) and, with many in flight, calls/s and the
slowest call:

- ``httpx``: one ``httpx.AsyncHTTPTransport`` pool (httpx's default);
- ``sharded``: ``ShardedTransport``, httpx's transport split into pools of eight;
- ``lean``: ``LeanTransport``, what the service uses for ``http://`` model servers;
- ``no network``: a transport that answers from memory, the floor: what httpx's client and
  the provider cost without any transport.

Last, each transport alone (``handle_async_request`` and reading the body, no client, no
provider), one call at a time: what the transport itself adds.

    .venv/bin/python benchmarks/httpx_probe.py [--calls 3000] [--concurrency 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fake_model  # noqa: E402

from orchestra.llm.base import ChatMessage, ChatRequest  # noqa: E402
from orchestra.llm.lean_transport import LeanTransport  # noqa: E402
from orchestra.llm.ollama import OllamaProvider  # noqa: E402
from orchestra.llm.transport import ShardedTransport  # noqa: E402

REQUEST = ChatRequest(model="m", messages=(ChatMessage(role="user", content="Summarize: hi"),))
_DONE = b'"done":true,"done_reason":"stop","prompt_eval_count":20,"eval_count":6}'
_WHOLE = b'{"model":"m","message":{"role":"assistant","content":"A short summary."},' + _DONE
_LINES = (
    b'{"model":"m","done":false,"message":{"role":"assistant","content":"A short summary."}}\n'
    b'{"model":"m","message":{"role":"assistant","content":""},' + _DONE + b"\n"
)


class InMemory(httpx.AsyncBaseTransport):
    """Answers every chat from memory, as the fake model would: no sockets at all."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        streamed = b'"stream":true' in request.content
        return httpx.Response(200, content=_LINES if streamed else _WHOLE)


TRANSPORTS: dict[str, Callable[[int], httpx.AsyncBaseTransport]] = {
    "httpx": lambda n: httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n)
    ),
    "sharded": lambda n: ShardedTransport(max_connections=n),
    "lean": lambda n: LeanTransport(max_connections=n),
    "no network": lambda n: InMemory(),
}


async def one_round(
    url: str, transport: httpx.AsyncBaseTransport, calls: int, in_flight: int, streamed: bool
) -> tuple[float, float, float]:
    """(ms of CPU per call, calls/s, slowest call in ms) over ``calls`` calls."""
    on_text: Callable[[str], None] | None = (lambda _text: None) if streamed else None
    slowest = 0.0
    async with httpx.AsyncClient(transport=transport, timeout=60) as client:
        provider = OllamaProvider("ollama", client, url, timeout=60)
        for _ in range(min(100, calls)):  # warm up: connections, caches
            await provider.chat(REQUEST, on_text)
        left = calls

        async def caller() -> None:
            nonlocal left, slowest
            while left > 0:
                left -= 1
                started = time.perf_counter()
                await provider.chat(REQUEST, on_text)
                slowest = max(slowest, time.perf_counter() - started)

        cpu, wall = os.times(), time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(in_flight)))
        wall, after = time.perf_counter() - wall, os.times()
    spent = (after.user - cpu.user) + (after.system - cpu.system)
    return spent / calls * 1000, calls / wall, slowest * 1000


async def transport_alone(url: str, transport: httpx.AsyncBaseTransport, calls: int) -> float:
    """ms of CPU per request sent straight to ``transport``, one at a time."""
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false}'
    timeout = {"connect": 60, "read": 60, "write": 60, "pool": 60}
    request = httpx.Request(
        "POST", f"{url}/api/chat", content=body, extensions={"timeout": timeout}
    )

    async def call() -> None:
        response = await transport.handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        async for _chunk in response.stream:
            pass
        await response.stream.aclose()

    async with transport:
        for _ in range(min(100, calls)):
            await call()
        before = os.times()
        for _ in range(calls):
            await call()
        after = os.times()
    return ((after.user - before.user) + (after.system - before.system)) / calls * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(TRANSPORTS), default=list(TRANSPORTS))
    args = parser.parse_args()
    with fake_model(0, Path(tempfile.mkdtemp())) as url:
        for in_flight in (1, args.concurrency):
            for streamed in (False, True):
                how = "streamed" if streamed else "whole"
                print(f"\n{in_flight} in flight, answers {how}: CPU per call (median of rounds)")
                for name in args.only:
                    rounds = [
                        await one_round(
                            url,
                            TRANSPORTS[name](2 * in_flight),
                            args.calls,
                            in_flight,
                            streamed,
                        )
                        for _ in range(args.rounds)
                    ]
                    cpu = statistics.median(r[0] for r in rounds)
                    spread = f"{min(r[0] for r in rounds):.2f}–{max(r[0] for r in rounds):.2f}"
                    rate = statistics.median(r[1] for r in rounds)
                    worst = max(r[2] for r in rounds)
                    print(
                        f"  {name:<11} {cpu:5.2f} ms ({spread}), {rate:6.0f} calls/s, "
                        f"slowest {worst:6.1f} ms"
                    )
        print("\nthe transport alone, one at a time, answers whole: CPU per request")
        for name in args.only:
            if name != "no network":
                cpus = [
                    await transport_alone(url, TRANSPORTS[name](2), args.calls)
                    for _ in range(args.rounds)
                ]
                print(f"  {name:<11} {statistics.median(cpus):5.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
