"""Putting tasks in the queue: the INSERT of a submit, decided by its idempotency key.

Transaction bodies with their SQL beside them; :class:`~orchestra.db.store.TaskStore` runs
them on the writer (and reads an earlier submit back).
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import Connection, bindparam

from orchestra.db import events, notices
from orchestra.db.prepared import Prepared, insert_of
from orchestra.db.rows import dump
from orchestra.db.tables import tasks
from orchestra.domain import NewTask, TaskStatus, iso
from orchestra.event_types import TaskQueued

#: The columns a submit writes: the new task's own (:class:`NewTask` names them), its status
#: and its time.
_ENQUEUE_COLUMNS = (*NewTask.__struct_fields__, "status", "created_at")
# SQLite's (and PostgreSQL's) INSERT … ON CONFLICT DO NOTHING: the idempotency key, unique
# within its scope (the API key that used it), decides.
ENQUEUE = Prepared(
    lambda engine: (
        insert_of(engine)(tasks)
        .values({name: bindparam(f"e_{name}") for name in _ENQUEUE_COLUMNS})
        .on_conflict_do_nothing(index_elements=["idempotency_scope", "idempotency_key"])
        .returning(*tasks.c)
    )
)


def enqueue(
    conn: Connection, new: NewTask, at: str, *, wake_others: bool = True
) -> dict[str, Any] | None:
    """Insert ``new``, queued at ``at``, with its ``task.queued`` event; None when its
    idempotency key was used already in its scope. ``wake_others``: tell the workers of every
    other process (PostgreSQL's NOTIFY); False when this process's own workers claim it at
    once, so that the others do not all claim too and find nothing."""
    row = {
        **msgspec.structs.asdict(new),
        "params": dump(new.params),
        "run_at": iso(new.run_at) if new.run_at else at,
        "cache": None if new.cache is None else int(new.cache),
        "status": TaskStatus.QUEUED.value,
        "created_at": at,
    }
    rows = ENQUEUE.rows(conn, {f"e_{name}": row[name] for name in _ENQUEUE_COLUMNS})
    if not rows:
        return None
    inserted = rows[0]
    if wake_others:
        notices.queued(conn)
    events.append(conn, inserted["id"], TaskQueued(run_at=inserted["run_at"]), at)
    return inserted
