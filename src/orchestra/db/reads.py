"""What the API reads most: one task, its events, a page of tasks. One statement each.

On SQLite (:class:`JsonReads`) each read is one statement that SQLite answers as one JSON
document — the task with its current steps and its attempts aggregated by ``json_object`` and
``json_group_array`` — decoded by msgspec straight into the domain structs, and run on the
event loop's own connection (:meth:`Database.read_now`): no thread hop, no SQLAlchemy, one
snapshot. The JSON columns go in as they are stored (``json(column)`` keeps their text, so a
number keeps every digit); a REAL column goes in as 17 significant digits, which is the same
float again (``json_object`` would round it to 15).

:class:`EngineReads` reads the same through SQLAlchemy's async engine, statement by statement:
the path for PostgreSQL, and for a SQLite without its JSON functions. :func:`reads_for` is where
the choice is made.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Protocol

import msgspec
from sqlalchemy import select

from orchestra.db import events, reads_pg
from orchestra.db.engine import Database
from orchestra.db.events import TaskEvent
from orchestra.db.overview import DashboardStore, SummaryPage
from orchestra.db.rows import lasted_ms, load_details, task_from_row
from orchestra.db.tables import tasks
from orchestra.domain import Task, TaskFilter, TaskStatus, TaskSummary, first_page

#: How many events one read returns at most.
EVENTS_PER_READ = 500


class Reads(Protocol):
    """The reads the API serves most often."""

    async def task(self, task_id: int) -> Task | None:
        """One task with its attempts and the steps of its current attempt, or None."""
        ...

    async def status(self, task_id: int) -> TaskStatus | None:
        """A task's status alone, or None when there is no such task."""
        ...

    async def events_after(
        self, task_id: int, seq: int, limit: int = EVENTS_PER_READ
    ) -> list[TaskEvent]:
        """A task's events with a sequence number above ``seq``, in order."""
        ...

    async def page(
        self, status: TaskStatus | None, template: str | None, limit: int, before: int | None
    ) -> SummaryPage:
        """Task summaries, newest first, of one status and one template (None: any), with
        ids below ``before`` (the cursor)."""
        ...


def reads_for(db: Database) -> Reads:
    """The reads for ``db``: in one statement each on PostgreSQL, and on SQLite with its JSON
    functions (every SQLite since 3.38, and the builds Python ships before it); else through
    the engine."""
    if db.dialect == "postgresql":
        return JsonReads(db, _POSTGRESQL)
    return JsonReads(db, _SQLITE) if HAS_JSON else EngineReads(db)


def _has_json() -> bool:
    try:
        sqlite3.connect(":memory:").execute("SELECT json_group_array(json_object())")
    except sqlite3.Error:
        return False
    return True


HAS_JSON = _has_json()


def _real(column: str) -> str:
    """A REAL column as a JSON number that decodes to the same float (17 digits)."""
    return f"CASE WHEN {column} IS NULL THEN NULL ELSE json(printf('%!.17g', {column})) END"


# The aggregates' ORDER BY is kept: SQLite never flattens a subquery with an ORDER BY into an
# aggregate query (rule 16 of its query flattener).
_TASK = f"""
SELECT json_object(
    'id', t.id, 'template', t.template, 'template_version', t.template_version,
    'status', t.status, 'params', json(t.params), 'model', t.model, 'priority', t.priority,
    'attempts', t.attempts, 'max_attempts', t.max_attempts, 'created_at', t.created_at,
    'run_at', t.run_at, 'handed_back', t.handed_back,
    'timeout_seconds', {_real("t.timeout_seconds")},
    'cancel_requested', json(CASE WHEN t.cancel_requested THEN 'true' ELSE 'false' END),
    'idempotency_key', t.idempotency_key, 'result', json(t.result), 'error', json(t.error),
    'lease_owner', t.lease_owner, 'lease_expires_at', t.lease_expires_at,
    'started_at', t.started_at, 'finished_at', t.finished_at,
    'steps', (
        SELECT json_group_array(json_object(
            'id', s.step_id, 'position', s.position, 'status', s.status,
            'output', json(s.output), 'error', json(s.error), 'model', s.model,
            'usage', json(s.usage), 'started_at', s.started_at, 'finished_at', s.finished_at,
            'duration_ms', {_real("s.duration_ms")}, 'prompt', json(s.prompt),
            'fallbacks', json(s.fallbacks)))
        FROM (SELECT * FROM task_steps WHERE task_id = t.id AND attempt = t.attempts
              ORDER BY position) AS s),
    'history', (
        SELECT json_group_array(json_object(
            'number', a.number, 'worker', a.worker, 'status', a.status,
            'started_at', a.started_at, 'finished_at', a.finished_at, 'error', json(a.error)))
        FROM (SELECT * FROM task_attempts WHERE task_id = t.id ORDER BY number) AS a))
FROM tasks AS t WHERE t.id = ?
"""

_EVENTS = """
SELECT json_group_array(json_object(
    'seq', e.seq, 'time', e.time, 'type', e.type, 'data', json(e.data)))
FROM (SELECT seq, time, type, data FROM task_events
      WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?) AS e
"""


def _page_sql(status: bool, template: bool, before: bool) -> str:
    """A page of summaries, for the filters given. Each filter is written only when given (a
    ``:x IS NULL OR`` condition would keep SQLite from its index), so that the planner walks
    ix_tasks_status_id or ix_tasks_template_id in id order and stops at the page's end."""
    where = [
        *(["status = ?"] if status else []),
        *(["template = ?"] if template else []),
        *(["id < ?"] if before else []),
    ]
    return f"""
SELECT json_group_array(json_object(
    'id', t.id, 'template', t.template, 'template_version', t.template_version,
    'status', t.status, 'model', t.model, 'created_at', t.created_at,
    'started_at', t.started_at, 'finished_at', t.finished_at, 'duration_ms', NULL,
    'attempts', t.attempts, 'error', json(t.error), 'run_at', t.run_at,
    'tokens', (SELECT coalesce(sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)), 0)
               FROM task_steps WHERE task_id = t.id AND attempt = t.attempts)))
FROM (SELECT {reads_pg.SUMMARY_COLUMNS} FROM tasks {"WHERE " + " AND ".join(where) if where else ""}
      ORDER BY id DESC LIMIT ?) AS t
"""


class _Statements(msgspec.Struct, frozen=True):
    """One engine's SQL for the reads: a task, its status, its events, and a page for each
    filter set."""

    task: str
    status: str
    events: str
    pages: dict[tuple[bool, bool, bool], str]


_FILTERS = [(s, t, b) for s in (False, True) for t in (False, True) for b in (False, True)]
_SQLITE = _Statements(
    _TASK, "SELECT status FROM tasks WHERE id = ?", _EVENTS, {f: _page_sql(*f) for f in _FILTERS}
)
_POSTGRESQL = _Statements(
    reads_pg.TASK,
    "SELECT status FROM tasks WHERE id = %s",
    reads_pg.EVENTS,
    {f: reads_pg.page_sql(*f) for f in _FILTERS},
)
_decode_task = msgspec.json.Decoder(Task).decode
_decode_events = msgspec.json.Decoder(list[TaskEvent]).decode
_decode_summaries = msgspec.json.Decoder(list[TaskSummary]).decode


def _duration_ms(summary: TaskSummary) -> TaskSummary:
    """The summary with its duration: from its attempt's start to the task's end."""
    lasted = lasted_ms(summary.started_at, summary.finished_at)
    return summary if lasted is None else msgspec.structs.replace(summary, duration_ms=lasted)


def _one(conn: Any, sql: str, params: tuple[object, ...]) -> str | None:
    """The single value of a single-row statement (read to its end, which ends the read)."""
    rows = conn.execute(sql, params).fetchall()
    return rows[0][0] if rows else None


class JsonReads:
    """The reads in one statement each (see the module docstring): on SQLite on the event
    loop's own connection, on PostgreSQL on a connection of the engine's threads."""

    def __init__(self, db: Database, sql: _Statements = _SQLITE) -> None:
        self.db = db
        self._sql = sql

    async def task(self, task_id: int) -> Task | None:
        """One task with its attempts and the steps of its current attempt, or None."""
        sql = self._sql.task
        found = await self.db.read_now(lambda conn: _one(conn, sql, (task_id,)))
        return None if found is None else _decode_task(found)

    async def status(self, task_id: int) -> TaskStatus | None:
        """A task's status alone, or None when there is no such task."""
        sql = self._sql.status
        found = await self.db.read_now(lambda conn: _one(conn, sql, (task_id,)))
        return None if found is None else TaskStatus(found)

    async def events_after(
        self, task_id: int, seq: int, limit: int = EVENTS_PER_READ
    ) -> list[TaskEvent]:
        """A task's events with a sequence number above ``seq``, in order."""
        sql = self._sql.events
        found = await self.db.read_now(lambda conn: _one(conn, sql, (task_id, seq, limit)))
        return [] if found is None else _decode_events(found)

    async def page(
        self, status: TaskStatus | None, template: str | None, limit: int, before: int | None
    ) -> SummaryPage:
        """Task summaries, newest first (see :class:`Reads`)."""
        sql = self._sql.pages[status is not None, template is not None, before is not None]
        params = (
            *([status.value] if status is not None else []),
            *([template] if template is not None else []),
            *([before] if before is not None else []),
            limit + 1,
        )
        found = await self.db.read_now(lambda conn: _one(conn, sql, params))
        items = [] if found is None else [_duration_ms(s) for s in _decode_summaries(found)]
        page, last = first_page(items, limit)
        return SummaryPage(items=page, next_cursor=last.id if last else None)


class EngineReads:
    """The same reads through SQLAlchemy's async engine, a few statements each in one read
    transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def task(self, task_id: int) -> Task | None:
        """One task with its attempts and the steps of its current attempt, or None."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(tasks).where(tasks.c.id == task_id))).one_or_none()
            if row is None:
                return None
            details = await load_details(conn, {task_id: row.attempts})
        steps, history = details.get(task_id, ([], []))
        return task_from_row(row, steps, history)

    async def status(self, task_id: int) -> TaskStatus | None:
        """A task's status alone, or None when there is no such task."""
        async with self.db.read() as conn:
            found = (
                await conn.execute(select(tasks.c.status).where(tasks.c.id == task_id))
            ).scalar_one_or_none()
        return None if found is None else TaskStatus(found)

    async def events_after(
        self, task_id: int, seq: int, limit: int = EVENTS_PER_READ
    ) -> list[TaskEvent]:
        """A task's events with a sequence number above ``seq``, in order."""
        return await events.events_after(self.db, task_id, seq, limit)

    async def page(
        self, status: TaskStatus | None, template: str | None, limit: int, before: int | None
    ) -> SummaryPage:
        """Task summaries, newest first (see :class:`Reads`)."""
        wanted = TaskFilter(status=status, template=template)
        return await DashboardStore(self.db).page(wanted, limit=limit, before=before)
