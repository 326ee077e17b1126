"""Retention: finished tasks deleted in small batches, oldest first; with them the records
that outlive a task (finished webhook deliveries, schedules' ticks).

A transaction body with its SQL; :class:`~orchestra.db.store.TaskStore` runs it on the writer.
"""

from __future__ import annotations

from sqlalchemy import Connection, Select, delete, exists, select, text, tuple_

from orchestra.db import batches
from orchestra.db.portable import hinted
from orchestra.db.tables import batch_rows, schedule_fires, tasks, webhook_deliveries
from orchestra.db.tables import batches as batch_table
from orchestra.domain import ACTIVE, TERMINAL, TaskStatus

_TERMINAL = [status.value for status in TaskStatus if status in TERMINAL]
_ACTIVE = sorted(status.value for status in ACTIVE)
_FINISHED = ", ".join(f"'{status.value}'" for status in TaskStatus if status in TERMINAL)

# The index is named: left to itself the planner takes ix_tasks_status_id for the status list
# and sorts every finished task, holding the writer for half a second per batch at a million
# rows (0.4 ms this way).
_OLDEST_SQL = (
    "SELECT id FROM tasks INDEXED BY ix_tasks_finished_status "
    "WHERE finished_at IS NOT NULL AND finished_at < :cutoff "
    f"AND status IN ({_FINISHED}) "
    "ORDER BY finished_at LIMIT :batch"
)
_OLDEST = {d: text(hinted(_OLDEST_SQL, d)) for d in ("sqlite", "postgresql")}


def batches_to_keep(dialect: str, cutoff: str, batch: int) -> Select[int]:
    """The batches the next :func:`delete_finished_before` would take tasks from that have no
    tally kept yet, for a read before it: counting a big one there, off the writer, leaves
    the delete's transaction little to count."""
    oldest = _OLDEST[dialect].bindparams(cutoff=cutoff, batch=batch).columns(tasks.c.id)
    ids = oldest.subquery()
    owners = select(batch_rows.c.batch_id).where(batch_rows.c.task_id.in_(select(ids.c.id)))
    return select(batch_table.c.id).where(
        batch_table.c.id.in_(owners), batch_table.c.tally.is_(None)
    )


def delete_finished_before(conn: Connection, cutoff: str, batch: int) -> int:
    """Delete up to ``batch`` finished tasks (their steps, attempts and events go with them)
    that finished before ``cutoff``, oldest first; returns how many.

    First, in the same transaction, the batches those tasks belong to that have finished keep
    their tally (:func:`~orchestra.db.batches.keep_before_deleting`): a batch nobody read
    since it finished would otherwise lose its counts with its tasks."""
    oldest = _OLDEST[conn.dialect.name].bindparams(cutoff=cutoff, batch=batch).columns(tasks.c.id)
    ids = list(conn.execute(oldest).scalars())
    if not ids:
        return 0
    batches.keep_before_deleting(conn, ids)
    # Guarded again: a task retried since it was read (PostgreSQL) is not deleted.
    gone = delete(tasks).where(
        tasks.c.id.in_(ids), tasks.c.status.in_(_TERMINAL), tasks.c.finished_at < cutoff
    )
    return conn.execute(gone).rowcount


def delete_records_before(conn: Connection, cutoff: str, batch: int) -> int:
    """Delete up to ``batch`` finished webhook deliveries (with their attempts) and up to
    ``batch`` schedule ticks from before ``cutoff`` whose task (if any) is finished; returns
    how many rows in all. A tick's row is only needed while its time can still come due, or
    while its task is unfinished, so old ones can go."""
    d = webhook_deliveries
    # A finished delivery's next_attempt_at is its last claim's end, before it finished: the
    # (status, next_attempt_at) index finds them.
    old_deliveries = (
        select(d.c.id)
        .where(
            d.c.status.in_(("delivered", "failed")),
            d.c.next_attempt_at < cutoff,
            d.c.finished_at < cutoff,
        )
        .limit(batch)
    )
    f = schedule_fires
    # A tick whose task is unfinished stays: the next tick finds its previous task through it
    # (overlap = "skip"), and without it two of the schedule's tasks ran at once.
    unfinished = select(tasks.c.id).where(tasks.c.id == f.c.task_id, tasks.c.status.in_(_ACTIVE))
    old_ticks = (
        select(f.c.schedule_id, f.c.fire_at)
        .where(f.c.time < cutoff, ~exists(unfinished))
        .limit(batch)
    )
    deliveries = conn.execute(delete(d).where(d.c.id.in_(old_deliveries))).rowcount
    ticks = conn.execute(
        delete(f).where(tuple_(f.c.schedule_id, f.c.fire_at).in_(old_ticks))
    ).rowcount
    return deliveries + ticks
