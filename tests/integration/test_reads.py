"""The reads the API serves most (a task, its events, a page of tasks). On SQLite they run in one
statement each on the event loop: they answer exactly what the engine's reads answer, and a lock
sends them to a thread instead of holding the loop. On either engine they keep what was
stored."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from orchestra.db import Database, Lease, TaskStore
from orchestra.db.reads import EngineReads, JsonReads
from orchestra.db.schema import upgrade
from orchestra.domain import (
    NewTask,
    Step,
    StepStatus,
    TaskError,
    TaskStatus,
    Usage,
    now,
)
from orchestra.errors import StorageUnavailable
from tests.fixtures.postgres import ON_POSTGRESQL

#: Floats that 15 significant digits (SQLite's json_object) would change.
ODD = 0.1 + 0.2
PROMPT = [{"role": "user", "content": 'say "hi" \\ \u00e9\u4e2d \x00 \U0001f600'}]


def new(template: str = "summarize", **fields: Any) -> NewTask:
    params = {"text": "hello", "n": 2**60, "x": ODD, "nested": {"a": [1, None, True]}}
    return NewTask(template=template, template_version=1, params=params, **fields)


def step(step_id: str, position: int, status: StepStatus, **fields: Any) -> Step:
    return Step(id=step_id, position=position, status=status, **fields)


async def claim(store: TaskStore, task_id: int) -> Lease:
    [claimed] = await store.claim(f"w{task_id}", 1, 30)
    assert claimed.id == task_id
    return Lease(task_id, f"w{task_id}", claimed.attempts)


async def tasks_in_every_state(store: TaskStore) -> dict[str, int]:
    """One task per state a task can be in, with steps, attempts and errors: {name: id}."""
    made: dict[str, int] = {}

    async def add(name: str, task: NewTask) -> int:
        made[name] = (await store.enqueue(task)).task.id
        return made[name]

    later = now() + timedelta(hours=1)
    await add("delayed", new(run_at=later, timeout_seconds=ODD, idempotency_key="k\u00e9y"))

    # Claimed one at a time, oldest first: each claim takes the task just added.
    running = await add("running", new(priority=5))
    lease = await claim(store, running)
    await store.start_step(lease, "first", 0)
    await store.add_text(lease, "first", "partial \u00e9")

    succeeded = await add("succeeded", new("translate", max_attempts=5))
    lease = await claim(store, succeeded)
    usage = Usage(prompt_tokens=3, completion_tokens=4, total_ms=ODD, finish_reason="stop")
    # Positions in the opposite order of the step ids (the primary key's order).
    await store.start_step(lease, "zeta", 0)
    await store.finish_step(
        lease,
        step(
            "zeta",
            0,
            StepStatus.SUCCEEDED,
            output={"text": "hi", "big": 2**60, "f": ODD},
            model="ollama/llama3.2",
            usage=usage,
            finished_at="2026-12-01T00:00:01.000000Z",
            duration_ms=ODD * 1000,
            prompt=PROMPT,
        ),
    )
    await store.start_step(lease, "alpha", 1)
    await store.finish_step(lease, step("alpha", 1, StepStatus.SKIPPED))
    await store.finish(lease, TaskStatus.SUCCEEDED, result={"text": "hi", "f": ODD})

    failed = await add("failed", new())
    lease = await claim(store, failed)
    error = TaskError(type="model_error", message="no such model", step="only")
    await store.start_step(lease, "only", 0)
    await store.finish_step(lease, step("only", 0, StepStatus.FAILED, error=error))
    await store.finish(lease, TaskStatus.FAILED, error=error)

    # Failed once and retried: the second attempt's steps are the task's, both attempts listed.
    retried = await add("retried", new())
    lease = await claim(store, retried)
    flaky = TaskError(type="timeout", message="the model took too long", retryable=True)
    await store.start_step(lease, "only", 0)
    await store.finish_step(lease, step("only", 0, StepStatus.FAILED, error=flaky))
    await store.retry_later(lease, flaky, now() - timedelta(seconds=1))
    lease = await claim(store, retried)
    await store.start_step(lease, "only", 0)

    cancelled = await add("cancelled", new())
    await store.cancel(cancelled)

    asked_to_cancel = await add("asked_to_cancel", new())
    await claim(store, asked_to_cancel)
    await store.cancel(asked_to_cancel)

    lost = await add("lost", new())
    [claimed] = await store.claim("dead", 1, -1)  # its lease has already expired
    assert claimed.id == lost
    await store.requeue_expired()

    # Above the lost task, queued again, so that the claim takes this one.
    handed_back = await add("handed_back", new(priority=1))
    await store.release(await claim(store, handed_back))

    await add("queued", new("translate"))
    return made


@pytest.mark.sqlite_only
async def test_the_fast_reads_answer_what_the_engine_reads_answer(db: Database) -> None:
    store = TaskStore(db)
    made = await tasks_in_every_state(store)
    fast, engine = JsonReads(db), EngineReads(db)

    for name, task_id in made.items():
        task = await fast.task(task_id)
        assert task == await engine.task(task_id), name
        events = await fast.events_after(task_id, 0)
        assert events and events == await engine.events_after(task_id, 0), name
        assert await fast.events_after(task_id, 1, 2) == await engine.events_after(task_id, 1, 2)
        assert task is not None
        assert await fast.status(task_id) == await engine.status(task_id) == task.status, name
    assert await fast.task(10**9) is None and await engine.task(10**9) is None
    assert await fast.status(10**9) is None and await engine.status(10**9) is None
    assert await fast.events_after(10**9, 0) == []

    for status in (None, *TaskStatus):
        for template in (None, "summarize", "translate", "nothing"):
            for before in (None, made["failed"]):
                for limit in (1, 3, 50):
                    wanted = (status, template, limit, before)
                    assert await fast.page(*wanted) == await engine.page(*wanted), wanted
    assert db.reads_handed_off == 0


async def test_the_fast_read_keeps_what_was_stored(db: Database) -> None:
    store = TaskStore(db)
    made = await tasks_in_every_state(store)
    succeeded = await store.get_task(made["succeeded"])
    assert succeeded is not None
    assert [s.id for s in succeeded.steps] == ["zeta", "alpha"]
    first = succeeded.steps[0]
    assert first.duration_ms == ODD * 1000 and first.usage is not None
    assert first.usage.total_ms == ODD and first.output == {"text": "hi", "big": 2**60, "f": ODD}
    assert first.prompt == PROMPT
    delayed = await store.get_task(made["delayed"])
    assert delayed is not None and delayed.timeout_seconds == ODD
    assert delayed.params["x"] == ODD and delayed.params["n"] == 2**60
    retried = await store.get_task(made["retried"])
    assert retried is not None
    assert [a.status.value for a in retried.history] == ["failed", "running"]
    assert [s.status for s in retried.steps] == [StepStatus.RUNNING]
    asked = await store.get_task(made["asked_to_cancel"])
    assert asked is not None and asked.cancel_requested


async def test_a_status_read_answers_each_state_on_either_engine(db: Database) -> None:
    store = TaskStore(db)
    made = await tasks_in_every_state(store)
    for name, task_id in made.items():
        task = await store.get_task(task_id)
        assert task is not None and await store.status_of(task_id) == task.status, name
    assert {await store.status_of(i) for i in made.values()} >= {
        TaskStatus.QUEUED,
        TaskStatus.RUNNING,
        TaskStatus.SUCCEEDED,
        TaskStatus.FAILED,
        TaskStatus.CANCELLED,
    }
    assert await store.status_of(10**9) is None


@pytest.mark.sqlite_only
async def test_reads_on_the_loop_leave_no_snapshot_open(db: Database) -> None:
    store = TaskStore(db)
    made = await tasks_in_every_state(store)
    for task_id in made.values():
        await store.get_task(task_id)
        await store.events_after(task_id, 0)
    await store.list_page(limit=2)
    # A checkpoint that must wait for every reader finishes: no read holds its snapshot.
    with sqlite3.connect(db.path, timeout=0) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0


@pytest.fixture
async def journal_db(db_url: str) -> AsyncIterator[Database]:
    """A database with one task, in rollback-journal mode, where a writer's lock keeps
    readers out (in WAL mode readers are only kept out by a recovery after a crash, or a
    connection in exclusive locking mode)."""
    first = Database(db_url)
    await upgrade(first)
    await TaskStore(first).enqueue(new())
    await first.close()
    path = db_url.split("///", 1)[1]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode = DELETE").fetchone() == ("delete",)
    db = Database(db_url)  # nothing here writes, so it stays in that mode
    yield db
    await db.close()


@pytest.mark.sqlite_only
async def test_a_locked_database_is_read_on_a_thread_and_never_holds_the_loop(
    journal_db: Database,
) -> None:
    db = journal_db
    reads = JsonReads(db)
    before = await reads.task(1)
    holder = sqlite3.connect(db.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        reading = asyncio.create_task(reads.task(1))
        ticks = 0
        while ticks < 5:  # the loop goes on while the read waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert not reading.done()
        assert db.reads_handed_off == 1
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert await reading == before
    assert before is not None and before.status is TaskStatus.QUEUED
    assert await reads.task(1) == before  # and the next read is on the loop again
    assert db.reads_handed_off == 1


@pytest.mark.sqlite_only
async def test_a_read_that_fails_says_why(tmp_path: Path) -> None:
    path = tmp_path / "not-a-database.db"
    path.write_bytes(b"this is not an SQLite file" * 100)
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        with pytest.raises(StorageUnavailable, match="not a database"):
            await JsonReads(db).task(1)
    finally:
        await db.close()


@pytest.mark.skipif(not ON_POSTGRESQL, reason="PostgreSQL's twin of the test above")
async def test_a_read_of_a_database_that_is_not_there_says_why(db_url: str) -> None:
    from sqlalchemy.engine import make_url

    gone = make_url(db_url)
    gone = gone.set(database=f"{gone.database}_gone")
    db = Database(gone.render_as_string(hide_password=False))
    try:
        with pytest.raises(StorageUnavailable, match=f'database "{gone.database}" does not exist'):
            await TaskStore(db).get_task(1)
    finally:
        await db.close()


@pytest.mark.skipif(not ON_POSTGRESQL, reason="psycopg's prepared statements")
async def test_a_point_read_keeps_the_statements_its_connection_prepared(db: Database) -> None:
    # psycopg prepares a statement run five times on a connection, and forgets all of them
    # at any ROLLBACK; the writes share these connections, so a read that ended in one made
    # every write parse and plan its statements again (the idle round trip: 20 ms -> 13 ms).
    def prepare(raw: Any) -> None:
        for _ in range(6):
            raw.execute("SELECT 41 + 1").fetchall()

    def prepared(raw: Any) -> int:
        return int(raw.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0])

    # One read after the other: the pool hands back the one connection it has opened.
    await db.read_now(prepare)
    assert await db.read_now(prepared) >= 1
    async with db.read() as conn:  # a snapshot read of the async engine's own pool
        await conn.execute(text("SELECT 1"))
    assert await db.read_now(prepared) >= 1


@pytest.mark.skipif(not ON_POSTGRESQL, reason="psycopg's transactions")
async def test_a_point_read_opens_no_transaction_and_leaves_writes_in_theirs(
    db: Database,
) -> None:
    import psycopg

    # Each statement its own snapshot, as on SQLite: no BEGIN and COMMIT around a point read
    # (two round trips of three); the status after the statement tells.
    def status(raw: Any) -> Any:
        raw.execute("SELECT 1").fetchall()
        return raw.info.transaction_status

    statuses = await asyncio.gather(*(db.read_now(status) for _ in range(16)))
    assert set(statuses) == {psycopg.pq.TransactionStatus.IDLE}

    # A read that fails hands its connection back in transaction mode too.
    def broken(raw: Any) -> None:
        raw.execute("SELECT * FROM no_such_table").fetchall()

    for _ in range(8):
        with pytest.raises(psycopg.errors.UndefinedTable):
            await db.read_now(broken)

    # The writers share those connections: a body that fails still leaves nothing behind.
    def queued(raw: Any) -> int:
        sql = "SELECT n FROM task_counts WHERE status = 'queued'"
        return int(raw.execute(sql).fetchone()[0])

    before = await db.read_now(queued)

    def write_then_fail(conn: Any) -> None:
        conn.execute(text("UPDATE task_counts SET n = n + 100 WHERE status = 'queued'"))
        raise RuntimeError("the body failed after its write")

    async def one() -> None:
        with pytest.raises(RuntimeError, match="after its write"):
            await db.transaction(write_then_fail)

    await asyncio.gather(*(one() for _ in range(16)))
    assert await db.read_now(queued) == before


@pytest.mark.skipif(not ON_POSTGRESQL, reason="psycopg's connections")
async def test_a_read_whose_connection_dies_reports_its_own_error(db: Database) -> None:
    # The connection dies during the read, which then fails for its own reason: that reason
    # is what the caller sees (before the fix, turning autocommit off on the dead connection
    # raised instead, and hid it), and the dead connection is not handed on.
    class ReadFailed(Exception):
        pass

    def dies(raw: Any) -> None:
        with contextlib.suppress(Exception):
            raw.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        raise ReadFailed("the read's own error")

    with pytest.raises(ReadFailed):
        await db.read_now(dies)
    reads = await asyncio.gather(
        *(db.read_now(lambda raw: raw.execute("SELECT 1").fetchone()[0]) for _ in range(8))
    )
    assert reads == [1] * 8
