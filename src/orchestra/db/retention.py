"""Retention: finished tasks deleted in small batches, oldest first.

A transaction body with its SQL; :class:`~orchestra.db.store.TaskStore` runs it on the writer.
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, text

from orchestra.db.portable import hinted
from orchestra.db.tables import tasks
from orchestra.domain import TERMINAL, TaskStatus

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


def delete_finished_before(conn: Connection, cutoff: str, batch: int) -> int:
    """Delete up to ``batch`` finished tasks (their steps, attempts and events go with them)
    that finished before ``cutoff``, oldest first; returns how many."""
    oldest = _OLDEST[conn.dialect.name].bindparams(cutoff=cutoff, batch=batch).columns(tasks.c.id)
    return conn.execute(delete(tasks).where(tasks.c.id.in_(oldest))).rowcount
