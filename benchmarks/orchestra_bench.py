"""Orchestra's hot path, measured: each workload starts its own service on a fresh SQLite file.

The service runs as `orchestra serve` in a child process, against benchmarks/fake_model.py in
another; the load comes from this process over loopback HTTP. Results are printed as JSON.

    python benchmarks/orchestra_bench.py [--tasks 5000] [--only throughput,pickup,...,submit_read]
        [--processes N]   # `serve --processes N` (each workload's figures then cover all N)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    TEXT,
    Sampler,
    TaskApi,
    busy_share,
    fake_model,
    free_port,
    process,
    rss_mb,
    submit_many,
    submit_read_workload,
    summary_ms,
    tree,
    wait_count,
    wait_http,
)

CLIENTS = 64
#: Service processes (`orchestra serve --processes`); set from --processes.
PROCESSES = 1
#: The built-in template asks for temperature 0, so the cache of model answers (docs/cache.md)
#: would answer every task after the first; each task here calls the model, as the classic
#: stack's do.
BODY = {"template": "summarize", "params": {"text": TEXT, "sentences": 1}, "cache": False}
#: Orchestra's API as the submit-and-read client drives it.
API = TaskApi(
    submit="/api/v1/tasks",
    read="/api/v1/tasks/{id}",
    finished=frozenset({"succeeded", "failed", "cancelled"}),
    succeeded="succeeded",
)


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@contextmanager
def service(model_url: str, folder: Path, concurrency: int) -> Iterator[tuple[str, int, Path]]:
    """`orchestra serve` on a fresh database; yields (URL, pid, database path)."""
    port = free_port()
    db = folder / f"orchestra-{port}.db"
    config = folder / f"orchestra-{port}.toml"
    config.write_text(
        f"[server]\nport = {port}\nprocesses = {PROCESSES}\n"
        f'[database]\nurl = "sqlite+aiosqlite:///{db}"\n'
        f"[workers]\nconcurrency = {concurrency}\n"
        f'[providers.ollama]\nurl = "{model_url}"\n'
        "[providers.embedded]\nenabled = false\n"
        # Per-task log lines are not what is measured here (the classic stack runs at
        # warning too).
        '[logging]\nlevel = "warning"\nformat = "json"\n'
    )
    args = [sys.executable, "-m", "orchestra", "serve", "--config", str(config)]
    with process(args, folder / f"orchestra-{port}.log") as proc:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health")
        _wait_serving(proc.pid, db)
        yield url, proc.pid, db


def _wait_serving(pid: int, db: Path, timeout: float = 60) -> None:
    """With several processes, /health answers once the first serves: wait until every one
    has the database open (its start is then nearly done), and a second more."""
    if PROCESSES == 1:
        return
    deadline = time.monotonic() + timeout

    def opened(child: int) -> bool:
        with contextlib.suppress(OSError):
            return any(str(db) in os.readlink(f) for f in Path(f"/proc/{child}/fd").iterdir())
        return False

    while sum(opened(child) for child in tree([pid])) < PROCESSES:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{PROCESSES} processes did not start within {timeout} s")
        time.sleep(0.05)
    time.sleep(1.0)


async def _submit(client: httpx.AsyncClient, _i: int) -> int:
    response = await client.post("/api/v1/tasks", json=BODY)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def _count_finished(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM tasks WHERE status IN ('succeeded','failed','cancelled')"
        ).fetchone()
    return int(row[0])


async def _wait_finished(db: Path, n: int) -> float:
    """The time ``n`` tasks had finished (polled every 20 ms)."""
    return await wait_count(lambda: _count_finished(db), n, "tasks finished")


def _failed(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(
            conn.execute("SELECT count(*) FROM tasks WHERE status != 'succeeded'").fetchone()[0]
        )


async def throughput(folder: Path, n: int, concurrency: int) -> dict[str, Any]:
    """Workload 1 (and the memory under it): n tasks from 64 clients, model latency 0."""
    with fake_model(0, folder) as model, service(model, folder, concurrency) as (url, pid, db):
        await asyncio.sleep(1.0)
        idle = rss_mb([pid])
        with Sampler([pid]) as sampler:
            first, last, _ = await submit_many(n, CLIENTS, BODY, url)
            done = await _wait_finished(db, n)
        return {
            "tasks": n,
            "clients": CLIENTS,
            "workers": concurrency,
            "tasks_per_s": round(n / (done - first), 1),
            "submits_per_s": round(n / (last - first), 1),
            "seconds": round(done - first, 2),
            "not_succeeded": _failed(db),
            "rss_idle_mb": idle,
            "rss_peak_mb": sampler.peak,
        }


async def pickup(folder: Path, rate: float = 50, seconds: float = 10) -> dict[str, Any]:
    """Workload 2: a steady rate of tasks; from the enqueue commit to the worker starting it."""
    with fake_model(0, folder) as model, service(model, folder, 4) as (url, _pid, db):
        n = int(rate * seconds)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            start = time.monotonic()
            for i in range(n):
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                await _submit(client, i)
        await _wait_finished(db, n)
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT e1.time, e2.time FROM task_events e1 JOIN task_events e2 "
                "ON e1.task_id = e2.task_id AND e1.type = 'task.queued' "
                "AND e2.type = 'task.started'"
            ).fetchall()
        waits = [_seconds(started) - _seconds(queued) for queued, started in rows]
        return {"rate_per_s": rate, **summary_ms(waits)}


async def added(folder: Path, n: int = 300) -> dict[str, Any]:
    """Workload 3: one task at a time; its time in Orchestra minus the model call."""
    with fake_model(0, folder) as model, service(model, folder, 4) as (url, _pid, db):
        client_side: list[float] = []
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for i in range(n):
                sent = time.perf_counter()
                task_id = await _submit(client, i)
                answer = await client.get(f"/api/v1/tasks/{task_id}", params={"wait": 10})
                assert answer.json()["status"] == "succeeded"
                usage = answer.json()["steps"][0]["usage"]
                assert not usage.get("cached"), "answered from the cache: no model call timed"
                model_ms = usage["total_ms"]
                client_side.append(time.perf_counter() - sent - model_ms / 1000)
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT t.created_at, t.finished_at, json_extract(s.usage, '$.total_ms') "
                "FROM tasks t JOIN task_steps s ON s.task_id = t.id"
            ).fetchall()
        server_side = [
            _seconds(finished) - _seconds(created) - (model_ms or 0) / 1000
            for created, finished, model_ms in rows
        ]
        return {"server": summary_ms(server_side), "client": summary_ms(client_side)}


async def slots(
    folder: Path, workers: int = 64, latency_ms: float = 200, rounds: int = 10
) -> dict[str, Any]:
    """Workload 4: a 200 ms model and 64 worker slots; the share of slots kept busy."""
    with fake_model(latency_ms, folder) as model, service(model, folder, workers) as (url, pid, db):
        n = workers * rounds
        with Sampler([pid]) as sampler:
            await submit_many(n, CLIENTS, BODY, url)
            await _wait_finished(db, n)
        share, peak = busy_share(model, workers)
        return {
            "workers": workers,
            "latency_ms": latency_ms,
            "tasks": n,
            "busy_share": share,
            "max_in_flight": peak,
            "rss_peak_mb": sampler.peak,
        }


async def backlog(folder: Path, queued: int = 100_000) -> dict[str, Any]:
    """Workload 5: RSS with 100,000 tasks waiting in the queue (due in an hour)."""
    with fake_model(0, folder) as model, service(model, folder, 4) as (url, pid, db):
        await asyncio.sleep(1.0)
        before = rss_mb([pid])
        later = datetime.fromtimestamp(time.time() + 3600).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        params = json.dumps(BODY["params"])
        with sqlite3.connect(db) as conn:
            conn.executemany(
                "INSERT INTO tasks (template, template_version, status, params, model, "
                "run_at, created_at) VALUES ('summarize', 1, 'queued', ?, 'default', ?, ?)",
                ((params, later, later) for _ in range(queued)),
            )
        # The service goes on claiming and running with the backlog in the table.
        await submit_many(500, CLIENTS, BODY, url)
        await _wait_finished(db, 500)
        await asyncio.sleep(1.0)
        return {"queued": queued, "rss_before_mb": before, "rss_with_backlog_mb": rss_mb([pid])}


async def claim_scale(folder: Path) -> dict[str, Any]:
    """Workload 6: one claim's time with 1,000 and with 1,000,000 rows (most finished)."""
    from orchestra.db import Database, TaskStore
    from orchestra.db.schema import upgrade
    from orchestra.domain import NewTask

    out: dict[str, Any] = {}
    for rows in (1_000, 1_000_000):
        path = folder / f"claim-{rows}.db"
        db = Database(f"sqlite+aiosqlite:///{path}")
        await upgrade(db)
        stamp = "2026-01-01T00:00:00.000000Z"
        with sqlite3.connect(path) as conn:
            conn.executemany(
                "INSERT INTO tasks (template, template_version, status, params, model, result, "
                "attempts, run_at, created_at, started_at, finished_at) "
                "VALUES ('summarize', 1, 'succeeded', '{}', 'default', '\"ok\"', 1, ?, ?, ?, ?)",
                ((stamp, stamp, stamp, stamp) for _ in range(rows - 10)),
            )
        store = TaskStore(db)
        for _ in range(10):
            await store.enqueue(NewTask("summarize", 1, {"text": "x"}, model="default"))
        timings = []
        for i in range(300):
            await store.enqueue(NewTask("summarize", 1, {"text": str(i)}, model="default"))
            started = time.perf_counter()
            claimed = await store.claim("bench", 1, 30)
            timings.append(time.perf_counter() - started)
            assert len(claimed) == 1
        await db.close()
        out[str(rows)] = summary_ms(timings)
    out["ratio_p50"] = round(out["1000000"]["p50_ms"] / out["1000"]["p50_ms"], 2)
    return out


async def submit_read(folder: Path, n: int, workers: int = 64) -> dict[str, Any]:
    """Issue 17's workload: n tasks submitted and each read over HTTP (`GET ?wait=`), 64 in
    flight, model latency 0; then idle round trips. The same client as classic_bench.py's."""
    with fake_model(0, folder) as model, service(model, folder, workers) as (url, pid, _):
        figures = await submit_read_workload(
            url, {"service": pid}, API, BODY, n, CLIENTS, model=model
        )
        return {"workers": workers, **figures}


WORKLOADS = {
    "throughput": lambda folder, args: throughput(folder, args.tasks, args.workers),
    "pickup": lambda folder, args: pickup(folder),
    "added": lambda folder, args: added(folder),
    "slots": lambda folder, args: slots(folder),
    "backlog": lambda folder, args: backlog(folder),
    "claim_scale": lambda folder, args: claim_scale(folder),
    "submit_read": lambda folder, args: submit_read(folder, args.tasks),
}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--only", default=",".join(WORKLOADS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--processes", type=int, default=1, help="serve --processes N")
    args = parser.parse_args()
    global PROCESSES
    PROCESSES = args.processes
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="orchestra-bench-") as tmp:
        for name in args.only.split(","):
            started = time.monotonic()
            results[name] = await WORKLOADS[name](Path(tmp), args)
            results[name]["bench_seconds"] = round(time.monotonic() - started, 1)
            print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    asyncio.run(main())
