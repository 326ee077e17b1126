from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection

from orchestra.db import Database, Lease, TaskStore
from orchestra.db.attempts import LeaseEnd
from orchestra.db.schema import LATEST, upgrade
from orchestra.domain import (
    AttemptStatus,
    NewTask,
    Step,
    StepStatus,
    Task,
    TaskError,
    TaskStatus,
    Usage,
    iso,
    now,
)
from tests.conftest import sql_rows
from tests.fixtures.postgres import ON_POSTGRESQL


class Clock:
    """The store's time, moved on by the test instead of waited for."""

    def __init__(self) -> None:
        self.at = now()

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db: Database, clock: Clock) -> TaskStore:
    return TaskStore(db, clock=clock)


def ends(moved: dict[int, LeaseEnd]) -> dict[int, TaskStatus]:
    """Each task whose lease ended, with the status it moved to."""
    return {task_id: end.status for task_id, end in moved.items()}


async def add(store: TaskStore, task: NewTask) -> Task:
    return (await store.enqueue(task)).task


def new(template: str = "summarize", priority: int = 0, **params: object) -> NewTask:
    return NewTask(template=template, template_version=1, params=dict(params), priority=priority)


async def test_schema_version_is_recorded_and_upgrade_is_idempotent(db: Database) -> None:
    assert await upgrade(db) == LATEST
    versions = sql_rows(db.url, "SELECT version FROM schema_version ORDER BY version")
    assert versions == [(v,) for v in range(1, LATEST + 1)]


@pytest.mark.sqlite_only
async def test_the_file_is_in_wal_mode(db: Database) -> None:
    assert db.path is not None
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_person_can_read_the_data_with_sqlite3_or_psql(
    store: TaskStore, db: Database
) -> None:
    task = await add(store, new(text="hello"))
    [claimed] = await store.claim("w1", 1, 30)
    lease = Lease(task.id, "w1", claimed.attempts)
    await store.start_step(lease, "summary", 0)
    await store.finish_step(
        lease,
        Step(
            id="summary",
            position=0,
            status=StepStatus.SUCCEEDED,
            output="hi",
            usage=Usage(prompt_tokens=3),
        ),
    )
    await store.finish(lease, TaskStatus.SUCCEEDED, result={"text": "hi"})
    [row] = sql_rows(db.url, "SELECT status, params, result, created_at, finished_at FROM tasks")
    [step] = sql_rows(db.url, "SELECT status, output, prompt_tokens FROM task_steps")
    assert row[0] == "succeeded"
    assert row[1] == '{"text":"hello"}'
    assert row[2] == '{"text":"hi"}'
    assert row[3].endswith("Z") and row[3][10] == "T"
    assert step == ("succeeded", '"hi"', 3)


async def test_claim_takes_higher_priority_first_then_older(store: TaskStore) -> None:
    low = await add(store, new(priority=0))
    high = await add(store, new(priority=5))
    low2 = await add(store, new(priority=0))
    claimed = await store.claim("w", 10, 30)
    assert [t.id for t in claimed] == [high.id, low.id, low2.id]
    assert all(t.status is TaskStatus.RUNNING and t.attempts == 1 for t in claimed)
    assert await store.claim("w", 10, 30) == []


async def test_fifty_concurrent_claimers_never_take_a_task_twice(
    store: TaskStore, db_url: str
) -> None:
    for i in range(400):
        await add(store, new(n=i))
    # A second Database on the same file behaves like a second process.
    other_db = Database(db_url)
    other = TaskStore(other_db)
    taken: list[tuple[str, int]] = []

    async def claimer(name: str, s: TaskStore) -> None:
        while batch := await s.claim(name, 3, 30):
            taken.extend((name, t.id) for t in batch)

    try:
        await asyncio.gather(*(claimer(f"w{i}", store if i % 2 else other) for i in range(50)))
    finally:
        await other_db.close()
    ids = [task_id for _, task_id in taken]
    assert len(ids) == 400
    assert len(set(ids)) == 400
    assert len({name for name, _ in taken}) > 10  # the work really was spread out


async def test_expired_lease_returns_task_to_queue_with_attempt_counted(
    store: TaskStore, clock: Clock
) -> None:
    task = await add(store, new())
    await store.claim("dead-worker", 1, lease_seconds=30)
    clock.advance(29)
    assert ends(await store.requeue_expired()) == {}  # not yet expired
    clock.advance(2)
    assert ends(await store.requeue_expired()) == {task.id: TaskStatus.QUEUED}
    again = await store.get_task(task.id)
    assert again is not None
    assert again.status is TaskStatus.QUEUED and again.attempts == 1 and again.lease_owner is None
    [reclaimed] = await store.claim("w2", 1, 30)
    assert reclaimed.id == task.id and reclaimed.attempts == 2


async def test_the_reaper_leaves_the_tasks_its_own_process_runs_whatever_the_clock_says(
    store: TaskStore, clock: Clock
) -> None:
    """The wall clock jumped forward (a laptop woke from sleep, a clock was stepped): every
    lease looks expired at once, its own tasks' too, which it renews. A process reaps the
    others' only (its own were lost and run again)."""
    mine = await add(store, new())
    theirs = await add(store, new())
    await store.claim("me", 1, lease_seconds=30)
    await store.claim("dead", 1, lease_seconds=30)
    clock.advance(3600)
    assert ends(await store.requeue_expired(running=[mine.id])) == {theirs.id: TaskStatus.QUEUED}
    kept = await store.get_task(mine.id)
    assert kept is not None and kept.status is TaskStatus.RUNNING and kept.lease_owner == "me"
    assert (await store.renew_leases("me", [mine.id], 30)).held == {mine.id}


async def test_a_dead_processs_task_keeps_its_place_in_the_queue(
    store: TaskStore, clock: Clock
) -> None:
    """Its due time became the time of death, so it ran behind every task queued while it
    ran (60 s behind 1,100 tasks in an operator's test): taken back at once, run last."""
    running = await add(store, new())
    await store.claim("dead", 1, lease_seconds=30)
    clock.advance(5)
    backlog = [await add(store, new()) for _ in range(3)]
    clock.advance(5)
    assert ends(await store.requeue_orphaned("dead", "SIGKILL")) == {running.id: TaskStatus.QUEUED}
    # Handed back by a stopping process, it keeps its place too.
    [stopping] = await store.claim("stopping", 1, lease_seconds=30)
    assert stopping.id == running.id
    clock.advance(5)
    assert await store.release(Lease(stopping.id, "stopping", stopping.attempts))
    clock.advance(30)
    # Lost a second time it may be what kills its process: behind the others, so that each
    # process in turn does not take it first and die.
    assert [t.id for t in await store.claim("dead-too", 1, lease_seconds=30)] == [running.id]
    clock.advance(31)
    await store.requeue_expired()
    taken = await store.claim("alive", 4, lease_seconds=30)
    assert [t.id for t in taken] == [*(t.id for t in backlog), running.id]


async def test_a_dead_processs_tasks_are_requeued_at_once_and_the_attempt_counts(
    store: TaskStore, clock: Clock
) -> None:
    """The supervisor saw the process die: its tasks need not wait out their leases. Only
    that worker pool's tasks move; the lost attempt is recorded with how the process died,
    counts against max_attempts, and fences the dead worker's writes."""
    mine = await add(store, NewTask(template="t", template_version=1, params={}, max_attempts=2))
    other = await add(store, new())
    await store.claim("dead", 1, lease_seconds=30, first_step=lambda _task: "first")
    await store.claim("alive", 1, lease_seconds=30)
    cause = "process 2, pid 4242: SIGKILL"
    assert ends(await store.requeue_orphaned("dead", cause)) == {mine.id: TaskStatus.QUEUED}
    assert ends(await store.requeue_orphaned("dead", cause)) == {}  # once
    still = await store.get_task(other.id)
    assert still is not None and still.status is TaskStatus.RUNNING
    again = await store.get_task(mine.id)
    assert again is not None and again.status is TaskStatus.QUEUED and again.lease_owner is None
    assert not await store.finish(Lease(mine.id, "dead", 1), TaskStatus.SUCCEEDED)
    [lost, *_] = again.history
    assert lost.status is AttemptStatus.LOST and lost.error is not None
    assert lost.error.message == f"the process running this attempt died ({cause})"
    # Its last attempt lost the same way: failed, saying so.
    await store.claim("dead-too", 1, lease_seconds=30, first_step=lambda _task: "first")
    assert ends(await store.requeue_orphaned("dead-too", cause)) == {mine.id: TaskStatus.FAILED}
    failed = await store.get_task(mine.id)
    assert failed is not None and failed.error is not None
    assert failed.error.message.endswith("; the task has no attempts left")
    assert failed.steps[0].status is StepStatus.FAILED


async def test_task_that_keeps_losing_its_worker_fails_after_max_attempts(
    store: TaskStore, clock: Clock
) -> None:
    task = await add(store, NewTask(template="t", template_version=1, params={}, max_attempts=2))
    for _ in range(2):
        await store.claim("dying", 1, lease_seconds=30, first_step=lambda _task: "first")
        clock.advance(31)
        moved = await store.requeue_expired()
    assert ends(moved) == {task.id: TaskStatus.FAILED}
    failed = await store.get_task(task.id)
    assert failed is not None and failed.error is not None
    assert failed.error.type == "lease_expired"
    assert failed.finished_at is not None
    # The step the lost worker was in ended with its attempt, not left running.
    [step] = failed.steps
    assert step.status is StepStatus.FAILED and step.finished_at is not None
    assert step.error is not None and step.error.type == "lease_expired"


async def test_a_stale_worker_cannot_write_after_losing_its_lease(
    store: TaskStore, clock: Clock
) -> None:
    task = await add(store, new())
    [first] = await store.claim("old", 1, lease_seconds=30)
    old = Lease(task.id, "old", first.attempts)
    clock.advance(31)
    await store.requeue_expired()
    [second] = await store.claim("new", 1, 30)
    current = Lease(task.id, "new", second.attempts)

    assert not await store.start_step(old, "summary", 0)
    assert not await store.finish(old, TaskStatus.FAILED, error=TaskError("x", "stale"))
    assert (await store.renew_leases("old", [task.id], 30)).held == set()

    assert await store.start_step(current, "summary", 0)
    assert await store.finish(current, TaskStatus.SUCCEEDED, result="ok")
    done = await store.get_task(task.id)
    assert done is not None and done.status is TaskStatus.SUCCEEDED and done.result == "ok"
    assert not await store.finish(current, TaskStatus.FAILED)  # finished exactly once


async def test_same_process_stale_attempt_is_fenced_by_attempt_number(
    store: TaskStore, clock: Clock
) -> None:
    task = await add(store, new())
    await store.claim("me", 1, lease_seconds=30)
    clock.advance(31)
    await store.requeue_expired()
    [second] = await store.claim("me", 1, 30)
    assert not await store.finish(Lease(task.id, "me", 1), TaskStatus.SUCCEEDED)
    assert await store.finish(Lease(task.id, "me", second.attempts), TaskStatus.SUCCEEDED)


@pytest.mark.parametrize("seconds", [0.012345, 61.000001, -2.0])
async def test_a_step_its_attempt_ended_takes_its_duration_to_the_microsecond(
    store: TaskStore, clock: Clock, seconds: float
) -> None:
    """A step still running when its attempt ends (timed out, cancelled, handed back, lost)
    is closed with the time it ran, as exact on SQLite as on PostgreSQL; never below 0 (the
    end read on another host's clock)."""
    task = await add(store, new())
    [claimed] = await store.claim("w", 1, 30)
    lease = Lease(task.id, "w", claimed.attempts)
    await store.start_step(lease, "summary", 0)
    clock.advance(seconds)
    assert await store.finish(lease, TaskStatus.CANCELLED)
    done = await store.get_task(task.id)
    assert done is not None
    [step] = done.steps
    assert step.status is StepStatus.FAILED
    assert step.duration_ms == max(0.0, round(seconds * 1000, 3))


async def test_release_hands_a_task_back_without_counting_the_attempt(store: TaskStore) -> None:
    task = await add(store, new())
    [claimed] = await store.claim("w", 1, 30)
    lease = Lease(task.id, "w", claimed.attempts)
    await store.start_step(lease, "summary", 0)
    assert await store.release(lease)
    back = await store.get_task(task.id)
    assert back is not None
    assert back.status is TaskStatus.QUEUED
    assert (back.attempts, back.handed_back, back.counted_attempts) == (1, 1, 0)
    assert [(a.number, a.status.value) for a in back.history] == [(1, "handed_back")]
    [again] = await store.claim("w", 1, 30)
    assert again.attempts == 2  # a new attempt number, so the old lease stays fenced off


async def test_renewing_a_lease_pushes_its_expiry(store: TaskStore, clock: Clock) -> None:
    task = await add(store, new())
    [claimed] = await store.claim("w", 1, lease_seconds=1)
    assert claimed.lease_expires_at == iso(clock() + timedelta(seconds=1))
    clock.advance(0.5)
    assert (await store.renew_leases("w", [task.id], 60)).held == {task.id}
    renewed = await store.get_task(task.id)
    assert renewed is not None
    assert renewed.lease_expires_at == iso(clock() + timedelta(seconds=60))


async def test_listing_is_newest_first_with_keyset_pages(store: TaskStore) -> None:
    ids = [(await add(store, new(template="a" if i % 2 else "b"))).id for i in range(7)]
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        page = await store.list_page(limit=3, before=cursor)
        seen += [t.id for t in page.items]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == sorted(ids, reverse=True)
    assert pages == 3
    only_a = await store.list_page(template="a", limit=50)
    assert {t.template for t in only_a.items} == {"a"} and len(only_a.items) == 3
    await store.claim("w", 2, 30)
    running = await store.list_page(status=TaskStatus.RUNNING)
    assert [t.id for t in running.items] == sorted(ids[:2], reverse=True)


async def test_in_memory_database_is_refused(tmp_path: Path) -> None:
    from orchestra.errors import ConfigError

    with pytest.raises(ConfigError, match="in-memory"):
        Database("sqlite+aiosqlite:///:memory:")
    with pytest.raises(ConfigError, match="use the psycopg"):
        Database("postgresql+asyncpg://localhost/x")
    with pytest.raises(ConfigError, match="'mysql' is not supported"):
        Database("mysql+aiomysql://localhost/x")


async def test_migrated_schema_matches_the_table_definitions(db: Database) -> None:
    from sqlalchemy import create_engine, inspect

    from orchestra.db.tables import metadata

    engine = create_engine(db.url.replace("sqlite+aiosqlite:", "sqlite:"))
    try:
        with engine.connect() as conn:
            found = inspect(conn)
            for table in metadata.sorted_tables:
                keys = set(found.get_pk_constraint(table.name)["constrained_columns"])
                columns = {
                    c["name"]: not c["nullable"] or c["name"] in keys
                    for c in found.get_columns(table.name)
                }
                expected = {c.name: (not c.nullable) or c.primary_key for c in table.columns}
                assert columns == expected, table.name
                indexes = {
                    ix["name"]
                    for ix in found.get_indexes(table.name)
                    if "duplicates_constraint" not in ix  # a UNIQUE column's own index
                }
                assert indexes == {ix.name for ix in table.indexes}, table.name
    finally:
        engine.dispose()


@pytest.mark.sqlite_only
async def test_migrated_indexes_and_triggers_are_those_the_tables_describe(
    db: Database, tmp_path: Path
) -> None:
    """Index definitions and the counters' triggers, compared as SQLite stores them, with a
    database created from tables.py."""
    from sqlalchemy import create_engine

    from orchestra.db.tables import metadata

    described = create_engine(f"sqlite:///{tmp_path / 'described.db'}")
    metadata.create_all(described)
    described.dispose()

    def definitions(path: Path) -> dict[str, str]:
        with sqlite3.connect(path) as conn:
            rows = conn.execute(
                "SELECT name, sql FROM sqlite_master "
                "WHERE type IN ('index', 'trigger') AND sql IS NOT NULL"
            ).fetchall()
        return {name: " ".join(sql.split()) for name, sql in rows}

    migrated = definitions(db.path)
    assert migrated == definitions(tmp_path / "described.db")
    assert {"tr_task_counts_insert", "tr_task_counts_status", "tr_task_counts_delete"} <= set(
        migrated
    )
    with sqlite3.connect(db.path) as conn:
        counters = conn.execute("SELECT status, n FROM task_counts ORDER BY status").fetchall()
    assert counters == sorted((s.value, 0) for s in TaskStatus)


@pytest.mark.empty_database
async def test_a_version_1_database_is_upgraded_in_place(db_url: str) -> None:
    from orchestra.db import schema

    old = Database(db_url)

    def version_1(conn: Connection) -> None:  # what an Orchestra with only migration 1 left behind
        schema.current_version(conn)
        schema.MIGRATIONS[0](conn)
        conn.exec_driver_sql("INSERT INTO schema_version VALUES (1, '2026-01-01T00:00:00.000000Z')")
        conn.exec_driver_sql(  # a task as version 1 stored it
            "INSERT INTO tasks (template, template_version, status, params, run_at, created_at) "
            "VALUES ('summarize', 1, 'queued', '{\"text\":\"kept\"}', "
            "'2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:00.000000Z')"
        )

    await old.transaction(version_1)
    assert await upgrade(old) == schema.LATEST
    await old.close()
    versions = [v for (v,) in sql_rows(db_url, "SELECT version FROM schema_version ORDER BY 1")]
    assert versions == list(range(1, schema.LATEST + 1))
    assert sql_rows(db_url, "SELECT params FROM tasks") == [('{"text":"kept"}',)]
    for later in ("templates", "task_events"):  # tables of later migrations, there and empty
        assert sql_rows(db_url, f"SELECT count(*) FROM {later}") == [(0,)]


async def test_a_batch_claim_numbers_each_tasks_events_on_its_own(store: TaskStore) -> None:
    ids = [(await add(store, new(n=i))).id for i in range(5)]
    assert len(await store.claim("w", 5, 30)) == 5
    for task_id in ids:
        events = await store.events_after(task_id, 0)
        assert [(e.seq, e.type) for e in events] == [(1, "task.queued"), (2, "task.started")]
        assert events[1].data == {"attempt": 1, "worker": "w"}


def pg_claim_params(now: str, limit: int) -> dict[str, Any]:
    """The claim's parameters on PostgreSQL, as the statement's SQL names them (its values
    and the claim's own), for EXPLAIN and a claim run by hand."""
    return {
        "c_now": now,
        "c_floor": -(2**31),
        "c_limit": limit,
        "c_owner": "w",
        "c_expires": "2100-01-01T00:00:00Z",
        "status": "running",
        "attempts_1": 1,
        "finished_at": None,
        "error": None,
    }


async def test_the_claim_reads_the_queue_index_in_order_however_many_are_queued(
    db: Database, db_url: str
) -> None:
    """The claim walks the partial queue index and stops at its limit: it never sorts the
    queued tasks. With the status as a bound value, SQLite took the status index and sorted
    every queued task (40 ms a claim with 100,000 queued), and PostgreSQL's generic plan
    could not use the partial index either."""
    from orchestra.db.claim import _SQLITE_BAND, CLAIM, _sqlite_due_in_band

    if db_url.startswith("postgresql"):
        import psycopg

        from orchestra.db.postgres_engine import conninfo

        params = pg_claim_params("2100-01-01T00:00:00Z", 3)
        with psycopg.connect(conninfo(db_url)) as pg:
            pg.execute("SET plan_cache_mode = force_generic_plan")
            pg.execute("SET enable_seqscan = off")
            found = pg.execute("EXPLAIN " + CLAIM.sql("postgresql"), params).fetchall()
        plan = "\n".join(str(r[0]) for r in found)
        assert "ix_tasks_queue" in plan and "Sort" not in plan, plan
        return
    import sqlite3

    with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
        conn.executemany(
            "INSERT INTO tasks (template, template_version, status, params, priority, attempts,"
            " handed_back, run_at, idempotency_scope, created_at) VALUES"
            " (?, 1, 'queued', '{}', 0, 0, 0, '2026-01-01', '', '2026-01-01')",
            [(f"t{i}",) for i in range(3000)],
        )
        # The pick's statements: a priority's seek, and its due tasks (also passing over
        # models at their limit, a NOT IN list); the claim then updates the tasks picked.
        for sql in (_SQLITE_BAND.sql(), _sqlite_due_in_band(0).sql(), _sqlite_due_in_band(2).sql()):
            found = conn.execute("EXPLAIN QUERY PLAN " + sql, [None] * sql.count("?")).fetchall()
            plan = " | ".join(str(r[-1]) for r in found)
            assert "ix_tasks_queue" in plan and "TEMP B-TREE" not in plan, plan
        sql = CLAIM.sql("sqlite")
        found = conn.execute("EXPLAIN QUERY PLAN " + sql, [None] * sql.count("?")).fetchall()
        plan = " | ".join(str(r[-1]) for r in found)
        assert "SCAN tasks" not in plan and "TEMP B-TREE" not in plan, plan


def counted_claim(
    db_url: str, rows: Sequence[tuple[int, str, str | None]], limit: int, skip: tuple[str, ...]
) -> tuple[list[Any], int]:
    """Queue ``rows`` (priority, run_at, model) in the SQLite file, then claim ``limit`` at
    2026-06-01 (passing over the models ``skip`` names): the tasks taken, and about how many
    steps of SQLite's machine the claim took (its progress handler, every 100), rolled back."""
    from sqlalchemy import create_engine

    from orchestra.db.claim import claim

    with sqlite3.connect(db_url.split("///", 1)[1]) as raw:
        raw.executemany(
            "INSERT INTO tasks (template, template_version, status, params, priority, attempts,"
            " handed_back, run_at, model, idempotency_scope, created_at) VALUES"
            " ('t', 1, 'queued', '{}', ?, 0, 0, ?, ?, '', '2026-01-01')",
            rows,
        )
    engine = create_engine("sqlite:///" + db_url.split("///", 1)[1])
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    try:
        with engine.begin() as conn:
            raw_conn = conn.connection.dbapi_connection
            assert raw_conn is not None
            raw_conn.set_progress_handler(count, 100)
            now, expires = "2026-06-01T00:00:00Z", "2100-01-01T00:00:00Z"
            taken = claim(conn, "w", limit, now, expires, skip, None)
            conn.rollback()
    finally:
        engine.dispose()
    return taken, steps[0] * 100


SQLITE_ONLY = pytest.mark.skipif(ON_POSTGRESQL, reason="counts SQLite's own steps")


@SQLITE_ONLY
async def test_the_claim_steps_over_delayed_tasks_without_reading_them(
    db: Database, db_url: str
) -> None:
    """20,000 tasks delayed at a higher priority than the due ones: the claim walked every
    one of them, in the write lock (9 ms a pickup with 100,000 delayed). It seeks each
    priority's due tasks instead. Counted in SQLite's own steps (its progress handler), not
    in time. (Tasks of a model at its limit, due ahead of the one to take, are still walked
    past: see docs/processes.md.)"""
    rows = [(5, "2100-01-01T00:00:00Z", None)] * 20_000  # delayed, at a higher priority
    rows += [(0, "2026-01-01T00:00:00Z", None)] * 3  # due
    taken, steps = counted_claim(db_url, rows, 2, ())
    assert [(t.priority, t.run_at) for t in taken] == [(0, "2026-01-01T00:00:00Z")] * 2
    assert steps < 20_000, steps  # not one step per task passed over


@SQLITE_ONLY
@pytest.mark.parametrize("skip", [(), ("busy",)])
async def test_the_claim_over_many_priorities_reads_them_in_one_scan(
    db: Database, db_url: str, skip: tuple[str, ...]
) -> None:
    """One delayed task at each of 4,002 priorities (batch lanes counted) and the due one at
    the lowest: a seek and a read for each priority cost 28 ms a claim (review). Past
    MAX_BANDS priorities the rest are read in one ordered scan, as before the walk. Its
    order: a due task at a higher priority comes first, in every part of the walk."""
    from orchestra.db.claim import MAX_BANDS

    rows: list[tuple[int, str, str | None]] = [
        (p, "2100-01-01T00:00:00Z", None) for p in range(-3001, 1001)
    ]
    rows += [(p, "2026-01-01T00:00:00Z", "busy") for p in range(-3001, 1001)]
    rows += [(-3001, "2026-01-02T00:00:00Z", None), (-3001, "2026-01-03T00:00:00Z", None)]
    rows += [(1000 - MAX_BANDS, "2026-01-05T00:00:00Z", None)]  # just past the walk
    taken, steps = counted_claim(db_url, rows, 3, skip)
    taken.sort(key=lambda t: (-t.priority, t.run_at))  # RETURNING's order is the engine's
    if skip:
        assert [(t.priority, t.run_at) for t in taken] == [
            (1000 - MAX_BANDS, "2026-01-05T00:00:00Z"),
            (-3001, "2026-01-02T00:00:00Z"),
            (-3001, "2026-01-03T00:00:00Z"),
        ]
    else:
        assert [t.priority for t in taken] == [1000, 999, 998]
    assert steps < 400_000, steps  # not a seek and a read per priority


@pytest.mark.skipif(not ON_POSTGRESQL, reason="PostgreSQL's plan")
async def test_the_claim_on_postgresql_seeks_past_delayed_tasks(db: Database, db_url: str) -> None:
    """100,000 tasks delayed at a higher priority, the table analysed: PostgreSQL planned the
    claim as a sequential scan of every task (10 ms a claim with 100,000 delayed). The walk
    seeks each priority in the queue index; its generic plan (a prepared statement's) too."""
    import psycopg

    from orchestra.db.claim import CLAIM
    from orchestra.db.postgres_engine import conninfo

    insert = (
        "INSERT INTO tasks (template, template_version, status, params, priority, attempts,"
        " handed_back, run_at, idempotency_scope, created_at) SELECT 't', 1, 'queued', '{}',"
        " %s, 0, 0, %s, '', '2026-01-01' FROM generate_series(1, %s)"
    )
    params = pg_claim_params("2026-06-01T00:00:00Z", 4)
    with psycopg.connect(conninfo(db_url)) as pg:
        pg.execute(insert, (5, "2100-01-01T00:00:00Z", 100_000))
        pg.execute(insert, (0, "2026-01-02T00:00:00Z", 3))
        pg.execute(insert, (-3, "2026-01-01T00:00:00Z", 3))
        pg.execute("ANALYZE tasks")
        sql = CLAIM.sql("postgresql")
        found = pg.execute("EXPLAIN " + sql, params).fetchall()
        plan = "\n".join(str(r[0]) for r in found)
        assert "Seq Scan" not in plan and "ix_tasks_queue" in plan, plan
        # The generic plan a prepared statement gets (as psycopg prepares the claim): with
        # the values bound, EXPLAIN plans for them, so it is asked of a PREPAREd statement.
        names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", sql)))
        numbered = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m.group(1)) + 1}", sql)
        pg.execute("SET plan_cache_mode = force_generic_plan")
        pg.execute(f"PREPARE generic_claim AS {numbered}")
        values = ", ".join("NULL" if params[n] is None else repr(params[n]) for n in names)
        found = pg.execute(f"EXPLAIN EXECUTE generic_claim({values})").fetchall()
        plan = "\n".join(str(r[0]) for r in found)
        assert "$1" in plan or "$2" in plan, plan  # generic: the parameters stay unbound
        assert "Seq Scan" not in plan and "ix_tasks_queue" in plan, plan
        claimed = pg.execute(CLAIM.sql("postgresql"), params).fetchall()
        pg.rollback()
    by_priority = sorted(row[8] for row in claimed)  # tasks.priority, as RETURNING lists it
    assert by_priority == [-3, 0, 0, 0], claimed


@pytest.mark.skipif(not ON_POSTGRESQL, reason="PostgreSQL's plan")
async def test_the_claim_on_postgresql_walks_a_few_priorities_then_scans(
    db: Database, db_url: str
) -> None:
    """One delayed task at each of 4,002 priorities: the walk's seek and scan per priority
    cost 10 ms a claim (review); past MAX_BANDS it reads the rest in one scan, and claims in
    order, locking no more than it takes beyond the scan's own."""
    import re

    import psycopg

    from orchestra.db.claim import CLAIM, MAX_BANDS
    from orchestra.db.postgres_engine import conninfo

    insert = (
        "INSERT INTO tasks (template, template_version, status, params, priority, attempts,"
        " handed_back, run_at, idempotency_scope, created_at) SELECT 't', 1, 'queued', '{}',"
        " p, 0, 0, %s, '', '2026-01-01' FROM generate_series(%s::int, %s::int) AS p"
    )
    with psycopg.connect(conninfo(db_url)) as pg:
        pg.execute(insert, ("2100-01-01T00:00:00Z", -3001, 1000))
        pg.execute(insert, ("2026-01-01T00:00:00Z", -3001, -3000))  # due: the two lowest
        pg.execute(insert, ("2026-01-01T00:00:00Z", 1000 - MAX_BANDS, 1000 - MAX_BANDS))
        pg.commit()
        pg.execute("ANALYZE tasks")
        params = pg_claim_params("2026-06-01T00:00:00Z", 3)
        found = pg.execute("EXPLAIN ANALYZE " + CLAIM.sql("postgresql"), params).fetchall()
        plan = "\n".join(str(r[0]) for r in found)
        pg.rollback()
        claimed = pg.execute(CLAIM.sql("postgresql"), params).fetchall()
        pg.rollback()
    walked = re.search(r"Recursive Union .*actual time=\S+ rows=(\d+)", plan)
    assert walked is not None and int(walked.group(1)) <= MAX_BANDS, plan
    assert sorted(row[8] for row in claimed) == [-3001, -3000, 1000 - MAX_BANDS], claimed
