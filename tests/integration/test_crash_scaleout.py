"""Three processes on one database (either engine), one SIGKILLed mid-run: 2,000 tasks on
PostgreSQL (600 on SQLite), none lost, none finished twice — the attempt records say so."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from tests.conftest import sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.postgres import ON_POSTGRESQL
from tests.fixtures.servers import free_port, start_process, wait_until, write_config

#: The figure the scale-out issue names is PostgreSQL's. On SQLite the three processes take
#: turns at one file's write lock, and 2,000 tasks cost 109 s of a test process (a sixth of
#: the suite's time); 600 still leave 400 to finish after the kill (it comes at 200 done).
TASKS = 2000 if ON_POSTGRESQL else 600
PROCESSES = 3


def counts(db_url: str) -> dict[str, int]:
    return dict(sql_rows(db_url, "SELECT status, count(*) FROM tasks GROUP BY status"))


def running_on(db_url: str, pid: int) -> int:
    """Attempts running in the process ``pid`` (its worker name holds its pid)."""
    rows = sql_rows(
        db_url,
        "SELECT count(*) FROM task_attempts WHERE status = 'running' AND worker LIKE ?",
        (f"%:{pid}:%",),
    )
    return int(rows[0][0])


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_three_processes_one_killed_lose_nothing_and_finish_nothing_twice(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    # Long enough calls that every process has tasks in flight whenever one is killed.
    fake_ollama.latency = 0.2
    quick = {"lease_seconds": 1.0, "reap_interval": 0.2, "poll_interval": 0.2, "concurrency": 16}
    ports = [free_port() for _ in range(PROCESSES)]
    configs = []
    for n, port in enumerate(ports):
        config = tmp_path / f"p{n}.toml"
        write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, **quick)
        configs.append(config)
    processes = [await start_process(c) for c in configs]
    victim = processes[2]
    body = {"template": "summarize", "params": {"text": "scale me"}}

    async def submit_all() -> list[httpx.Response]:
        """Every task, through the two processes that live (the victim's workers are woken
        by the others' submits)."""
        limits = httpx.Limits(max_connections=32)
        timeout = httpx.Timeout(60)  # 2,000 requests queue for 64 connections
        clients = [
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=timeout)
            for port in ports[:2]
        ]

        async def submit(i: int) -> httpx.Response:
            # A connection the server closes under load is retried, as a client does; the
            # idempotency key makes the retry safe (it never queues a second task).
            headers = {"Idempotency-Key": f"task-{i}"}
            for attempt in range(3):
                try:
                    return await clients[i % 2].post("/api/v1/tasks", json=body, headers=headers)
                except httpx.TransportError:
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.2)
            raise AssertionError("unreachable")

        try:
            return await asyncio.gather(*(submit(i) for i in range(TASKS)))
        finally:
            for client in clients:
                await client.aclose()

    try:
        submitting = asyncio.create_task(submit_all())
        await wait_until(lambda: counts(db_url).get("succeeded", 0) >= 200, timeout=60)
        await wait_until(lambda: running_on(db_url, victim.pid) > 0, timeout=30)
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        responses = await submitting
        assert {r.status_code for r in responses} <= {200, 201}, {r.status_code for r in responses}
        assert len({r.json()["id"] for r in responses}) == TASKS
        await wait_until(lambda: counts(db_url) == {"succeeded": TASKS}, timeout=150, interval=0.2)
    finally:
        for proc in processes:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in processes:
            await proc.wait()

    wins = sql_rows(
        db_url,
        "SELECT task_id, count(*) FROM task_attempts WHERE status = 'succeeded' GROUP BY task_id",
    )
    assert len(wins) == TASKS  # every task succeeded in some attempt...
    assert {n for _, n in wins} == {1}  # ...and in exactly one
    workers = sql_rows(db_url, "SELECT DISTINCT worker FROM task_attempts")
    assert len(workers) == PROCESSES  # all three worked
    lost = sql_rows(
        db_url,
        "SELECT count(*) FROM task_attempts WHERE status = 'lost' AND worker LIKE ?",
        (f"%:{victim.pid}:%",),
    )
    assert lost[0][0] > 0  # the victim's running attempts were taken back by the others
    # Each lost attempt's task ended in a later attempt, run by a process still alive.
    unfinished_losses = sql_rows(
        db_url,
        "SELECT count(*) FROM task_attempts AS l WHERE l.status = 'lost' AND NOT EXISTS ("
        "SELECT 1 FROM task_attempts AS w WHERE w.task_id = l.task_id "
        "AND w.status = 'succeeded' AND w.number > l.number)",
    )
    assert unfinished_losses[0][0] == 0
