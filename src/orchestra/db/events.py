"""Task events: appended inside the transaction of the change they describe, read in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from sqlalchemy import func, insert, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestra.db.engine import Database
from orchestra.db.rows import dump
from orchestra.db.tables import task_events

#: The event after which a task changes no more (until a person retries it).
TERMINAL_EVENT = "task.finished"


class TaskEvent(msgspec.Struct, frozen=True):
    """One thing that happened to a task."""

    seq: int
    time: str
    type: str
    data: dict[str, Any]


async def append(
    conn: AsyncConnection, task_id: int, type_: str, data: dict[str, Any], now: str
) -> None:
    """Add an event with the task's next sequence number (writes are serialized, so the
    MAX+1 inside the same INSERT cannot race)."""
    next_seq = (
        select(func.coalesce(func.max(task_events.c.seq), 0) + 1)
        .where(task_events.c.task_id == task_id)
        .scalar_subquery()
    )
    await conn.execute(
        insert(task_events).from_select(
            ["task_id", "seq", "time", "type", "data"],
            select(literal(task_id), next_seq, literal(now), literal(type_), literal(dump(data))),
        )
    )


async def append_many(
    conn: AsyncConnection, entries: Sequence[tuple[int, str, dict[str, Any]]], now: str
) -> None:
    """Append one event to each of several tasks (a claim of many tasks)."""
    for task_id, type_, data in entries:
        await append(conn, task_id, type_, data, now)


async def events_after(db: Database, task_id: int, seq: int, limit: int = 500) -> list[TaskEvent]:
    """A task's events with a sequence number above ``seq``, in order."""
    query = (
        select(task_events.c.seq, task_events.c.time, task_events.c.type, task_events.c.data)
        .where(task_events.c.task_id == task_id, task_events.c.seq > seq)
        .order_by(task_events.c.seq)
        .limit(limit)
    )
    async with db.read() as conn:
        rows = (await conn.execute(query)).all()
    return [TaskEvent(r.seq, r.time, r.type, msgspec.json.decode(r.data)) for r in rows]
