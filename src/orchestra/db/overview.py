"""What the dashboard reads: counts by status, the last hour minute by minute, filtered task
listings, and the ids a bulk action walks through.

Each query is shaped to stay fast with a million tasks (benchmarks/dashboard_data.py measures
them): counts come from the counters in ``task_counts`` (kept exact by triggers, migration 5),
the per-minute chart from index-only range scans of ``ix_tasks_finished_status``, and listings
walk an index in id order and stop at the end of the page (keyset pagination, never OFFSET).
What no index serves is a text search: it reads each candidate row's JSON.

Without statistics (nothing runs ANALYZE) SQLite's planner guesses; where a guess costs a scan
of the table, the query says which index to use (``INDEXED BY``, which also fails loudly if the
index is dropped) or keeps a condition off an index (a unary ``+``, SQLite's documented way).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import ColumnElement, Select, func, or_, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestra.db import counts, feed
from orchestra.db.engine import Database
from orchestra.db.portable import hinted, like, unindexed
from orchestra.db.rows import dump, summary_from_row
from orchestra.db.tables import task_steps, tasks
from orchestra.domain import TaskFilter, TaskStatus, TaskSummary, as_utc, first_page, iso

__all__ = [
    "DashboardStore",
    "MinuteCount",
    "Overview",
    "SummaryPage",
    "TaskFilter",
    "TaskSummary",
]

#: The chart's span: this many minutes, the current one last.
CHART_MINUTES = 60
#: A listing filtered by creation time takes the ids in the range from ix_tasks_created and
#: sorts them when the range holds fewer than this many tasks, or when walking the table in id
#: order would pass more than :data:`WALK_COST` times as many newer tasks first (a row passed
#: costs about a third of a row looked up and sorted). Else it walks in id order, where a
#: large range soon fills a page.
FEW_IN_RANGE = 20_000
WALK_COST = 3
#: At most this many tasks are counted to choose (index-only: a few milliseconds).
RANGE_PROBE = 50_000
#: A count with one status holding fewer tasks than this reads them all through
#: ix_tasks_status_id rather than let the planner pick the template's or model's index.
STATUS_DRIVES = 100_000

_SUMMARY_COLUMNS = (
    tasks.c.id,
    tasks.c.template,
    tasks.c.template_version,
    tasks.c.status,
    tasks.c.model,
    tasks.c.created_at,
    tasks.c.started_at,
    tasks.c.finished_at,
    tasks.c.attempts,
    tasks.c.error,
    tasks.c.run_at,
)
#: The columns a text search looks in.
_SEARCHED = (tasks.c.params, tasks.c.result, tasks.c.error)

# The queue at a glance, in one statement: the smallest run_at of a queued task (the one
# waiting longest, if it is due) and how many queued tasks are not due yet (delayed, or
# waiting to retry). The queue's index is ordered by priority first, so min(run_at) over it
# reads the whole queue (48 ms with 500,000 queued); instead, step from one priority to the
# next lower one: per priority in use, two seeks for its first run_at and a range of the index
# after ``now`` (index-only: as long as the tasks scheduled later, not the queue).
_QUEUE_SQL = """
WITH RECURSIVE levels(priority) AS (
    SELECT max(priority) FROM tasks INDEXED BY ix_tasks_queue WHERE status = 'queued'
    UNION ALL
    SELECT (SELECT max(priority) FROM tasks INDEXED BY ix_tasks_queue
            WHERE status = 'queued' AND priority < levels.priority)
    FROM levels WHERE levels.priority IS NOT NULL
)
SELECT min((SELECT run_at FROM tasks INDEXED BY ix_tasks_queue
            WHERE status = 'queued' AND priority = levels.priority
            ORDER BY run_at LIMIT 1)),
    coalesce(sum((SELECT count(*) FROM tasks INDEXED BY ix_tasks_queue
                  WHERE status = 'queued' AND priority = levels.priority
                  AND run_at > :now)), 0)
FROM levels WHERE levels.priority IS NOT NULL
"""
# Succeeded and failed tasks per minute, zero-filled, oldest first: two index-only range scans
# per minute (a GROUP BY over the hour's rows sorted them all: 4x slower). Minute labels
# ("2026-12-01T13:05") bound the stored times exactly, as text.
_PER_MINUTE_SQLITE = text(
    """
WITH RECURSIVE minutes(lo, hi) AS (
    SELECT :first, strftime('%Y-%m-%dT%H:%M', :first, '+1 minute')
    UNION ALL
    SELECT hi, strftime('%Y-%m-%dT%H:%M', hi, '+1 minute') FROM minutes WHERE hi <= :last
)
SELECT lo,
    (SELECT count(*) FROM tasks INDEXED BY ix_tasks_finished_status
     WHERE finished_at >= lo AND finished_at < hi AND status = 'succeeded'),
    (SELECT count(*) FROM tasks INDEXED BY ix_tasks_finished_status
     WHERE finished_at >= lo AND finished_at < hi AND status = 'failed')
FROM minutes
"""
)

_QUEUE = {d: text(hinted(_QUEUE_SQL, d)) for d in ("sqlite", "postgresql")}
# The latest to fail, through the index of failed tasks alone (migration 20): a seek, however
# rare failures are. By id, an old task retried that failed again never showed.
_LATEST_FAILED_SQL = (
    "SELECT id FROM tasks INDEXED BY ix_tasks_failed "
    "WHERE status = 'failed' AND finished_at IS NOT NULL ORDER BY finished_at DESC LIMIT :n"
)
_LATEST_FAILED = {d: text(hinted(_LATEST_FAILED_SQL, d)) for d in ("sqlite", "postgresql")}
# PostgreSQL counts the hour in one GROUP BY over its finished index; the minutes it has no
# rows for are filled with zeros in Python.
_PER_MINUTE_GROUPED = text(
    """
SELECT substr(finished_at, 1, 16) AS minute, status, count(*)
FROM tasks
WHERE finished_at >= :first AND finished_at < :end AND status IN ('succeeded', 'failed')
GROUP BY 1, 2
"""
)


class SummaryPage(msgspec.Struct, frozen=True):
    """One page of a filtered listing, newest first; ``next_cursor`` is the ``before`` of the
    next page (None on the last)."""

    items: list[TaskSummary]
    next_cursor: int | None


class MinuteCount(msgspec.Struct, frozen=True):
    """Tasks that ended in one minute (UTC, ``2026-12-01T13:05``), by how they ended."""

    minute: str
    succeeded: int
    failed: int


class Overview(msgspec.Struct, frozen=True):
    """The state of the service at a glance.

    ``counts`` has every status word (the queue depth is ``counts["queued"]``).
    ``oldest_queued_at`` is when the longest-waiting due task became due (its ``run_at``: its
    submit, the end of its delay, its retry), None when no queued task is due.
    ``per_minute`` covers the last hour, oldest minute first, the current minute last,
    zero-filled. ``recent_failures`` are the failed tasks that failed last, latest first.
    ``scheduled`` is how many queued tasks are not due yet (a delay, a retry's backoff): the
    queue's depth less these is what waits for a worker now. ``newest_event`` is the id of
    the newest task event (what a live page was last told of, with ``counts``).
    """

    counts: dict[str, int]
    oldest_queued_at: str | None
    per_minute: list[MinuteCount]
    recent_failures: list[TaskSummary]
    scheduled: int = 0
    newest_event: int = 0


class Changes(msgspec.Struct, frozen=True):
    """What a live page was last told of: the counts by status and the id of the newest
    event (a change that leaves the counts as they were, a failed task retried that failed
    again, still writes events)."""

    counts: dict[str, int]
    newest_event: int


def like_pattern(text: str) -> str:
    """A LIKE pattern (escape character ``\\``) matching ``text`` anywhere in a JSON column.

    The text is looked for as the JSON spells it, so a quote or a backslash in it matches the
    escaped one stored; ``%`` and ``_`` match only themselves.
    """
    as_json = (dump(text) or '""')[1:-1]
    escaped = as_json.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _time_bounds(f: TaskFilter) -> dict[str, str]:
    bounds = {}
    if f.created_from is not None:
        bounds["created_from"] = iso(as_utc(f.created_from))
    if f.created_to is not None:
        bounds["created_to"] = iso(as_utc(f.created_to))
    return bounds


def _in_range_sql(bounds: dict[str, str], dialect: str) -> str:
    """The ids in a creation time range, read from ix_tasks_created alone."""
    where = []
    if "created_from" in bounds:
        where.append("created_at >= :created_from")
    if "created_to" in bounds:
        where.append("created_at < :created_to")
    sql = f"SELECT id FROM tasks INDEXED BY ix_tasks_created WHERE {' AND '.join(where)}"
    return hinted(sql, dialect)


def _conditions(f: TaskFilter, plan: str, dialect: str) -> list[ColumnElement[bool]]:
    """A filter's conditions other than its status, shaped for a plan.

    Args:
        plan: ``"plain"``: the planner picks any index; ``"walk"``: not ix_tasks_created (a
            walk in id order); ``"ids"``: the ids in the time range come from
            ix_tasks_created (a small range); ``"status"``: no index but ix_tasks_status_id.
    """
    where: list[ColumnElement[bool]] = []
    indexed = plan != "status"
    if f.template is not None:
        template = tasks.c.template if indexed else unindexed(tasks.c.template)
        where.append(template == f.template)
    if f.model is not None:
        model = tasks.c.model if indexed else unindexed(tasks.c.model)
        where.append(model == f.model)
    bounds = _time_bounds(f)
    if bounds and plan == "ids":
        in_range = text(_in_range_sql(bounds, dialect)).bindparams(**bounds).columns(tasks.c.id)
        where.append(tasks.c.id.in_(in_range))
    elif bounds:
        created = tasks.c.created_at if plan == "plain" else unindexed(tasks.c.created_at)
        if "created_from" in bounds:
            where.append(created >= bounds["created_from"])
        if "created_to" in bounds:
            where.append(created < bounds["created_to"])
    if f.text:
        pattern = like_pattern(f.text)
        where.append(or_(*(like(column, pattern) for column in _SEARCHED)))
    return where


def _words(f: TaskFilter, statuses: Collection[TaskStatus] | None) -> list[str]:
    """The status words a filter and a set of statuses allow together, in a fixed order."""
    allowed = [s for s in TaskStatus if statuses is None or s in statuses]
    return [s.value for s in allowed if f.status is None or s is f.status]


class DashboardStore:
    """The dashboard's queries (read-only; bulk changes are TaskStore's ``cancel_many`` and
    ``retry_many``)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def counts(self) -> dict[str, int]:
        """How many tasks are in each status, every status word present (from the counters)."""
        async with self.db.read() as conn:
            return await _counts(conn)

    async def changes(self) -> Changes:
        """The counts and the newest event's id, from one snapshot."""
        async with self.db.read() as conn:
            return Changes(counts=await _counts(conn), newest_event=await feed.newest_id(conn))

    async def overview(self, now: datetime, failures: int = 5) -> Overview:
        """Counts, the oldest due queued task, the last hour by minute and the newest failures,
        from one consistent snapshot.

        Args:
            now: the current time (a parameter, so tests choose it); without a zone, UTC.
            failures: how many recent failures to list.
        """
        now = as_utc(now).astimezone(UTC)
        first = now.replace(second=0, microsecond=0) - timedelta(minutes=CHART_MINUTES - 1)
        span = {
            "first": first.strftime("%Y-%m-%dT%H:%M"),
            "last": (first + timedelta(minutes=CHART_MINUTES - 1)).strftime("%Y-%m-%dT%H:%M"),
        }
        async with self.db.read() as conn:
            counts = await _counts(conn)
            queue = _QUEUE[conn.dialect.name]
            due, later = (await conn.execute(queue, {"now": iso(now)})).one()
            minutes = await _per_minute(conn, span)
            recent = await _latest_failed(conn, failures) if failures > 0 else []
            newest = await feed.newest_id(conn)
        return Overview(
            counts=counts,
            oldest_queued_at=due if due is not None and due <= iso(now) else None,
            per_minute=minutes,
            recent_failures=recent,
            scheduled=int(later or 0),
            newest_event=newest,
        )

    async def page(
        self, filter: TaskFilter, limit: int = 50, before: int | None = None
    ) -> SummaryPage:
        """A page of the tasks matching ``filter``, newest first, with keyset pagination.

        Args:
            before: the cursor: only tasks with a smaller id (the previous page's next_cursor).
        """
        query = select(*_SUMMARY_COLUMNS).order_by(tasks.c.id.desc()).limit(limit + 1)
        if filter.status is not None:
            query = query.where(tasks.c.status == filter.status.value)
        if before is not None:
            query = query.where(tasks.c.id < before)
        async with self.db.read() as conn:
            # A time range walked in id order finds its first tasks at once when it is large
            # and recent, but reads the whole table to learn that a small one has no more.
            plan = await _time_plan(conn, filter)
            query = query.where(*_conditions(filter, plan, conn.dialect.name))
            items = await _summaries(conn, query)
        page, last = first_page(items, limit)
        return SummaryPage(items=page, next_cursor=last.id if last else None)

    async def count(
        self, filter: TaskFilter, statuses: Collection[TaskStatus] | None = None
    ) -> int:
        """How many tasks match ``filter`` (and are in one of ``statuses``, when given): the
        exact number a bulk action's confirmation states.

        With nothing but a status to filter on, the answer comes from the counters; otherwise
        it counts the matching rows (through an index where the filter has one; a text search
        reads every candidate).
        """
        words = _words(filter, statuses)
        if not words:
            return 0
        async with self.db.read() as conn:
            counts = await _counts(conn)
            if not _conditions(filter, "plain", conn.dialect.name):
                return sum(counts[w] for w in words)
            # Without statistics the planner takes the template's index over a status's, even
            # when the status holds a few thousand tasks and the template most of the table.
            selective = len(words) == 1 and counts[words[0]] < STATUS_DRIVES
            conditions = _conditions(filter, "status" if selective else "plain", conn.dialect.name)
            query = select(func.count()).select_from(tasks).where(*conditions)
            if len(words) == 1:
                query = query.where(tasks.c.status == words[0])
            elif len(words) < len(TaskStatus):
                query = query.where(tasks.c.status.in_(words))
            return int((await conn.execute(query)).scalar_one())

    async def matching_ids(
        self,
        filter: TaskFilter,
        statuses: Collection[TaskStatus],
        after: int | None,
        limit: int,
    ) -> list[int]:
        """Up to ``limit`` ids of tasks matching ``filter`` that are in one of ``statuses``,
        ascending, above ``after``: walk all of them by passing the last id back.

        Each status is walked on its own through ix_tasks_status_id (a seek, then a run in id
        order; the statuses a bulk action changes are the table's small ones) and the runs
        merged, so walking them all reads each task of those statuses once.
        """
        conditions = _conditions(filter, "status", self.db.dialect)
        if after is not None:
            conditions.append(tasks.c.id > after)
        runs: list[int] = []
        async with self.db.read() as conn:
            for word in _words(filter, statuses):
                query = (
                    select(tasks.c.id)
                    .where(tasks.c.status == word, *conditions)
                    .order_by(tasks.c.id)
                    .limit(limit)
                )
                runs.extend((await conn.execute(query)).scalars())
        return sorted(runs)[:limit]

    async def newest_id(self) -> int:
        """The highest task id so far (0 with no tasks): read when a bulk action over a
        filter is confirmed, it is where the action stops, so tasks submitted after the
        confirmation are left alone."""
        async with self.db.read() as conn:
            return int((await conn.execute(select(func.max(tasks.c.id)))).scalar() or 0)


async def _counts(conn: AsyncConnection) -> dict[str, int]:
    return await counts.read(conn)


async def _time_plan(conn: AsyncConnection, f: TaskFilter) -> str:
    """How a listing should test ``f``'s creation time range: ``"ids"`` (from its index, then
    sorted) or ``"walk"`` (in id order); counted from ix_tasks_created alone."""
    bounds = _time_bounds(f)
    if not bounds:
        return "walk"
    # A range up to now is walked from its newest end: only its size matters.
    open_ended = "created_to" not in bounds
    cap = FEW_IN_RANGE if open_ended else RANGE_PROBE
    inside = await _count_upto(conn, _in_range_sql(bounds, conn.dialect.name), bounds, cap)
    if inside < FEW_IN_RANGE:
        return "ids"
    if open_ended:
        return "walk"
    newer = await _count_upto(
        conn,
        hinted(
            "SELECT id FROM tasks INDEXED BY ix_tasks_created WHERE created_at >= :created_to",
            conn.dialect.name,
        ),
        {"created_to": bounds["created_to"]},
        WALK_COST * inside,
    )
    return "ids" if newer >= WALK_COST * inside else "walk"


async def _per_minute(conn: AsyncConnection, span: dict[str, str]) -> list[MinuteCount]:
    """Succeeded and failed tasks in each minute from ``span["first"]`` to ``span["last"]``,
    oldest first, zero-filled."""
    if conn.dialect.name == "sqlite":
        rows = (await conn.execute(_PER_MINUTE_SQLITE, span)).all()
        return [MinuteCount(m, int(ok), int(bad)) for m, ok, bad in rows]
    first = datetime.fromisoformat(span["first"])
    labels = [
        (first + timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M") for i in range(CHART_MINUTES)
    ]
    end = (first + timedelta(minutes=CHART_MINUTES)).strftime("%Y-%m-%dT%H:%M")
    found: dict[tuple[str, str], int] = {}
    for minute, status, n in await conn.execute(
        _PER_MINUTE_GROUPED, {"first": span["first"], "end": end}
    ):
        found[minute, status] = int(n)
    return [
        MinuteCount(m, found.get((m, "succeeded"), 0), found.get((m, "failed"), 0)) for m in labels
    ]


async def _count_upto(conn: AsyncConnection, sql: str, params: dict[str, str], cap: int) -> int:
    """How many rows ``sql`` selects, counting no further than ``cap``."""
    probe = text(f"SELECT count(*) FROM ({sql} LIMIT {int(cap)}) AS probe")
    return int((await conn.execute(probe, params)).scalar_one())


async def _latest_failed(conn: AsyncConnection, limit: int) -> list[TaskSummary]:
    """The ``limit`` failed tasks that failed last, latest first."""
    latest = _LATEST_FAILED[conn.dialect.name]
    ids = list((await conn.execute(latest, {"n": limit})).scalars())
    query = (
        select(*_SUMMARY_COLUMNS)
        .where(tasks.c.id.in_(ids))
        .order_by(tasks.c.finished_at.desc(), tasks.c.id.desc())
    )
    return await _summaries(conn, query) if ids else []


async def _summaries(conn: AsyncConnection, query: Select[Any]) -> list[TaskSummary]:
    """The summaries of the rows ``query`` selects (``_SUMMARY_COLUMNS``), with the tokens of
    each one's current attempt: two queries."""
    rows = (await conn.execute(query)).all()
    tokens = await _tokens(conn, {row.id: row.attempts for row in rows})
    return [summary_from_row(row, tokens.get(row.id, 0)) for row in rows]


async def _tokens(conn: AsyncConnection, attempts: dict[int, int]) -> dict[int, int]:
    """Prompt plus completion tokens of each task's current attempt (its steps' sum)."""
    if not attempts:
        return {}
    used = func.coalesce(task_steps.c.prompt_tokens, 0) + func.coalesce(
        task_steps.c.completion_tokens, 0
    )
    query = (
        select(task_steps.c.task_id, task_steps.c.attempt, func.sum(used))
        .where(task_steps.c.task_id.in_(list(attempts)))
        .group_by(task_steps.c.task_id, task_steps.c.attempt)
    )
    rows = (await conn.execute(query)).all()
    return {task: int(n) for task, attempt, n in rows if attempts[task] == attempt}
