"""How many tasks are in each status: the counters (``task_counts``) plus the changes
PostgreSQL's trigger logged since they were last folded in (``task_count_changes``; migration 9
says why). On SQLite the log stays empty."""

from __future__ import annotations

from sqlalchemy import Connection, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestra.db.tables import task_count_changes, task_counts
from orchestra.domain import TaskStatus

# One statement: the changes taken out of the log and added to the counters. Changes logged
# meanwhile by others stay for the next fold; two folds at once each take their own rows.
_FOLD = text(
    """
WITH moved AS (DELETE FROM task_count_changes RETURNING status, delta),
     sums AS (SELECT status, sum(delta) AS delta FROM moved GROUP BY status)
UPDATE task_counts SET n = task_counts.n + sums.delta
FROM sums WHERE task_counts.status = sums.status
"""
)
_CHANGES = select(task_count_changes.c.status, func.sum(task_count_changes.c.delta)).group_by(
    task_count_changes.c.status
)


async def read(conn: AsyncConnection) -> dict[str, int]:
    """Every status word with its count (in the caller's snapshot)."""
    counters = await conn.execute(select(task_counts.c.status, task_counts.c.n))
    found = {status: int(n) for status, n in counters}
    for status, delta in await conn.execute(_CHANGES):
        found[status] = found.get(status, 0) + int(delta)
    return {s.value: found.get(s.value, 0) for s in TaskStatus}


def fold(conn: Connection) -> None:
    """Fold the logged changes into the counters (PostgreSQL; a transaction body)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_FOLD)
