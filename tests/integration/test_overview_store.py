"""The dashboard's reads on a real database: counters, filters, keyset pages, counts, the
overview. Times the tests need in the past are written in SQL, as a person would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Connection

from orchestra.db import Database, Lease, TaskStore, overview
from orchestra.db.overview import DashboardStore, TaskFilter
from orchestra.db.schema import upgrade
from orchestra.domain import NewTask, Step, StepStatus, TaskError, TaskStatus, Usage, iso
from tests.conftest import sql_rows
from tests.fixtures.migrated import stop_at

NOW = datetime(2026, 12, 1, 13, 5, 30, tzinfo=UTC)


@pytest.fixture
def store(db: Database) -> TaskStore:
    return TaskStore(db)


@pytest.fixture
def dashboard(db: Database) -> DashboardStore:
    return DashboardStore(db)


async def add(
    store: TaskStore, template: str = "summarize", model: str | None = "m1", **params: Any
) -> int:
    new = NewTask(template=template, template_version=1, params=params, model=model)
    return (await store.enqueue(new)).task.id


def sql(db: Database, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    return sql_rows(db.url, statement, args)


def counted(db: Database) -> tuple[dict[str, int], dict[str, int]]:
    """The counters, and the counts by status counted the slow way."""
    # A counter plus the changes logged for it (PostgreSQL's; empty on SQLite).
    counters = dict(
        sql(
            db,
            "SELECT c.status, c.n + coalesce((SELECT sum(d.delta) FROM task_count_changes AS d "
            "WHERE d.status = c.status), 0) FROM task_counts AS c",
        )
    )
    real = {s.value: 0 for s in TaskStatus}
    real.update(dict(sql(db, "SELECT status, count(*) FROM tasks GROUP BY status")))
    return counters, real


async def finish(store: TaskStore, status: TaskStatus, **kwargs: Any) -> int:
    """Claim the next task and finish it with ``status``."""
    [task] = await store.claim("w", 1, 30)
    await store.finish(Lease(task.id, "w", task.attempts), status, **kwargs)
    return task.id


# -- counters ---------------------------------------------------------------------------------


async def test_counters_stay_exact_through_every_change_of_status(
    store: TaskStore, db: Database
) -> None:
    for i in range(8):
        await add(store, n=i)
    await finish(store, TaskStatus.SUCCEEDED, result="ok")
    failed = await finish(store, TaskStatus.FAILED, error=TaskError("boom", "it broke"))
    [running] = await store.claim("w", 1, 30)
    assert await store.cancel(running.id) is TaskStatus.RUNNING  # flagged: still running
    counters, real = counted(db)
    assert counters == real and counters["running"] == 1
    await store.finish(Lease(running.id, "w", running.attempts), TaskStatus.CANCELLED)
    [queued_id] = [i for (i,) in sql(db, "SELECT id FROM tasks WHERE status = 'queued' LIMIT 1")]
    await store.cancel(queued_id)
    await store.retry(failed)
    [handed] = await store.claim("w", 1, 30)
    await store.release(Lease(handed.id, "w", handed.attempts))
    await store.claim("dying", 1, lease_seconds=-1)  # a lease already expired
    await store.requeue_expired()
    counters, real = counted(db)
    assert counters == real
    assert sum(counters.values()) == 8
    await store.delete_finished_before(NOW + timedelta(days=3650))
    counters, real = counted(db)
    assert counters == real
    assert counters["succeeded"] == counters["cancelled"] == 0


async def test_folding_the_logged_changes_keeps_every_count(
    store: TaskStore, dashboard: DashboardStore, db: Database
) -> None:
    for _ in range(6):
        await add(store)
    await finish(store, TaskStatus.SUCCEEDED)
    await finish(store, TaskStatus.FAILED, error=TaskError("x", "y"))
    before = await dashboard.counts()
    assert before["queued"] == 4 and before["succeeded"] == 1 and before["failed"] == 1
    await store.fold_counts()
    assert await dashboard.counts() == before
    assert sql(db, "SELECT count(*) FROM task_count_changes") == [(0,)]  # the log is empty
    counters, real = counted(db)
    assert counters == real
    if db.dialect == "postgresql":  # the counters alone now hold the counts
        assert dict(sql(db, "SELECT status, n FROM task_counts"))["queued"] == 4


async def test_a_write_that_keeps_the_status_changes_no_counter(
    store: TaskStore, db: Database
) -> None:
    task_id = await add(store)
    await store.claim("w", 1, 30)
    before, _ = counted(db)
    await store.renew_leases("w", [task_id], 60)
    sql(db, "UPDATE tasks SET status = 'running' WHERE id = ?", task_id)
    assert counted(db)[0] == before


async def test_an_idempotent_replay_counts_once(store: TaskStore, db: Database) -> None:
    new = NewTask(template="t", template_version=1, params={}, idempotency_key="k")
    await store.enqueue(new)
    assert not (await store.enqueue(new)).created
    assert counted(db)[0]["queued"] == 1


@pytest.mark.empty_database
async def test_migration_5_counts_the_rows_already_there(db_url: str) -> None:
    old = Database(db_url)

    def version_4(conn: Connection) -> None:
        stop_at(conn, 4)
        for i, status in enumerate(["queued", "running", "failed", "succeeded", "succeeded"]):
            conn.exec_driver_sql(
                "INSERT INTO tasks (template, template_version, status, params, run_at, "
                f"created_at) VALUES ('t', 1, '{status}', '{{}}', 'then', 'then{i}')"
            )

    await old.transaction(version_4)
    try:
        await upgrade(old)
        counters, real = counted(old)
        assert (
            counters
            == real
            == {
                "queued": 1,
                "running": 1,
                "succeeded": 2,
                "failed": 1,
                "cancelled": 0,
            }
        )
        await TaskStore(old).enqueue(NewTask(template="t", template_version=1, params={}))
        assert counted(old)[0]["queued"] == 2
        assert await DashboardStore(old).counts() == counted(old)[0]
    finally:
        await old.close()


# -- filters, pages, counts -------------------------------------------------------------------


@pytest.fixture
async def varied(store: TaskStore, db: Database) -> dict[str, int]:
    """Tasks of two templates and models, three statuses, with texts worth searching for."""
    ids = {
        "a": await add(store, "summarize", "m1", text="50% off_sale today"),
        "b": await add(store, "summarize", "m2", text="500 off sale"),
        "c": await add(store, "translate", "m1", text='say "hi" \\ bye'),
        "d": await add(store, "translate", None, text="plain"),
        "e": await add(store, "summarize", "m1", text="plain"),
    }
    await store.claim("w", 1, 30)  # a: running
    [b] = await store.claim("w", 1, 30)
    await store.finish(
        Lease(b.id, "w", b.attempts), TaskStatus.FAILED, error=TaskError("x", "quota_exceeded")
    )
    [c] = await store.claim("w", 1, 30)
    await store.finish(Lease(c.id, "w", c.attempts), TaskStatus.SUCCEEDED, result="answer: 42")
    for day, key in enumerate("abcde"):  # created one day apart, a first
        stamp = iso(NOW - timedelta(days=10 - day))
        sql(db, "UPDATE tasks SET created_at = ? WHERE id = ?", stamp, ids[key])
    return ids


def _ids(keys: str, ids: dict[str, int]) -> list[int]:
    return sorted((ids[k] for k in keys), reverse=True)


FILTERS: list[tuple[TaskFilter, str]] = [
    (TaskFilter(), "abcde"),
    (TaskFilter(status=TaskStatus.QUEUED), "de"),
    (TaskFilter(status=TaskStatus.FAILED), "b"),
    (TaskFilter(template="translate"), "cd"),
    (TaskFilter(model="m1"), "ace"),
    (TaskFilter(model="nobody"), ""),
    (TaskFilter(template="summarize", model="m1", status=TaskStatus.QUEUED), "e"),
    (TaskFilter(created_from=NOW - timedelta(days=8)), "cde"),
    (TaskFilter(created_to=NOW - timedelta(days=8)), "ab"),  # the end is excluded
    (TaskFilter(created_from=NOW - timedelta(days=9), created_to=NOW - timedelta(days=7)), "bc"),
    (TaskFilter(created_from=(NOW - timedelta(days=7)).replace(tzinfo=None)), "de"),  # UTC
    (TaskFilter(text="plain"), "de"),
    (TaskFilter(text="PLAIN", template="summarize"), "e"),
    (TaskFilter(text="50%"), "a"),  # % is a character, not a wildcard
    (TaskFilter(text="off_sale"), "a"),  # so is _
    (TaskFilter(text="OFF"), "ab"),  # ASCII letters in any case
    (TaskFilter(text='"hi" \\'), "c"),  # as typed, though the JSON escapes it
    (TaskFilter(text="answer: 42"), "c"),  # in the result
    (TaskFilter(text="quota_exceeded"), "b"),  # in the error
    (TaskFilter(text="nowhere"), ""),
]


@pytest.mark.parametrize("plan", ["chosen", "walk", "ids"])
@pytest.mark.parametrize(("flt", "expected"), FILTERS)
async def test_each_filter_narrows_to_exactly_its_tasks(
    dashboard: DashboardStore,
    varied: dict[str, int],
    flt: TaskFilter,
    expected: str,
    plan: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if plan == "walk":  # however few tasks a time range holds, walk the table in id order
        monkeypatch.setattr(overview, "FEW_IN_RANGE", 0)
        monkeypatch.setattr(overview, "WALK_COST", 10**9)
    elif plan == "ids":  # however many, take them from the index
        monkeypatch.setattr(overview, "FEW_IN_RANGE", 10**9)
    page = await dashboard.page(flt)
    assert [t.id for t in page.items] == _ids(expected, varied)
    assert page.next_cursor is None
    assert await dashboard.count(flt) == len(expected)


async def test_keyset_pages_visit_every_matching_task_once(
    store: TaskStore, dashboard: DashboardStore
) -> None:
    ids = [await add(store, "odd" if i % 2 else "even", n=i) for i in range(23)]
    for flt, expected in [
        (TaskFilter(), sorted(ids, reverse=True)),
        (TaskFilter(template="odd"), sorted(ids[1::2], reverse=True)),
    ]:
        seen: list[int] = []
        cursor = None
        while True:
            page = await dashboard.page(flt, limit=4, before=cursor)
            assert len(page.items) <= 4
            seen += [t.id for t in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == expected


async def test_a_summary_carries_duration_tokens_and_error(
    store: TaskStore, dashboard: DashboardStore, db: Database
) -> None:
    task_id = await add(store)
    [first] = await store.claim("w", 1, 30)
    lease = Lease(task_id, "w", first.attempts)
    await store.start_step(lease, "s", 0)
    step = Step(id="s", position=0, status=StepStatus.FAILED, usage=Usage(1000, 1000))
    await store.finish_step(lease, step)
    await store.finish(lease, TaskStatus.FAILED, error=TaskError("x", "no"))
    await store.retry(task_id)
    [second] = await store.claim("w", 1, 30)
    lease = Lease(task_id, "w", second.attempts)
    for position, usage in enumerate([Usage(10, 5), Usage(prompt_tokens=7), None]):
        await store.start_step(lease, f"s{position}", position)
        await store.finish_step(
            lease,
            Step(id=f"s{position}", position=position, status=StepStatus.SUCCEEDED, usage=usage),
        )
    await store.finish(lease, TaskStatus.FAILED, error=TaskError("late", "failed again"))
    sql(
        db,
        "UPDATE tasks SET started_at = ?, finished_at = ? WHERE id = ?",
        "2026-12-01T13:00:00.000000Z",
        "2026-12-01T13:00:01.500000Z",
        task_id,
    )
    [summary] = (await dashboard.page(TaskFilter())).items
    assert summary.tokens == 22  # the current attempt's steps only
    assert summary.duration_ms == 1500.0
    assert summary.attempts == 2
    assert summary.error == TaskError("late", "failed again")
    assert summary.model == "m1" and summary.status is TaskStatus.FAILED


async def test_a_summary_of_a_task_that_ended_before_it_started_lasted_no_time(
    store: TaskStore, dashboard: DashboardStore, db: Database
) -> None:
    """The wall clock stepped back while it ran (NTP, a VM restored): its summary said
    -2000 ms, on the dashboard and in the API's list. A step's duration was kept at 0."""
    task_id = await add(store)
    [claimed] = await store.claim("w", 1, 30)
    await store.finish(Lease(task_id, "w", claimed.attempts), TaskStatus.SUCCEEDED)
    sql(
        db,
        "UPDATE tasks SET started_at = ?, finished_at = ? WHERE id = ?",
        "2026-12-01T13:00:02.000000Z",
        "2026-12-01T13:00:00.000000Z",
        task_id,
    )
    [summary] = (await dashboard.page(TaskFilter())).items
    [listed] = (await store.reads.page(None, None, 10, None)).items
    assert summary.duration_ms == listed.duration_ms == 0.0


async def test_counts_with_statuses_come_from_the_counters_or_the_rows(
    store: TaskStore, dashboard: DashboardStore, db: Database, varied: dict[str, int]
) -> None:
    cancellable = [TaskStatus.QUEUED, TaskStatus.RUNNING]
    assert await dashboard.count(TaskFilter(), cancellable) == 3
    assert await dashboard.count(TaskFilter(template="summarize"), cancellable) == 2
    assert await dashboard.count(TaskFilter(status=TaskStatus.FAILED), cancellable) == 0
    assert await dashboard.count(TaskFilter(template="summarize", status=TaskStatus.FAILED)) == 1
    # The counters answer without counting: prove it by making them disagree with the rows
    # (PostgreSQL's logged changes folded in first, so the counter is the whole count).
    await store.fold_counts()
    sql(db, "UPDATE task_counts SET n = 1000 WHERE status = 'queued'")
    assert await dashboard.count(TaskFilter(status=TaskStatus.QUEUED)) == 1000
    assert (await dashboard.counts())["queued"] == 1000
    assert await dashboard.count(TaskFilter(status=TaskStatus.QUEUED, model="m1")) == 1


async def test_matching_ids_walks_every_match_in_chunks(
    store: TaskStore, dashboard: DashboardStore
) -> None:
    ids = [await add(store, "a" if i % 3 else "b", n=i) for i in range(20)]
    await store.claim("w", 5, 30)  # the first five run
    wanted = [i for n, i in enumerate(ids) if n % 3]
    seen: list[int] = []
    after = None
    while chunk := await dashboard.matching_ids(
        TaskFilter(template="a"), [TaskStatus.QUEUED, TaskStatus.RUNNING], after, 3
    ):
        assert chunk == sorted(chunk) and len(chunk) <= 3
        seen += chunk
        after = chunk[-1]
    assert seen == wanted
    only_running = await dashboard.matching_ids(TaskFilter(), [TaskStatus.RUNNING], None, 100)
    assert only_running == ids[:5]
    assert await dashboard.newest_id() == ids[-1]


# -- overview ---------------------------------------------------------------------------------


async def test_overview_counts_each_minute_of_the_last_hour_oldest_first(
    store: TaskStore, dashboard: DashboardStore, db: Database
) -> None:
    ended = {
        "2026-12-01T13:05:29.999999Z": "succeeded",  # the current minute: the last bucket
        "2026-12-01T13:05:00.000000Z": "failed",
        "2026-12-01T13:04:59.999999Z": "succeeded",
        "2026-12-01T12:06:00.000000Z": "succeeded",  # the first bucket
        "2026-12-01T12:05:59.999999Z": "succeeded",  # before the hour
        "2026-12-01T13:06:00.000000Z": "succeeded",  # the next minute: not yet shown
        "2026-12-01T12:30:10.000000Z": "cancelled",  # neither succeeded nor failed
    }
    for stamp, status in ended.items():
        task_id = await add(store)
        sql(
            db,
            "UPDATE tasks SET status = ?, finished_at = ? WHERE id = ?",
            status,
            stamp,
            task_id,
        )
    result = await dashboard.overview(NOW)
    minutes = result.per_minute
    assert len(minutes) == 60
    assert minutes[0].minute == "2026-12-01T12:06" and minutes[-1].minute == "2026-12-01T13:05"
    assert [m.minute for m in minutes] == sorted(m.minute for m in minutes)
    by_minute = {m.minute: (m.succeeded, m.failed) for m in minutes if m.succeeded or m.failed}
    assert by_minute == {
        "2026-12-01T12:06": (1, 0),
        "2026-12-01T13:04": (1, 0),
        "2026-12-01T13:05": (1, 1),
    }
    # A clock in another zone means the same moment.
    later = await dashboard.overview(NOW.astimezone(timezone(timedelta(hours=-5))))
    assert later.per_minute == minutes


async def test_overview_names_the_oldest_due_task_and_the_newest_failures(
    store: TaskStore, dashboard: DashboardStore, db: Database
) -> None:
    empty = await dashboard.overview(NOW)
    assert empty.counts == {s.value: 0 for s in TaskStatus}
    assert empty.oldest_queued_at is None and empty.recent_failures == []
    queue = {  # run_at: priority; the longest waiting is neither first nor last in claim order
        "2026-12-01T12:30:00.000000Z": 5,
        "2026-12-01T12:00:00.000000Z": 0,
        "2026-12-01T12:10:00.000000Z": -2,
        "2026-12-01T14:00:00.000000Z": 9,
    }
    waiting = []
    for run_at, priority in queue.items():
        waiting.append(await add(store))
        sql(
            db,
            "UPDATE tasks SET run_at = ?, priority = ? WHERE id = ?",
            run_at,
            priority,
            waiting[-1],
        )
    assert (await dashboard.overview(NOW)).oldest_queued_at == "2026-12-01T12:00:00.000000Z"
    sql(db, "UPDATE tasks SET run_at = '2026-12-01T14:00:00.000000Z'")
    assert (await dashboard.overview(NOW)).oldest_queued_at is None  # none is due yet
    await store.cancel_many(waiting)
    failed = []
    for n in range(7):
        await add(store)
        failed.append(await finish(store, TaskStatus.FAILED, error=TaskError("x", f"no {n}")))
    result = await dashboard.overview(NOW, failures=3)
    assert [t.id for t in result.recent_failures] == failed[::-1][:3]
    assert [t.error.message for t in result.recent_failures if t.error] == ["no 6", "no 5", "no 4"]
    assert result.counts["failed"] == 7
