"""Cancel and retry, as people ask for them: for one task or a chunk of many in one
transaction.

Each change is an UPDATE guarded by the statuses it expects (:mod:`~orchestra.db.guards`), so
a task that moved on meanwhile (a worker finished it, another request cancelled it) is left as
it is. These are transaction bodies: :class:`~orchestra.db.store.TaskStore` runs them on the
writer and tells the waiters.
"""

from __future__ import annotations

from collections.abc import Collection

import msgspec
from sqlalchemy import ColumnElement, Connection, select, update

from orchestra.db import events, guards, notices
from orchestra.db.attempts import CANCELLED_MEANWHILE
from orchestra.db.portable import greatest
from orchestra.db.rows import dump
from orchestra.db.tables import batch_rows, batches, tasks
from orchestra.domain import CANCELLED_BY_REQUEST, TaskStatus
from orchestra.event_types import TaskQueued

#: A held task that may be cancelled: its worker is asked to, by a flag it reads.
_FLAG_CANCEL = guards.may_become(TaskStatus.CANCELLED) & guards.LEASED


class Cancelled(msgspec.Struct, frozen=True):
    """What a cancel did: the tasks acted on, each with its status now (cancelled, or running
    while its worker still has to stop), and the template of each one cancelled at once (it
    never ran: its end is counted by whoever asked, as no worker will)."""

    acted: dict[int, TaskStatus]
    templates: list[str]


def cancel(conn: Connection, ids: Collection[int], now: str) -> Cancelled:
    """Cancel the queued ones among ``ids`` at once (each gets a ``task.finished`` event) and
    flag the running ones for their workers (``cancel_requested``). Ids of missing or
    finished tasks are left out of what it returns."""
    if not ids:
        return Cancelled({}, [])
    # Locked first on PostgreSQL (SQLite's writes are serial): each statement below reads
    # anew, and a worker's retry committed between the two (running, then queued) escaped
    # both, as a claim between them (queued, then running) did.
    if conn.dialect.name != "sqlite":
        conn.execute(
            select(tasks.c.id)
            .where(tasks.c.id.in_(list(ids)))
            .order_by(tasks.c.id)
            .with_for_update()
        )
    cancelled = sorted(
        conn.execute(
            update(tasks)
            .where(tasks.c.id.in_(list(ids)), guards.CANCEL.guard)
            .values(
                status=TaskStatus.CANCELLED.value, finished_at=now, error=dump(CANCELLED_BY_REQUEST)
            )
            .returning(tasks.c.id, tasks.c.template)
        ).all()
    )
    acted = {task_id: TaskStatus.CANCELLED for task_id, _ in cancelled}
    finished = CANCELLED_MEANWHILE  # (a cancel's end, whoever writes it)
    events.append_many(conn, [(task_id, finished) for task_id in acted], now)
    flagged = list(
        conn.execute(
            update(tasks)
            .where(tasks.c.id.in_(list(ids)), guards.status_in(_FLAG_CANCEL))
            .values(cancel_requested=1)
            .returning(tasks.c.id)
        ).scalars()
    )
    # Told to every process (PostgreSQL): the one running a flagged task stops it now, not
    # at its next lease renewal. SQLite's processes notice the commit itself.
    notices.changed(conn, flagged)
    acted.update(dict.fromkeys(flagged, TaskStatus.RUNNING))
    return Cancelled(acted, [template for _, template in cancelled])


def retry(conn: Connection, ids: Collection[int], now: str) -> list[int]:
    """Queue the failed and cancelled ones among ``ids`` again as a new attempt, due now (each
    gets a ``task.queued`` event saying it is a retry); returns their ids.

    Each gets at least one more attempt than it has used.
    """
    if not ids:
        return []
    requeued = sorted(
        conn.execute(
            update(tasks)
            .where(tasks.c.id.in_(list(ids)), guards.RETRY.guard)
            .values(
                status=TaskStatus.QUEUED.value,
                run_at=now,
                error=None,
                result=None,
                finished_at=None,
                cancel_requested=0,
                max_attempts=greatest(
                    tasks.c.max_attempts, tasks.c.attempts - tasks.c.handed_back + 1
                ),
            )
            .returning(tasks.c.id)
        ).scalars()
    )
    events.append_many(conn, [(task_id, TaskQueued(retry=True)) for task_id in requeued], now)
    if requeued:
        notices.queued(conn)
        rows = select(batch_rows.c.batch_id).where(batch_rows.c.task_id.in_(requeued))
        unsettle(conn, batches.c.id.in_(rows))
    return requeued


def unsettle(conn: Connection, which: ColumnElement[bool]) -> None:
    """The batches ``which`` selects have rows to do again (retried, or added): the tally kept
    of each is dropped and its revision bumped, so that a tally counted before cannot be kept
    after (:meth:`~orchestra.db.batches.BatchStore.tallies`)."""
    conn.execute(update(batches).where(which).values(tally=None, revision=batches.c.revision + 1))


def status_of(conn: Connection, task_id: int) -> TaskStatus | None:
    """A task's status now, or None when there is no such task."""
    status = conn.execute(select(tasks.c.status).where(tasks.c.id == task_id)).scalar()
    return None if status is None else TaskStatus(status)
