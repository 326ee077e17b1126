"""The outbox: each task event's webhook deliveries, written in the event's own transaction.

A delivery for each enabled subscription the event matches (its type, its task's template,
the task itself for a callback); the sender (:mod:`orchestra.webhook_sender`) sends them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Text,
    bindparam,
    cast,
    func,
    insert,
    literal,
    or_,
    select,
    true,
)

from orchestra.db.prepared import Prepared
from orchestra.db.tables import task_events, tasks, webhook_deliveries, webhooks
from orchestra.webhooks import DeliveryStatus

_d = webhook_deliveries
_w = webhooks


class Hint:
    """Deliveries this process's transactions wrote (a count, bumped before the commit): the
    sender compares it after a commit wakes it, and claims only when it moved. Only a hint: a
    rolled-back write moves it too, and the sender also polls."""

    written = 0


def _payload(seq: Any) -> Any:
    """The body sent, built in SQL from the event and the task as they are in the event's
    transaction: ``{"type", "timestamp", "data": {"task_id", "template", "status", "seq",
    "event"}}`` (the Standard Webhooks envelope; ``event`` is the event's own object). SQLite's
    twin is in its outbox trigger (``migrations.OUTBOX_TRIGGER``)."""
    from sqlalchemy.dialects.postgresql import JSON

    kind, at = cast(bindparam("type"), Text), cast(bindparam("time"), Text)
    data = func.json_build_object(
        "task_id", tasks.c.id, "template", tasks.c.template, "status", tasks.c.status,
        "seq", seq, "event", cast(cast(bindparam("data"), Text), JSON),
    )  # fmt: skip
    return cast(func.json_build_object("type", kind, "timestamp", at, "data", data), Text)


def _deliveries(event: Any) -> Any:
    """PostgreSQL's outbox: ``event`` (the event's INSERT … RETURNING (task_id, seq), as a
    CTE) and a delivery for each enabled subscription the event matches (its type, its task's
    template, the task itself for a callback), as one INSERT … SELECT: one round trip, not
    two. Nothing matches: no delivery (``webhooks`` is small; the task is found by its key)."""
    seq, kind = event.c.seq, cast(bindparam("type"), Text)
    matching = (
        select(
            _w.c.id,
            tasks.c.id,
            seq,
            kind,
            _payload(seq),
            literal(DeliveryStatus.PENDING.value),
            literal(0),
            bindparam("time"),
            bindparam("time"),
        )
        .select_from(event.join(tasks, tasks.c.id == event.c.task_id).join(_w, true()))
        .where(
            _w.c.enabled == 1,
            or_(_w.c.task_id.is_(None), _w.c.task_id == tasks.c.id),
            or_(_w.c.template.is_(None), _w.c.template == tasks.c.template),
            # event_types is a JSON list of words, none with a quote in it.
            _w.c.event_types.like(literal('%"') + kind + literal('"%')),
        )
    )
    columns = ["webhook_id", "task_id", "event_seq", "type", "payload", "status"]
    columns += ["attempts", "next_attempt_at", "created_at"]
    return insert(_d).from_select(columns, matching)


#: PostgreSQL's event INSERTs with their deliveries, by the event statement they wrap.
_WITH_EVENT: dict[int, Prepared] = {}


def _with_event(append: Prepared) -> Prepared:
    """``append`` (the event's INSERT, :mod:`~orchestra.db.events`'s) and the deliveries of
    the event it writes, as one PostgreSQL statement."""
    combined = _WITH_EVENT.get(id(append))
    if combined is None:
        event = append.statement("postgresql").returning(task_events.c.task_id, task_events.c.seq)
        combined = _WITH_EVENT[id(append)] = Prepared(_deliveries(event.cte("event")))
    return combined


def append_events(conn: Connection, append: Prepared, rows: Sequence[dict[str, Any]]) -> None:
    """Inside a write transaction: run ``append`` (the event INSERT) for each of ``rows``
    (``task_id``, ``time``, ``type``, ``data``, as events store them) and write the
    deliveries of those events, in the same transaction: the outbox.

    PostgreSQL runs both as one statement (a data-modifying CTE). On SQLite, whose statements
    cost no round trip but each its own call from Python, the outbox trigger writes the
    deliveries inside the event's INSERT (``migrations.OUTBOX_TRIGGER``); the connection's count
    of changed rows tells whether it wrote any.
    """
    if conn.dialect.name == "postgresql":
        statement = _with_event(append)
        if len(rows) == 1:
            if statement.run(conn, rows[0]).rowcount:
                Hint.written += 1
            return
        statement.run_many(conn, rows)
        Hint.written += 1  # executemany's row count is not told
        return
    raw = conn.connection.driver_connection
    before = raw.total_changes  # type: ignore[union-attr]
    if len(rows) == 1:
        append.run(conn, rows[0])
    else:
        append.run_many(conn, rows)
    if raw.total_changes - before > len(rows):  # type: ignore[union-attr]
        Hint.written += 1
