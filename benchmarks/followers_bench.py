"""Idle event-stream followers: what they cost the service, and how fast one event reaches them.

    python benchmarks/followers_bench.py --out result.json [--followers 1000] [--rounds 5]

Starts ``orchestra serve`` (SQLite, ``[server] max_connections`` raised above the followers:
its default is 1,000) and the fake model, then opens the followers over real HTTP on loopback:
half follow every task (``GET /api/v1/events``), half one task each round
(``GET /api/v1/tasks/{id}/events`` of a task delayed by an hour, so it stays queued and its
stream idle). With every follower connected it samples the service's CPU (utime + stime from
/proc) over ``--idle`` seconds, with nobody following first for comparison. Then each round
cancels that round's task: its one ``task.finished`` event reaches every follower; the latency
of each is the time it is read by the follower minus the event's own time (both this machine's
clock). The followers are plain asyncio sockets in this process, so the client's own reading
(a thousand sockets readable at once, on 2 shared cores) is part of the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, fake_model, free_port, process, summary_ms, wait_http  # noqa: E402


def _config(folder: Path, model: str, port: int, max_connections: int) -> Path:
    config = folder / "orchestra.toml"
    config.write_text(
        f"[server]\nport = {port}\nmax_connections = {max_connections}\n"
        f'[database]\nurl = "sqlite+aiosqlite:///{folder / "bench.db"}"\nmin_free_mb = 0\n'
        "[workers]\nconcurrency = 4\n"
        f'[providers.ollama]\nurl = "{model}"\n'
        "[providers.embedded]\nenabled = false\n"
        '[logging]\nlevel = "warning"\nformat = "json"\n'
    )
    return config


class Countdown:
    """Called once per arrival; ``done`` is set at the last of ``n``."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.done = asyncio.Event()

    def __call__(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set()


class Follower(asyncio.Protocol):
    """One SSE connection; keeps when the ``task.finished`` event of each task arrived. A bare
    protocol: the time is taken as the bytes arrive, before any parsing."""

    def __init__(self, port: int, path: str) -> None:
        self.port, self.path = port, path
        self.connected = asyncio.Event()
        self.arrived: dict[int, float] = {}  # task id -> wall time its task.finished arrived
        self.event_time: dict[int, float] = {}
        self.failed: str | None = None
        self._pending: list[tuple[float, bytes]] = []
        self._transport: asyncio.Transport | None = None
        #: Called as a task.finished event's bytes arrive (the round counts them).
        self.on_finished: Callable[[], None] = lambda: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        seen = time.time()
        if not self.connected.is_set():
            if not data.startswith(b"HTTP/1.1 200 "):
                self.failed = data[:80].decode(errors="replace")
            self.connected.set()
        if b"task.finished" in data:
            self._pending.append((seen, data))  # parsed once all arrived, off the measured path
            self.on_finished()

    def settle(self) -> None:
        """Parse what arrived: the task and time of each task.finished event."""
        for seen, data in self._pending:
            for line in data.split(b"\n"):
                if line.startswith(b"data: {") and b'"task.finished"' in line:
                    event = json.loads(line[6:])
                    task_id = int(event.get("task_id") or self.path.split("/")[4])
                    self.arrived[task_id] = seen
                    self.event_time[task_id] = datetime.fromisoformat(event["time"]).timestamp()
        self._pending.clear()

    @property
    def has_pending(self) -> bool:
        """Whether a task.finished event arrived and is not parsed yet."""
        return bool(self._pending)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, "127.0.0.1", self.port)

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def _idle_cpu(pid: int, seconds: float) -> float:
    """The service's CPU over ``seconds`` of nothing happening, in % of one core."""
    await asyncio.sleep(2.0)  # let connecting settle
    before, started = cpu_seconds([pid]), time.monotonic()
    await asyncio.sleep(seconds)
    return round(100 * (cpu_seconds([pid]) - before) / (time.monotonic() - started), 2)


async def _connect(followers: list[Follower], timeout: float = 120) -> None:
    for i, follower in enumerate(followers):
        await follower.start()
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # not all in one burst: the listen backlog is finite
    async with asyncio.timeout(timeout):
        await asyncio.gather(*(f.connected.wait() for f in followers))
    failed = [f.failed for f in followers if f.failed]
    if failed:
        raise RuntimeError(f"{len(failed)} followers refused: {failed[0]}")


async def measure(port: int, pid: int, followers: int, rounds: int, idle: float) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        nobody = await _idle_cpu(pid, idle)

        async def delayed() -> int:
            body = {"template": "summarize", "params": {"text": "x"}, "delay": 3600}
            answer = await client.post("/api/v1/tasks", json=body)
            answer.raise_for_status()
            return int(answer.json()["id"])

        everything = [Follower(port, "/api/v1/events") for _ in range(followers // 2)]
        await _connect(everything)
        latencies: list[float] = []  # seconds, event time to a follower reading it
        trips: list[float] = []  # seconds, cancel sent to the last follower reading its event
        fan_out_cpu: list[float] = []  # the service's CPU seconds from the cancel to the last
        idle_cpu = None
        reads_open = 0
        for round_ in range(rounds):
            task_id = await delayed()
            own = [
                Follower(port, f"/api/v1/tasks/{task_id}/events")
                for _ in range(followers - len(everything))
            ]
            await _connect(own)
            reads_open = len(everything) + len(own)
            if idle_cpu is None:
                idle_cpu = await _idle_cpu(pid, idle)
            everyone = everything + own
            # The client does nothing but read until every follower has the event: the
            # parsing waits for the last one, so it delays none of them.
            arrivals = Countdown(len(everyone))
            for f in everyone:
                f.on_finished = arrivals
            cpu_before = cpu_seconds([pid])
            sent = time.time()
            (await client.post(f"/api/v1/tasks/{task_id}/cancel")).raise_for_status()
            try:
                async with asyncio.timeout(30):
                    await arrivals.done.wait()
            except TimeoutError:
                missing = sum(not f.has_pending for f in everyone)
                msg = f"round {round_}: {missing} followers never got the event"
                raise RuntimeError(msg) from None
            fan_out_cpu.append(cpu_seconds([pid]) - cpu_before)
            for f in everyone:
                f.settle()
                f.on_finished = lambda: None
            if any(task_id not in f.arrived for f in everyone):
                raise RuntimeError(f"round {round_}: an arrival was not the task's event")
            latencies += [f.arrived[task_id] - f.event_time[task_id] for f in everyone]
            trips.append(max(f.arrived[task_id] for f in everyone) - sent)
            for follower in own:
                follower.stop()
        for follower in everything:
            follower.stop()
    return {
        "followers": reads_open,
        "all_tasks_followers": len(everything),
        "per_task_followers": reads_open - len(everything),
        "rounds": rounds,
        "idle_seconds": idle,
        "idle_cpu_percent_nobody": nobody,
        "idle_cpu_percent": idle_cpu,
        "delivery": summary_ms(latencies),
        "deliveries": len(latencies),
        "cancel_to_last_follower": summary_ms(trips),
        # The service's CPU per delivery (the cancel's request included): what the fan-out
        # costs whatever else runs on the machine.
        "service_cpu_us_per_delivery": round(1e6 * sum(fan_out_cpu) / max(1, len(latencies)), 1),
        "load_average": os.getloadavg()[0],
    }


def markdown(result: dict[str, Any]) -> str:
    """RESULTS.md's section for these figures."""
    d = result["delivery"]
    cpu_ok = result["idle_cpu_percent"] <= 5
    p99_ok = d["p99_ms"] <= 50
    return "\n".join(
        [
            "### Idle event-stream followers (issue 19)",
            "",
            f"{result['followers']:,} SSE followers over HTTP on loopback "
            f"({result['all_tasks_followers']} of `GET /api/v1/events`, "
            f"{result['per_task_followers']} of one task's `/events`), all served by the one "
            "reader of the process (`benchmarks/followers_bench.py`). CPU: the service's "
            f"utime + stime over {result['idle_seconds']:.0f} s with nothing happening. "
            f"Delivery: one event per round ({result['rounds']} rounds, "
            f"{result['deliveries']:,} deliveries), from the event's time to the follower "
            "reading it, the client's own reading included.",
            "",
            "| figure | measured | target | met |",
            "|---|---|---|---|",
            f"| service CPU, idle, no follower | {result['idle_cpu_percent_nobody']} % of a core "
            "| | |",
            f"| service CPU, idle, {result['followers']:,} followers | "
            f"**{result['idle_cpu_percent']} %** of a core | ≤ 5 % | "
            f"{'yes' if cpu_ok else '**no**'} |",
            f"| one event to every follower, p50 | {d['p50_ms']} ms | | |",
            f"| one event to every follower, p99 | **{d['p99_ms']} ms** | ≤ 50 ms | "
            f"{'yes' if p99_ok else '**no**'} |",
            f"| service CPU per delivery (the cancel included) | "
            f"{result['service_cpu_us_per_delivery']} µs | | |",
            "",
            f"Load average when it ran: {result['load_average']:.1f}.",
            "",
        ]
    )


def main() -> None:
    # Stopped by a signal, still stop the server (the context managers' exits run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--followers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args()
    # Each follower is a socket here and one in the service (which inherits the limit).
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp, fake_model(0, Path(tmp)) as model:
        folder = Path(tmp)
        port = free_port()
        config = _config(folder, model, port, args.followers * 2 + 100)
        serve = [sys.executable, "-m", "orchestra", "serve", "--config", str(config)]
        with process(serve, folder / "serve.log") as proc:
            wait_http(f"http://127.0.0.1:{port}/health")
            result = asyncio.run(measure(port, proc.pid, args.followers, args.rounds, args.idle))
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))


if __name__ == "__main__":
    main()
