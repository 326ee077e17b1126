"""The all-tasks feed's reads: every task's events after a global id, in id order.

``task_events.id`` (migration 10) orders all tasks' events. The feed's one reader per process
(:class:`~orchestra.feed.EventFeed`) tails it with :func:`read_tail`; a subscriber that
resumes from an older id, or fell behind, catches up with :func:`events_between`, never
past the reader's watermark (below it every id is settled).

On PostgreSQL an id is taken at insert and its transaction commits later, so a read can see
id N+2 before N+1 commits. :func:`read_tail` therefore also returns its snapshot's ``xmin``,
and :func:`xid_horizon` the next transaction id, from which the reader tells a late commit
from an id that will never appear (see :mod:`orchestra.feed`). SQLite has one writer: its ids
commit in order.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import Select, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestra.db.engine import POSTGRESQL, Database
from orchestra.db.tables import task_events, tasks
from orchestra.wire.events import FeedEvent as FeedEvent

#: How many events one read returns at most.
EVENTS_PER_READ = 500

_decode = msgspec.json.Decoder(dict[str, Any]).decode


class FeedFilter(msgspec.Struct, frozen=True):
    """Which events a subscriber wants: one task's, one template's, some types (None: any)."""

    task_id: int | None = None
    template: str | None = None
    types: frozenset[str] | None = None

    def matches(self, event: FeedEvent) -> bool:
        """Whether ``event`` passes this filter."""
        return (
            (self.task_id is None or event.task_id == self.task_id)
            and (self.template is None or event.template == self.template)
            and (self.types is None or event.type in self.types)
        )


class Tail(msgspec.Struct, frozen=True):
    """What one read of the feed's tail found: the events, and on PostgreSQL its snapshot's
    ``xmin`` (every transaction with a lower id had ended when it was read)."""

    events: list[FeedEvent]
    xmin: int | None


_COLUMNS = (
    task_events.c.id,
    task_events.c.task_id,
    tasks.c.template,
    task_events.c.seq,
    task_events.c.time,
    task_events.c.type,
    task_events.c.data,
)


def _query(after: int, upto: int | None, wanted: FeedFilter | None, limit: int) -> Select[Any]:
    query = (
        select(*_COLUMNS)
        .select_from(task_events.join(tasks, tasks.c.id == task_events.c.task_id))
        .where(task_events.c.id > after)
        .order_by(task_events.c.id)
        .limit(limit)
    )
    if upto is not None:
        query = query.where(task_events.c.id <= upto)
    if wanted is not None:
        if wanted.task_id is not None:
            query = query.where(task_events.c.task_id == wanted.task_id)
        if wanted.template is not None:
            query = query.where(tasks.c.template == wanted.template)
        if wanted.types is not None:
            query = query.where(task_events.c.type.in_(sorted(wanted.types)))
    return query


def _events(rows: Any) -> list[FeedEvent]:
    return [
        FeedEvent(r.id, r.task_id, r.template, r.seq, r.time, r.type, _decode(r.data)) for r in rows
    ]


# The oldest transaction running when the snapshot was taken (REPEATABLE READ keeps that
# snapshot for the statement after it).
_XMIN = text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
# A transaction id of its own: above every id handed out before.
_NEXT_XID = "SELECT pg_current_xact_id()::text"


# SQLite's tail read, on the event loop's own connection (Database.read_now): the reader runs
# after every commit while anyone follows, and a thread hop cost more than the query.
_SQLITE_TAIL = (
    "SELECT e.id, e.task_id, t.template, e.seq, e.time, e.type, e.data "
    "FROM task_events AS e JOIN tasks AS t ON t.id = e.task_id "
    "WHERE e.id > ? ORDER BY e.id LIMIT ?"
)


def _sqlite_tail(conn: Any, after: int, limit: int) -> list[FeedEvent]:
    rows = conn.execute(_SQLITE_TAIL, (after, limit)).fetchall()
    return [FeedEvent(r[0], r[1], r[2], r[3], r[4], r[5], _decode(r[6])) for r in rows]


async def read_tail(db: Database, after: int, limit: int = EVENTS_PER_READ) -> Tail:
    """Every task's events with an id above ``after``, in id order, ``limit`` at most; on
    PostgreSQL with the ``xmin`` of the snapshot they were read in."""
    if db.dialect != POSTGRESQL:
        return Tail(await db.read_now(lambda conn: _sqlite_tail(conn, after, limit)), None)
    async with db.read() as conn:
        xmin = int((await conn.execute(_XMIN)).scalar_one())
        rows = (await conn.execute(_query(after, None, None, limit))).all()
    return Tail(_events(rows), xmin)


async def xid_horizon(db: Database) -> int:
    """PostgreSQL: a transaction id above every one handed out so far (a tiny transaction
    takes one). Once a snapshot's ``xmin`` reaches it, every transaction that had begun
    writing by now has ended."""
    return int(await db.transaction(lambda conn: conn.exec_driver_sql(_NEXT_XID).scalar_one()))


async def events_between(
    db: Database,
    after: int,
    upto: int,
    wanted: FeedFilter | None = None,
    limit: int = EVENTS_PER_READ,
) -> list[FeedEvent]:
    """The events with ``after`` < id <= ``upto`` that pass ``wanted``, in id order,
    ``limit`` at most (a subscriber's catch-up, below the reader's watermark)."""
    async with db.read() as conn:
        rows = (await conn.execute(_query(after, upto, wanted, limit))).all()
    return _events(rows)


async def last_id(db: Database) -> int:
    """The id of the newest event (0 with none): where a new reader starts."""
    async with db.read() as conn:
        return await newest_id(conn)


async def newest_id(conn: AsyncConnection) -> int:
    """The id of the newest event (0 with none), read on ``conn``."""
    return int((await conn.execute(select(func.max(task_events.c.id)))).scalar() or 0)


#: The highest event id ever given, deleted events included: ``task_events`` is an
#: AUTOINCREMENT table on SQLite, an identity column on PostgreSQL (ids are never reused).
#: On PostgreSQL, reading a sequence takes a privilege that inserting through it does not: a
#: role without it reads NULL (not known), not an error.
_GIVEN = {
    "sqlite": "SELECT seq FROM sqlite_sequence WHERE name = 'task_events'",
    POSTGRESQL: (
        "SELECT CASE WHEN has_sequence_privilege(s, 'SELECT, USAGE') "
        "THEN pg_sequence_last_value(s::regclass) END "
        "FROM (SELECT pg_get_serial_sequence('task_events', 'id') AS s) AS q"
    ),
}


async def highest_given(db: Database) -> int | None:
    """The highest event id this database ever gave, deleted ones included (no client can
    have seen an id above it); None when it cannot be known (a role that may not read the
    sequence, a sequence not used yet)."""
    sql = _GIVEN[POSTGRESQL if db.dialect == POSTGRESQL else "sqlite"]
    async with db.read() as conn:
        given = (await conn.exec_driver_sql(sql)).scalar()
    return None if given is None else int(given)
