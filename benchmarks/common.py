"""What every benchmark needs: processes it starts and stops, a load generator, statistics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
TEXT = (
    "Orchestra runs AI tasks from YAML templates. It keeps its queue in SQLite and needs no "
    "broker. Workers claim tasks with one atomic UPDATE and hold a lease while they run."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Wait until ``url`` answers (any status)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout} s") from None
            time.sleep(0.05)


@contextmanager
def process(args: list[str], log: Path, **kwargs: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Run a child process (in its own process group); stop it and its children at the end."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def fake_model(latency_ms: float, log_dir: Path) -> Iterator[str]:
    """The fake Ollama on a free port; yields its URL."""
    port = free_port()
    args = [sys.executable, str(HERE / "fake_model.py"), "--port", str(port)]
    args += ["--latency", str(latency_ms)]
    with process(args, log_dir / f"fake-model-{port}.log"):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/api/version")
        yield url


def tree(pids: list[int]) -> list[int]:
    """The processes and all their descendants that are still running (from /proc)."""
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        seen.append(pid)
        todo += [int(c) for c in children]
    return seen


def rss_mb(pids: list[int]) -> float:
    """Resident memory of processes and all their descendants, in MB (from /proc)."""
    total = 0
    for pid in tree(pids):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return round(total / 1024, 1)


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time so far of processes and their running descendants (from
    /proc; every thread counted, in clock ticks of usually 10 ms)."""
    ticks = 0
    for pid in tree(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class Sampler:
    """Samples RSS of some processes in the background; keeps the peak of their sum and of
    each one (with its descendants)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = 0.0
        self.peaks = dict.fromkeys(pids, 0.0)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            each = {pid: rss_mb([pid]) for pid in self.pids}
            self.peak = max(self.peak, round(sum(each.values()), 1))
            self.peaks = {pid: max(self.peaks[pid], each[pid]) for pid in self.pids}
            await asyncio.sleep(0.1)

    def __enter__(self) -> Sampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float]:
    """p50/p99/mean of seconds, as milliseconds."""
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 3),
        "p99_ms": round(percentile(values, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3) if values else float("nan"),
        "n": len(values),
    }


class Connection:
    """A minimal HTTP/1.1 keep-alive client connection: the load generator must not be what a
    benchmark measures (httpx's pool tops out near 350 requests/s with 64 concurrent
    requests on this machine, with multi-second stalls)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send a request (``body`` as JSON); returns (status, decoded JSON body)."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        self._writer.write(head.encode() + payload)
        lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        if "content-length" in headers:
            data = await self._reader.readexactly(int(headers["content-length"]))
        else:  # chunked
            data = b""
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self._reader.readexactly(size + 2)
                if size == 0:
                    break
                data += chunk[:-2]
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, json.loads(data) if data else None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


async def submit_many(
    n: int, clients: int, body: dict[str, Any], base: str
) -> tuple[float, float, list[Any]]:
    """``n`` POSTs of ``body`` to /api/v1/tasks from ``clients`` concurrent keep-alive
    connections. Returns (time of the first submit, time the last was answered, the answers).
    """
    host, port = base.removeprefix("http://").split(":")
    answers: list[Any] = [None] * n
    counter = iter(range(n))

    async def one_client() -> None:
        conn = Connection(host, int(port))
        try:
            for i in counter:
                status, answer = await conn.request("POST", "/api/v1/tasks", body)
                if status != 201:
                    raise RuntimeError(f"submit answered {status}: {answer}")
                answers[i] = answer
        finally:
            await conn.close()

    first = time.time()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    last = time.time()
    return first, last, answers


@dataclass(frozen=True)
class TaskApi:
    """How a stack takes a task and answers for it over HTTP, for the client both share:
    ``POST submit`` answers 201 with the task's ``id``; ``GET read?wait=S`` (``{id}`` in
    ``read``) answers 200 with its ``status`` once it is one of ``finished``, or after S
    seconds with whatever it is then."""

    submit: str
    read: str
    finished: frozenset[str]
    succeeded: str


async def submit_and_read(
    conn: Connection, api: TaskApi, body: Any, wait: float = 30
) -> tuple[str, int]:
    """One task: submit it, then ``GET …?wait=`` until it has finished. Returns (its final
    status, how many GETs that took)."""
    status, answer = await conn.request("POST", api.submit, body)
    if status != 201:
        raise RuntimeError(f"submit answered {status}: {answer}")
    path = f"{api.read.format(id=answer['id'])}?wait={wait:g}"
    reads = 0
    while True:
        status, answer = await conn.request("GET", path)
        reads += 1
        if status != 200:
            raise RuntimeError(f"read answered {status}: {answer}")
        if answer["status"] in api.finished:
            return str(answer["status"]), reads


async def submit_and_read_many(
    n: int, clients: int, body: Any, base: str, api: TaskApi
) -> dict[str, Any]:
    """``n`` tasks from ``clients`` concurrent keep-alive connections, each submitting a task
    and reading it until it has finished before the next: ``clients`` tasks in flight."""
    host, port = base.removeprefix("http://").split(":")
    counter = iter(range(n))
    reads = not_succeeded = 0

    async def one_client() -> None:
        nonlocal reads, not_succeeded
        conn = Connection(host, int(port))
        try:
            for _ in counter:
                status, count = await submit_and_read(conn, api, body)
                reads += count
                not_succeeded += status != api.succeeded
        finally:
            await conn.close()

    started = time.time()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    seconds = time.time() - started
    return {"seconds": seconds, "reads": reads, "not_succeeded": not_succeeded}


async def round_trips(n: int, body: Any, base: str, api: TaskApi) -> list[float]:
    """``n`` tasks one after the other on one keep-alive connection, the stack otherwise idle:
    each one's time from sending the submit to reading it finished, in seconds."""
    host, port = base.removeprefix("http://").split(":")
    conn = Connection(host, int(port))
    times = []
    try:
        for _ in range(n):
            sent = time.perf_counter()
            await submit_and_read(conn, api, body)
            times.append(time.perf_counter() - sent)
    finally:
        await conn.close()
    return times


def _model_cpu(model: str | None) -> float:
    """The fake model's CPU time so far (0 without one)."""
    return float(httpx.get(f"{model}/stats").json()["cpu_seconds"]) if model else 0.0


async def submit_read_workload(
    base: str,
    roles: dict[str, int],
    api: TaskApi,
    body: Any,
    n: int,
    clients: int = 64,
    rounds: int = 300,
    model: str | None = None,
) -> dict[str, Any]:
    """Issue 17's side-by-side workload, the same for every stack: ``n`` tasks submitted and
    read over HTTP with ``clients`` in flight, then ``rounds`` idle round trips. ``roles``
    names the stack's processes (each counted with its descendants) for the service CPU and
    RSS figures.

    ``model``: the fake model's URL, to report what the measuring instruments (this client
    and the fake model) cost the machine's cores per task too, and the throughput those
    cores allow (``ceiling_tasks_per_s``: all cores over all the CPU a task costs)."""
    pids = list(roles.values())
    load_average = round(os.getloadavg()[0], 2)
    # Warm up (connections, threads, caches) with the same client before counting anything.
    await submit_and_read_many(2 * clients, clients, body, base, api)
    await round_trips(10, body, base, api)
    await asyncio.sleep(0.5)
    before = {role: cpu_seconds([pid]) for role, pid in roles.items()}
    model_before = _model_cpu(model)
    client_before = time.process_time()
    with Sampler(pids) as sampler:
        load = await submit_and_read_many(n, clients, body, base, api)
    client_cpu = time.process_time() - client_before
    cpu = {role: cpu_seconds([pid]) - before[role] for role, pid in roles.items()}
    model_cpu = _model_cpu(model) - model_before
    whole = sum(cpu.values()) + client_cpu + model_cpu
    await asyncio.sleep(0.5)
    idle = await round_trips(rounds, body, base, api)
    return {
        "tasks": n,
        "clients": clients,
        "tasks_per_s": round(n / load["seconds"], 1),
        "seconds": round(load["seconds"], 2),
        "reads_per_task": round(load["reads"] / n, 3),
        "not_succeeded": load["not_succeeded"],
        "cpu_ms_per_task": round(sum(cpu.values()) / n * 1000, 3),
        "cpu_ms_per_task_by_process": {r: round(v / n * 1000, 3) for r, v in cpu.items()},
        "cores_used": round(sum(cpu.values()) / load["seconds"], 2),
        "client_cpu_ms_per_task": round(client_cpu / n * 1000, 3),
        **(
            {
                "model_cpu_ms_per_task": round(model_cpu / n * 1000, 3),
                "ceiling_tasks_per_s": round(n * len(os.sched_getaffinity(0)) / whole, 1),
            }
            if model
            else {}
        ),
        "idle_round_trip": summary_ms(idle),
        "rss_peak_mb": sampler.peak,
        "rss_peak_mb_by_process": {r: sampler.peaks[pid] for r, pid in roles.items()},
        "load_average": load_average,
    }


async def wait_count(count: Callable[[], int], n: int, what: str, timeout: float = 900) -> float:
    """Poll ``count()`` every 20 ms until it reaches ``n``; the time it did."""
    deadline = time.monotonic() + timeout
    while (seen := count()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {seen} of {n} {what}")
        await asyncio.sleep(0.02)
    return time.time()


def busy_share(model_url: str, slots: int) -> tuple[float, int]:
    """From the fake model's stats: the share of ``slots`` kept busy between the first call's
    start and the last call's end, and the most calls in flight at once."""
    stats = httpx.get(f"{model_url}/stats").json()
    window = stats["last_end"] - stats["first_start"]
    return round(stats["busy_seconds"] / (slots * window), 4), int(stats["max_in_flight"])


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform
    from importlib import metadata

    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = {}
    for package in ("litestar", "uvicorn", "sqlalchemy", "aiosqlite", "httpx", "msgspec"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    import sqlite3

    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "packages": versions,
    }
