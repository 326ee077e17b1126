"""The claim: a worker takes the best due tasks, each a new attempt, on the writer.

One UPDATE … RETURNING over the tasks picked (:func:`claim_statement`), with each task's
attempt row, ``task.started`` event and first step written in the same transaction. Its
lease is what :mod:`orchestra.db.attempts` guards every later write with.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Connection,
    bindparam,
    insert,
    text,
    update,
)
from sqlalchemy.sql.elements import TextClause

from orchestra.db import events, guards
from orchestra.db.attempts import start_step
from orchestra.db.prepared import Prepared
from orchestra.db.rows import task_from_row
from orchestra.db.tables import task_attempts, tasks
from orchestra.domain import AttemptStatus, Lease, Task, TaskStatus
from orchestra.event_types import TaskStarted

#: A claim floor below every priority (a batch row's too): the claim takes any task.
ANY_PRIORITY = -(2**31)


# The pick's statements write the status as a literal, the words of the queue index's own
# WHERE (``ix_tasks_queue … WHERE status = 'queued'``): with a bound value, which could be
# any status, neither engine may use that partial index (SQLite never, PostgreSQL not in a
# generic plan), and the claim sorted every queued task: 40 ms a claim with 100,000 queued.
assert guards.CLAIM.sources == {TaskStatus.QUEUED}

#: SQLite's planner, without statistics, takes the status index for ``status = 'queued'``
#: (it guesses that an equality picks a few rows) and sorts what it finds, so each statement
#: of the pick names its index (``INDEXED BY``; SQLAlchemy renders no table hints for SQLite).
#:
#: The index holds each priority's tasks in ``run_at`` order, the due ones first and then
#: every task delayed to later: one ORDER BY … LIMIT over it walked all the delayed tasks of
#: a priority before it reached the next one (100,000 delayed: 9 ms a pickup, in the write
#: lock). The pick seeks each priority that has queued tasks instead, highest first
#: (:data:`_SQLITE_BAND`), and takes its due ones (:data:`_SQLITE_DUE_IN_BAND`) until it
#: has enough.
_SQLITE_BAND_SQL = text(
    "SELECT tasks.priority FROM tasks INDEXED BY ix_tasks_queue "
    "WHERE tasks.status = 'queued' AND tasks.priority >= :c_floor AND tasks.priority < :c_below "
    "ORDER BY tasks.priority DESC LIMIT 1"
)
_SQLITE_BAND = Prepared(_SQLITE_BAND_SQL)
_SQLITE_DUE_IN_BAND = (
    "SELECT tasks.id FROM tasks INDEXED BY ix_tasks_queue "
    "WHERE tasks.status = 'queued' AND tasks.priority = :c_band AND tasks.run_at <= :c_now"
    "{skip} ORDER BY tasks.run_at, tasks.id LIMIT :c_limit"
)
#: Past this many priorities walked, the rest are read in one ordered scan of the index, as
#: the claim did before the walk: a queue whose tasks are spread over many priorities (4,002
#: of them, batch lanes counted, each holding a delayed task) cost a seek and a read for
#: each (28 ms a claim on SQLite), where one scan of them all costs 0.25 ms.
MAX_BANDS = 8
#: Above every priority: where the walk of the bands starts.
_TOP = 2**31
_SQLITE_DUE_BELOW = (
    "SELECT tasks.id FROM tasks INDEXED BY ix_tasks_queue "
    "WHERE tasks.status = 'queued' AND tasks.priority >= :c_floor "
    "AND tasks.priority < :c_below AND tasks.run_at <= :c_now"
    "{skip} ORDER BY tasks.priority DESC, tasks.run_at, tasks.id LIMIT :c_limit"
)


def _skipping(skips: int) -> str:
    """The condition that leaves out ``skips`` models at their limit (bound as
    ``c_skip_0``…; NOT IN is NULL for a NULL model: model-less tasks may run)."""
    if not skips:
        return ""
    listed = ", ".join(f":c_skip_{n}" for n in range(skips))
    return f" AND (tasks.model IS NULL OR tasks.model NOT IN ({listed}))"


@functools.cache
def _sqlite_due_in_band(skips: int) -> Prepared:
    """:data:`_SQLITE_DUE_IN_BAND`, with none of ``skips`` models at their limit."""
    return Prepared(text(_SQLITE_DUE_IN_BAND.format(skip=_skipping(skips))))


@functools.cache
def _sqlite_due_below(skips: int) -> Prepared:
    """:data:`_SQLITE_DUE_BELOW`, with none of ``skips`` models at their limit."""
    return Prepared(text(_SQLITE_DUE_BELOW.format(skip=_skipping(skips))))


def _sqlite_pick(
    conn: Connection, now: str, limit: int, floor: int, skip_models: tuple[str, ...]
) -> list[int]:
    """The ids of the best ``limit`` due tasks, by priority, then run_at and id: the first
    :data:`MAX_BANDS` priorities one by one, the rest in one scan."""
    due = _sqlite_due_in_band(len(skip_models))
    skips = {f"c_skip_{n}": model for n, model in enumerate(skip_models)}
    picked: list[int] = []
    band = _first(_SQLITE_BAND.run(conn, {"c_floor": floor, "c_below": _TOP}))
    walked = 0
    while band is not None and len(picked) < limit:
        asked = {"c_band": band, "c_now": now, "c_limit": limit - len(picked), **skips}
        picked += [row[0] for row in due.run(conn, asked).fetchall()]
        walked += 1
        if len(picked) >= limit:
            break
        if walked == MAX_BANDS:
            rest = {"c_floor": floor, "c_below": band, "c_now": now, **skips}
            rest["c_limit"] = limit - len(picked)
            below = _sqlite_due_below(len(skip_models)).run(conn, rest)
            picked += [row[0] for row in below.fetchall()]
            break
        band = _first(_SQLITE_BAND.run(conn, {"c_floor": floor, "c_below": band}))
    return picked


@functools.cache
def _sqlite_claim(count: int) -> Prepared:
    """The claim's UPDATE of ``count`` tasks picked (``c_id_0``…)."""
    chosen = tasks.c.id.in_([bindparam(f"c_id_{n}") for n in range(count)])
    return Prepared(_claim_update(chosen))


def _first(cursor: Any) -> Any:
    """The first column of a cursor's one row; None without a row."""
    row = cursor.fetchone()
    return None if row is None else row[0]


#: PostgreSQL's pick of the due tasks, in one statement: the priorities that have queued tasks,
#: highest first (a recursive walk of the queue index, one seek a priority), and each one's
#: due tasks in order (a LATERAL scan of the index at that priority, from its first task up
#: to now), locked as they are taken (``FOR UPDATE SKIP LOCKED``: rows another process is
#: claiming are passed over, not waited for). PostgreSQL runs a WITH query only as far as
#: its reader fetches (its documented behaviour, which ends a recursion under a LIMIT), so
#: the walk stops at the priority that fills the claim; past :data:`MAX_BANDS` priorities,
#: the rest are read in one ordered scan (the second part, run only when the walk fell
#: short). One ORDER BY … LIMIT over the index read every task delayed to later (100,000 of
#: them: a sequential scan, 10 ms a claim).
_PG_DUE = f"""
WITH RECURSIVE bands(p, n) AS (
    SELECT (SELECT priority FROM tasks WHERE status = 'queued' AND priority >= :c_floor
            ORDER BY priority DESC LIMIT 1), 1
  UNION ALL
    SELECT (SELECT priority FROM tasks WHERE status = 'queued' AND priority >= :c_floor
            AND priority < bands.p ORDER BY priority DESC LIMIT 1), bands.n + 1
    FROM bands WHERE bands.p IS NOT NULL AND bands.n < {MAX_BANDS}
)
SELECT picked.id FROM (
    SELECT walked.id FROM bands CROSS JOIN LATERAL (
        SELECT tasks.id FROM tasks
        WHERE tasks.status = 'queued' AND tasks.priority = bands.p
        AND tasks.run_at <= :c_now{{skip}}
        ORDER BY tasks.run_at, tasks.id LIMIT :c_limit FOR UPDATE SKIP LOCKED
    ) AS walked
  UNION ALL
    SELECT rest.id FROM (
        SELECT tasks.id FROM tasks
        WHERE tasks.status = 'queued' AND tasks.priority >= :c_floor
        AND tasks.priority < (SELECT bands.p FROM bands WHERE bands.n = {MAX_BANDS})
        AND tasks.run_at <= :c_now{{skip}}
        ORDER BY tasks.priority DESC, tasks.run_at, tasks.id LIMIT :c_limit FOR UPDATE SKIP LOCKED
    ) AS rest
) AS picked
LIMIT :c_limit
"""
#: The most tasks one claim takes on PostgreSQL (a worker pool with more free slots claims
#: again). A constant bound the planner can see: with the limit a parameter alone, a
#: prepared statement's generic plan guessed thousands of rows and joined them to the tasks
#: by a sequential scan of the table, at every claim.
PG_CLAIM_MOST = 100
_PG_DUE_BOUNDED = f"SELECT bounded.id FROM ({_PG_DUE}) AS bounded LIMIT {PG_CLAIM_MOST}"


def claim_statement(skip_models: tuple[str, ...] = (), engine: str = "sqlite") -> Any:
    """The claim: one UPDATE … RETURNING over the best due tasks.

    On PostgreSQL the due tasks are picked once (:data:`_PG_DUE`), in a CTE that locks them;
    an ``id IN (subquery … LIMIT)`` there may be planned as a subquery run again per row,
    which finds the next due task each time and claims the whole queue. On SQLite,
    :func:`_sqlite_pick` picks them first, in the same transaction (one writer at a time, no
    row locks): the statement updates those (``c_id_0``…, here one).

    Only tasks of priority ``c_floor`` or more are taken (:data:`ANY_PRIORITY`: any): a
    pool whose reserved slot is all that is left claims single tasks only. A range on the
    queue index's first column, so the claim reads no batch row it may not take.
    """
    if engine != "postgresql":
        return _claim_update(tasks.c.id.in_([bindparam("c_id_0")]))
    skip = ""
    if skip_models:
        # NOT IN is NULL for a NULL model: say explicitly that model-less tasks may run.
        listed = ", ".join(f":c_skip_{n}" for n in range(len(skip_models)))
        skip = f" AND (tasks.model IS NULL OR tasks.model NOT IN ({listed}))"
    binds: list[BindParameter[Any]] = [
        bindparam(f"c_skip_{n}", model) for n, model in enumerate(skip_models)
    ]
    due = text(_PG_DUE_BOUNDED.format(skip=skip)).bindparams(*binds).columns(tasks.c.id)
    picked = due.cte("due")
    return _claim_update(tasks.c.id == picked.c.id)


def _claim_update(chosen: ColumnElement[bool] | TextClause) -> Any:
    """The claim's UPDATE … RETURNING of the ``chosen`` tasks."""
    return (
        update(tasks)
        .where(chosen, guards.CLAIM.guard)
        .values(
            status=TaskStatus.RUNNING.value,
            lease_owner=bindparam("c_owner"),
            lease_expires_at=bindparam("c_expires"),
            attempts=tasks.c.attempts + 1,
            started_at=bindparam("c_now"),
            finished_at=None,
            # A retry's earlier error stays in its attempt's record: the task's own is the
            # outcome of the attempt running now, none yet.
            error=None,
        )
        .returning(*tasks.c)
    )


CLAIM = Prepared(lambda engine: claim_statement(engine=engine))
ADD_ATTEMPT = Prepared(
    insert(task_attempts).values(
        task_id=bindparam("a_task"),
        number=bindparam("a_number"),
        worker=bindparam("a_worker"),
        status=AttemptStatus.RUNNING.value,
        started_at=bindparam("a_at"),
    )
)


def claim(
    conn: Connection,
    owner: str,
    limit: int,
    now: str,
    expires: str,
    skip_models: Collection[str],
    first_step: Callable[[Task], str | None] | None,
    min_priority: int | None = None,
) -> list[Task]:
    """Take up to ``limit`` due tasks of priority ``min_priority`` or more for ``owner`` until
    ``expires``: each a new attempt, with its ``task.started`` event and (``first_step``) its
    first step started. ``min_priority`` None: any priority."""
    params = {
        "c_now": now,
        "c_limit": limit,
        "c_floor": ANY_PRIORITY if min_priority is None else min_priority,
        "c_owner": owner,
        "c_expires": expires,
    }
    if conn.dialect.name != "postgresql":
        floor = ANY_PRIORITY if min_priority is None else min_priority
        picked = _sqlite_pick(conn, now, limit, floor, tuple(skip_models))
        ids = {f"c_id_{n}": task_id for n, task_id in enumerate(picked)}
        rows = _sqlite_claim(len(picked)).rows(conn, {**params, **ids}) if picked else []
    elif not skip_models:
        rows = CLAIM.rows(conn, params)
    else:  # models at their limit: a NOT IN list, through Core
        skipping = claim_statement(tuple(skip_models), conn.dialect.name)
        rows = [dict(r._mapping) for r in conn.execute(skipping, params)]
    if not rows:
        return []
    claimed = [task_from_row(r) for r in rows]
    ADD_ATTEMPT.run_many(
        conn,
        [{"a_task": t.id, "a_number": t.attempts, "a_worker": owner, "a_at": now} for t in claimed],
    )
    events.append_many(
        conn, [(t.id, TaskStarted(attempt=t.attempts, worker=owner)) for t in claimed], now
    )
    if first_step is not None:
        for task in claimed:
            step_id = first_step(task)
            if step_id is not None:
                lease = Lease(task_id=task.id, owner=owner, attempt=task.attempts)
                start_step(conn, lease, step_id, 0, now)
    return claimed
