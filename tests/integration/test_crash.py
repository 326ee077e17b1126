"""The crash test: kill -9 the server mid-run, start it again on the same database; every task
ends succeeded, none is lost, none succeeds twice."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from tests.conftest import sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import free_port, start_process, wait_until, write_config

TASKS = 300


def counts(db_url: str) -> dict[str, int]:
    return dict(sql_rows(db_url, "SELECT status, count(*) FROM tasks GROUP BY status"))


@pytest.mark.slow
async def test_sigkill_mid_run_loses_nothing_and_finishes_nothing_twice(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    fake_ollama.latency = 0.2
    # Leases of a second, reaped and polled five times a second.
    port, config = free_port(), tmp_path / "crash.toml"
    quick = {"lease_seconds": 1.0, "reap_interval": 0.2, "poll_interval": 0.2}
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, concurrency=8, **quick)
    first = await start_process(config)
    try:
        # 300 submits at once queue for the client's 100 connections: on a loaded machine
        # (PostgreSQL, three test processes on 2 cores) that wait passed httpx's default 5 s.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            body = {"template": "summarize", "params": {"text": "crash me"}}
            responses = await asyncio.gather(
                *(client.post("/api/v1/tasks", json=body) for _ in range(TASKS))
            )
        assert all(r.status_code == 201 for r in responses)
        await wait_until(lambda: counts(db_url).get("succeeded", 0) >= 60, timeout=30)
        await wait_until(lambda: fake_ollama.in_flight > 0, timeout=5)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    at_kill = counts(db_url)
    assert at_kill.get("running", 0) > 0, "the kill should interrupt running tasks"
    assert at_kill.get("queued", 0) > 0

    second = await start_process(config)
    try:
        await wait_until(lambda: counts(db_url) == {"succeeded": TASKS}, timeout=60, interval=0.1)
    finally:
        second.send_signal(signal.SIGTERM)
        await second.wait()

    wins = sql_rows(
        db_url,
        "SELECT task_id, count(*) FROM task_attempts WHERE status = 'succeeded' GROUP BY task_id",
    )
    [lost] = sql_rows(db_url, "SELECT count(*) FROM task_attempts WHERE status = 'lost'")
    [stuck] = sql_rows(db_url, "SELECT count(*) FROM task_attempts WHERE status = 'running'")
    assert len(wins) == TASKS
    assert {n for _, n in wins} == {1}, "no task may succeed twice"
    assert lost[0] == at_kill["running"], "every interrupted attempt is recorded as lost"
    assert stuck == (0,)


async def test_a_lone_process_restarted_after_kill_9_takes_its_tasks_back_at_once(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    """A lone process SIGKILLed mid-task and started again on the same machine: its task ran
    again only once its lease expired (60 s here), while newer tasks ran. The new process
    knows the old one is dead (this machine, this pid namespace, its pid gone) and takes the
    task back as it starts; the lost attempt counts and says so."""
    port, config = free_port(), tmp_path / "restart.toml"
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, lease_seconds=60)
    fake_ollama.close_gate("llama3.2")
    first = await start_process(config)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            body = {"template": "summarize", "params": {"text": "crash me"}}
            task_id = (await client.post("/api/v1/tasks", json=body)).json()["id"]
            await wait_until(lambda: fake_ollama.held("llama3.2") == 1, timeout=10)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    fake_ollama.open_gate("llama3.2")
    second = await start_process(config)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            done = (await client.get(f"/api/v1/tasks/{task_id}?wait=15")).json()
    finally:
        second.send_signal(signal.SIGTERM)
        await second.wait()
    assert done["status"] == "succeeded", done
    lost, won = done["attempts"]
    assert lost["status"] == "lost" and won["status"] == "succeeded"
    dead = lost["worker"].split(":")[1]
    said = f"the process running this attempt died (pid {dead}, gone when pid"
    assert lost["error"]["message"].startswith(said), lost
