"""Task events: appended inside the transaction of the change they describe, read in order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from sqlalchemy import Connection, bindparam, func, insert, select

from orchestra.db import notices, outbox
from orchestra.db.engine import Database
from orchestra.db.prepared import Prepared
from orchestra.db.rows import dump
from orchestra.db.tables import task_events
from orchestra.event_types import PROGRESS, EventPayload, EventType
from orchestra.wire.events import TaskEvent as TaskEvent

#: The event after which a task changes no more (until a person retries it).
TERMINAL_EVENT = EventType.TASK_FINISHED


# One prepared statement: the task's next sequence number is MAX+1 inside the INSERT itself,
# and a batch goes as one executemany. SQLite's writes are serialized, so it cannot race; on
# PostgreSQL two processes appending to one task at once collide on the primary key, and the
# later transaction runs again (postgres_engine).
_APPEND = Prepared(
    insert(task_events).from_select(
        ["task_id", "seq", "time", "type", "data"],
        select(
            bindparam("task_id"),
            select(func.coalesce(func.max(task_events.c.seq), 0) + 1)
            .where(task_events.c.task_id == bindparam("task_id"))
            .scalar_subquery(),
            bindparam("time"),
            bindparam("type"),
            bindparam("data"),
        ),
    )
)


def _row(task_id: int, payload: EventPayload, now: str) -> dict[str, Any]:
    return {"task_id": task_id, "time": now, "type": payload.type.value, "data": dump(payload)}


def append(conn: Connection, task_id: int, payload: EventPayload, now: str) -> None:
    """Add the event ``payload`` stands for (its type is the payload's), with the task's next
    sequence number (inside a write transaction)."""
    # With the deliveries it makes (the outbox), in the event's own transaction.
    outbox.append_events(conn, _APPEND, [_row(task_id, payload, now)])
    notices.changed(conn, (task_id,), progress=payload.type in PROGRESS)


def append_many(conn: Connection, entries: Sequence[tuple[int, EventPayload]], now: str) -> None:
    """Append one event to each of several tasks (a claim of many tasks), in one statement."""
    if entries:
        rows = [_row(task_id, payload, now) for task_id, payload in entries]
        outbox.append_events(conn, _APPEND, rows)
        for progress in (True, False):
            ids = {
                task_id for task_id, payload in entries if (payload.type in PROGRESS) == progress
            }
            notices.changed(conn, ids, progress=progress)


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


def stored(payload: EventPayload) -> tuple[str, str | None]:
    """An event as it is stored: its type and its data's JSON."""
    return payload.type.value, dump(payload)


async def last_events(db: Database, task_id: int, n: int) -> list[tuple[str, str | None]]:
    """The task's last ``n`` events as stored (:func:`stored`), oldest first: a seek on the
    primary key."""
    query = (
        select(task_events.c.type, task_events.c.data)
        .where(task_events.c.task_id == task_id)
        .order_by(task_events.c.seq.desc())
        .limit(n)
    )
    async with db.read() as conn:
        return [(r.type, r.data) for r in (await conn.execute(query)).all()][::-1]


async def last_seq(db: Database, task_id: int) -> int:
    """The sequence number of a task's last event (0 with none): a seek on the primary key."""
    query = select(func.max(task_events.c.seq)).where(task_events.c.task_id == task_id)
    async with db.read() as conn:
        return int((await conn.execute(query)).scalar() or 0)


# The last step start at or before :upto: a walk back from :upto on the primary key that stops
# at the first one (steps run one after another, so it is the running step's if that started).
_LAST_START = (
    select(task_events.c.seq, task_events.c.data)
    .where(
        task_events.c.task_id == bindparam("task_id"),
        task_events.c.seq <= bindparam("upto"),
        task_events.c.type == EventType.STEP_STARTED.value,
    )
    .order_by(task_events.c.seq.desc())
    .limit(1)
)
_TOKENS_BETWEEN = (
    select(task_events.c.data)
    .where(
        task_events.c.task_id == bindparam("task_id"),
        task_events.c.seq > bindparam("start"),
        task_events.c.seq <= bindparam("upto"),
        task_events.c.type == EventType.STEP_TOKENS.value,
    )
    .order_by(task_events.c.seq)
)


async def step_text(db: Database, task_id: int, step: str, attempt: int, upto: int) -> str:
    """The text step ``step`` of attempt ``attempt`` has streamed (its ``step.tokens``
    events), up to event ``upto``: what a live page shows before it follows the events after
    ``upto``. Empty when that step had not started by then.

    Reads only the events from the step's start on, never the task's earlier ones.
    """
    params = {"task_id": task_id, "upto": upto}
    async with db.read() as conn:
        started = (await conn.execute(_LAST_START, params)).one_or_none()
        if started is None:
            return ""
        data = msgspec.json.decode(started.data)
        if data.get("step") != step or data.get("attempt", attempt) != attempt:
            return ""
        rows = (await conn.execute(_TOKENS_BETWEEN, {**params, "start": started.seq})).scalars()
        pieces = [msgspec.json.decode(piece) for piece in rows]
    return "".join(str(p.get("text", "")) for p in pieces if p.get("step") == step)
