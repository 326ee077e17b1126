"""Two Orchestra processes on one database, one ``every: 2s`` schedule, for a minute: each
tick makes exactly one task (none twice, none missed), whichever process fires it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from orchestra.domain import iso
from orchestra.schedules import parse_time
from tests.conftest import sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import free_port, start_process, wait_until, write_config

#: Ticks in the minute the test watches (every 2 s).
TICKS = 30


def fired_events(log: Path) -> list[dict[str, object]]:
    """The ``schedule.fired`` events a process logged (its log is JSON lines)."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "schedule.fired":
                events.append(event)
    return events


@pytest.mark.empty_database
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_two_processes_fire_each_tick_of_an_every_2s_schedule_exactly_once(
    tmp_path: Path, db_url: str, fake_ollama: FakeOllama
) -> None:
    configs = []
    for name in ("a", "b"):
        config = tmp_path / f"{name}.toml"
        write_config(config, port=free_port(), db=db_url, ollama_url=fake_ollama.url)
        configs.append(config)
    # Together: one migrates the database while the other waits for its lock.
    procs = list(await asyncio.gather(*(start_process(c) for c in configs)))
    port = int(configs[0].read_text().split("port = ")[1].split()[0])
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            made = await client.post(
                "/api/v1/schedules",
                json={
                    "name": "pulse",
                    "template": "summarize",
                    "params": {"text": "tick"},
                    "every": "2s",
                    "overlap": "allow",  # every tick must make a task
                },
            )
            assert made.status_code == 201, made.text
            anchor = parse_time(made.json()["created_at"])
            expected = [iso(anchor + timedelta(seconds=2 * k)) for k in range(1, TICKS + 1)]

            def fired() -> int:
                return int(sql_rows(db_url, "SELECT count(*) FROM schedule_fires")[0][0])

            await wait_until(lambda: fired() >= TICKS, timeout=TICKS * 2 + 30, interval=0.5)
            paused = await client.patch("/api/v1/schedules/pulse", json={"enabled": False})
            assert paused.status_code == 200
            for proc in procs:
                assert proc.returncode is None
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        await asyncio.gather(*(asyncio.wait_for(p.wait(), timeout=30) for p in procs))

    rows = sql_rows(db_url, "SELECT fire_at, outcome, task_id FROM schedule_fires ORDER BY fire_at")
    ticks = [r[0] for r in rows]
    assert ticks[:TICKS] == expected  # none missed, in order, on the anchored ticks
    assert ticks == [iso(anchor + timedelta(seconds=2 * k)) for k in range(1, len(ticks) + 1)]
    assert {r[1] for r in rows} == {"submitted"}
    task_ids = [r[2] for r in rows]
    assert len(set(task_ids)) == len(rows) and None not in task_ids  # one task per tick
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(len(rows),)]
    # Each process logged the ticks it fired; together, each tick once.
    by_process = [fired_events(c.with_suffix(".log")) for c in configs]
    logged = sorted(str(e["tick"]) for events in by_process for e in events)
    assert logged == ticks
    print(f"ticks fired by process a: {len(by_process[0])}, by b: {len(by_process[1])}")
