"""Batches over a dataset: the batch itself, its rows, and the reads that follow it.

Each valid row of a batch is a task queued as a submit queues one (the same columns and
``task.queued`` event as :func:`~orchestra.db.queue.enqueue`), a chunk of rows per
transaction in one INSERT; ``batch_rows`` maps (batch, row) to its task, or holds why the
row was refused. Its key (batch_id, row_no) makes a row's task unique: a chunk reads which of
its rows exist and queues only the others, so an upload sent again (a client resuming) queues
nothing twice; a row it has must be the row sent again (the same params, or refused both
times), else the upload is another file under the same key, refused. On PostgreSQL two
uploads of the same rows at once may both queue a row; the second's insert of that
``batch_rows`` key then fails with a unique violation, and
:class:`~orchestra.db.postgres_engine.PostgresDatabase` runs the chunk again, which now sees
the row, compares it and skips it (the chunk's tasks go with the rolled-back transaction).

An upload's lease, and the batch's close when its upload ends: :mod:`orchestra.db.batch_uploads`.

**The batch lane.** A row's task is queued with its batch's priority minus :data:`LANE`, so
below every single task (whose priorities are -1000 to 1000): the claim, one statement over
the queue index ordered by priority, takes a waiting interactive task before any batch row,
however many rows wait, at the cost it always has. Batches order among themselves by their
own priority. A worker pool keeps a slot that rows may not take (the reserve,
:mod:`orchestra.capacity`, telling rows by :func:`~orchestra.domain.in_batch_lane`), so a
single task submitted while rows fill the other slots starts at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from sqlalchemy import Connection, Select, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestra import logs
from orchestra.db import batch_uploads, bulk, events, notices
from orchestra.db.engine import Database
from orchestra.db.prepared import insert_for
from orchestra.db.rows import dump, owners_on
from orchestra.db.tables import batch_rows, batches, tasks
from orchestra.domain import BATCH_LANE, NewTask, TaskStatus, iso
from orchestra.errors import ConflictError, FieldProblem, StorageError
from orchestra.event_types import TaskQueued

log = logs.get("orchestra.batches")

#: How far below its batch's priority a row's task is queued: below every single task's
#: (PRIORITY_MIN to PRIORITY_MAX), so ``in_batch_lane`` is true of every row's task. The API
#: and the dashboard show the priority asked for (:func:`~orchestra.domain.asked_priority`).
LANE = BATCH_LANE


class RowTask(msgspec.Struct, frozen=True):
    """A valid row: its place in the input and the task it becomes."""

    row: int
    line: int
    task: NewTask


class RowRefused(msgspec.Struct, frozen=True):
    """A refused row: its place in the input and why (JSON, stored as it is)."""

    row: int
    line: int
    error: str


class ResultRow(msgspec.Struct, frozen=True):
    """One row as the results show it: its task's status, result and error (JSON text), or
    its refusal (``refused``, JSON text) when it has no task."""

    row: int
    line: int
    status: str | None
    result: str | None
    error: str | None
    refused: str | None


class FailedRow(msgspec.Struct, frozen=True):
    """A row that failed: refused at upload (``task_id`` None), or its task failed; ``error``
    is the refusal's or the task's (JSON text)."""

    row: int
    line: int
    task_id: int | None
    error: str | None


class Tally(msgspec.Struct, frozen=True):
    """A batch's tasks by status, and the first start and last end among them."""

    counts: dict[str, int]
    first_started: str | None
    last_finished: str | None


# -- writes (transaction bodies) -------------------------------------------------------------


def create(conn: Connection, values: dict[str, Any]) -> dict[str, Any] | None:
    """Insert a batch (its ``status`` is ``loading``); None when its idempotency key was used
    already in its scope (the caller reads that batch with :func:`by_key`)."""
    row = (
        conn.execute(
            insert_for(conn)(batches)
            .values(values)
            .on_conflict_do_nothing(index_elements=["idempotency_scope", "idempotency_key"])
            .returning(*batches.c)
        )
        .mappings()
        .first()
    )
    return None if row is None else dict(row)


def by_key(conn: Connection, scope: str, key: str) -> dict[str, Any] | None:
    """The batch an idempotency key made in its scope, or None."""
    row = (
        conn.execute(
            select(batches).where(
                batches.c.idempotency_scope == scope, batches.c.idempotency_key == key
            )
        )
        .mappings()
        .first()
    )
    return None if row is None else dict(row)


def add_rows(
    conn: Connection,
    batch_id: int,
    valid: Sequence[RowTask],
    refused: Sequence[RowRefused],
    at: str,
) -> list[int]:
    """Queue the tasks of a chunk of rows, and record the refused ones; rows the batch has
    already are skipped. Returns the ids of the tasks queued. Rows read after the batch was
    cancelled (its upload still going on) get their tasks cancelled at once, in the same
    transaction: no worker sees them queued.

    Raises:
        ConflictError: a row the batch has differs from the one sent again (another file
            under the batch's idempotency key): nothing of the chunk is queued.
    """
    numbers = [r.row for r in valid] + [r.row for r in refused]
    if not numbers:
        return []
    # First, with the batch's row locked (PostgreSQL; SQLite's writes are serial anyway): a
    # cancel commits before this chunk (whose rows are then cancelled here) or after it (its
    # walk then sees them), never in between.
    cancelled = _cancelled(conn, batch_id)
    stored = {
        row.row_no: row
        for row in conn.execute(
            select(batch_rows.c.row_no, batch_rows.c.task_id, batch_rows.c.error, tasks.c.params)
            .select_from(batch_rows.outerjoin(tasks, tasks.c.id == batch_rows.c.task_id))
            .where(
                batch_rows.c.batch_id == batch_id,
                batch_rows.c.row_no.between(min(numbers), max(numbers)),
            )
        )
    }
    present = set(stored)
    if stored:  # a resumed upload: the rows it has must be the ones sent again
        _same_rows(batch_id, valid, refused, stored)
    fresh = [item for item in valid if item.row not in present]
    queued: list[int] = []
    if fresh:
        inserted = _insert_tasks(conn, [_task_row(item.task, at) for item in fresh])
        queued = [task_id for task_id, _ in inserted]
        events.append_many(conn, [(i, TaskQueued(run_at=run_at)) for i, run_at in inserted], at)
        notices.queued(conn)
    entries: list[dict[str, Any]] = [
        {"batch_id": batch_id, "row_no": item.row, "line_no": item.line, "task_id": task_id}
        for item, task_id in zip(fresh, queued, strict=True)
    ]
    entries += [
        {
            "batch_id": batch_id,
            "row_no": r.row,
            "line_no": r.line,
            "task_id": None,
            "error": r.error,
        }
        for r in refused
        if r.row not in present
    ]
    if entries:
        for entry in entries:
            entry.setdefault("error", None)
        conn.execute(batch_rows.insert(), entries)
        bulk.unsettle(conn, batches.c.id == batch_id)
    if queued and cancelled:
        bulk.cancel(conn, queued, at)
        return []
    return queued


def _same_rows(
    batch_id: int,
    valid: Sequence[RowTask],
    refused: Sequence[RowRefused],
    stored: dict[int, Any],
) -> None:
    """Refuse a chunk sent again under a batch's idempotency key whose rows are not the ones
    the batch has (``stored``: row_no, task_id, error and its task's params, by row): a
    valid row whose task has other params, or a row valid one time and refused the other
    (another file under the same key; or the same file read under other limits, such as a
    smaller ``max_body_bytes``). A row whose task retention removed is taken as it is.

    Raises:
        ConflictError: naming the first row that differs.
    """
    sent: list[RowTask | RowRefused] = [*valid, *refused]
    for item in sorted(sent, key=lambda r: r.row):
        kept = stored.get(item.row)
        if kept is None:
            continue
        if isinstance(item, RowTask):
            differs = kept.error is not None or (
                kept.params is not None and msgspec.json.decode(kept.params) != item.task.params
            )
        else:
            differs = kept.error is None and kept.task_id is not None
        if differs:
            problem = f"row {item.row} (line {item.line}) differs from the batch's"
            raise ConflictError(
                f"the Idempotency-Key made batch {batch_id} from another file: {problem} (the "
                "same key resumes the same file; send another file with another key)",
                fields=[
                    FieldProblem("Idempotency-Key", f"already used for another file: {problem}")
                ],
            )


def _cancelled(conn: Connection, batch_id: int) -> bool:
    """Whether the batch was cancelled, its row locked until the transaction ends."""
    query = select(batches.c.cancelled_at).where(batches.c.id == batch_id).with_for_update()
    return conn.execute(query).scalar() is not None


#: The columns a row's task is written with (a submit's: :data:`~orchestra.db.queue`).
_TASK_COLUMNS = (*NewTask.__struct_fields__, "status", "created_at")


def _insert_tasks(conn: Connection, rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """Insert a chunk's tasks in one multi-row INSERT on the transaction's DB-API connection
    (built by SQLAlchemy, its per-value compiling cost ten times SQLite's work); returns
    (id, run_at) of each, in the rows' order: both engines number one INSERT's rows in the
    order of its VALUES, so the ids sorted are the rows'."""
    mark = "?" if conn.dialect.name == "sqlite" else "%s"
    one = "(" + ", ".join([mark] * len(_TASK_COLUMNS)) + ")"
    sql = (
        f"INSERT INTO tasks ({', '.join(_TASK_COLUMNS)}) VALUES "
        f"{', '.join([one] * len(rows))} RETURNING id, run_at"
    )
    values = [row[name] for row in rows for name in _TASK_COLUMNS]
    cursor = conn.connection.driver_connection.execute(sql, values)  # type: ignore[union-attr]
    return sorted((int(i), str(run_at)) for i, run_at in cursor.fetchall())


def _task_row(new: NewTask, at: str) -> dict[str, Any]:
    """The ``tasks`` row of a batch row's task, queued at ``at`` (as :func:`queue.enqueue`
    writes a submit's; flags, stored as integers, as 0 or 1)."""
    fields = {
        k: int(v) if isinstance(v, bool) else v for k, v in msgspec.structs.asdict(new).items()
    }
    return {
        **fields,
        "params": dump(new.params),
        "run_at": iso(new.run_at) if new.run_at else at,
        "status": TaskStatus.QUEUED.value,
        "created_at": at,
    }


def clear_cancelled(conn: Connection, batch_id: int) -> None:
    """The batch is resumed: rows its upload stores from now on are queued again."""
    conn.execute(update(batches).where(batches.c.id == batch_id).values(cancelled_at=None))


def mark_cancelled(conn: Connection, batch_id: int, at: str) -> None:
    """Record when the batch was first cancelled."""
    conn.execute(
        update(batches)
        .where(batches.c.id == batch_id, batches.c.cancelled_at.is_(None))
        .values(cancelled_at=at)
    )


def settle(conn: Connection, found: Sequence[tuple[int, int, Tally]]) -> None:
    """Keep the tally of each (batch, revision, tally) whose every row has finished, unless
    its revision has moved on since it was counted (a retry meanwhile)."""
    for batch_id, revision, tally in found:
        conn.execute(
            update(batches)
            .where(
                batches.c.id == batch_id,
                batches.c.revision == revision,
                batches.c.tally.is_(None),
            )
            .values(tally=msgspec.json.encode(tally).decode())
        )


def keep_before_deleting(conn: Connection, task_ids: Sequence[int]) -> int:
    """Retention is about to delete ``task_ids``: keep the tally of each finished batch among
    theirs that has none kept yet (counted here, with those tasks still in it), so that its
    counts stay as they were when it finished. Returns how many batches it kept.

    A batch not finished (a row still queued or running, or its upload still going on) is
    left as it is: its deleted tasks count as ``deleted``, and its tally is kept once it
    finishes. Which of them is finished is told by one short read each (its last rows first,
    where the unfinished ones are), so only a batch that did finish is counted in full.
    """
    if not task_ids:
        return 0
    owners = select(batch_rows.c.batch_id).where(batch_rows.c.task_id.in_(list(task_ids)))
    candidates = conn.execute(
        select(batches.c.id, batches.c.revision).where(
            batches.c.id.in_(owners), batches.c.tally.is_(None), batches.c.status == "loaded"
        )
    ).all()
    done = [(int(r.id), int(r.revision)) for r in candidates if not _has_active(conn, int(r.id))]
    if not done:
        return 0
    ids = [batch_id for batch_id, _ in done]
    counted = _tallies(ids, conn.execute(_count_query(ids)).all())
    found = [(i, rev, counted[i]) for i, rev in done if _finished(counted[i])]
    settle(conn, found)
    return len(found)


def _has_active(conn: Connection, batch_id: int) -> bool:
    """Whether a row of the batch has its task queued or running (walked from its last row:
    rows run in order, so an unfinished batch has one near its end, as a rule)."""
    query = (
        select(batch_rows.c.row_no)
        .select_from(batch_rows.join(tasks, tasks.c.id == batch_rows.c.task_id))
        .where(batch_rows.c.batch_id == batch_id, tasks.c.status.in_(_ACTIVE))
        .order_by(batch_rows.c.row_no.desc())
        .limit(1)
    )
    return conn.execute(query).first() is not None


# -- reads ------------------------------------------------------------------------------------


class BatchStore:
    """Batches in the database: the writes above run on the writer, the reads here."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def renew_upload(self, batch_id: int, until: str) -> str:
        """Hold a batch's upload until ``until``, opening it again if a reaper closed it
        (:func:`~orchestra.db.batch_uploads.renew_upload`)."""
        return await self.db.transaction(
            lambda conn: batch_uploads.renew_upload(conn, batch_id, until), small=True
        )

    async def upload_owners(self, host: str) -> list[str]:
        """The processes on ``host`` (their names start ``host:``) that read an upload."""
        query = owners_on(batches.c.upload_owner, host, batches.c.status == "loading")
        async with self.db.read() as conn:
            return [str(owner) for owner in (await conn.execute(query)).scalars()]

    async def close_uploads_of(self, owner: str, at: str) -> list[dict[str, Any]]:
        """Close the uploads of process ``owner``, known dead
        (:func:`~orchestra.db.batch_uploads.close_uploads_of`)."""
        return await self.db.transaction(
            lambda conn: batch_uploads.close_uploads_of(conn, owner, at)
        )

    async def reap_uploads(self, at: str, keep: Sequence[int] = ()) -> list[dict[str, Any]]:
        """Close the batches whose upload's lease lapsed before ``at``, but those in ``keep``
        (:func:`~orchestra.db.batch_uploads.close_lost_uploads`); returns them."""
        return await self.db.transaction(
            lambda conn: batch_uploads.close_lost_uploads(conn, at, keep)
        )

    async def by_key(self, scope: str, key: str) -> dict[str, Any] | None:
        """The batch an idempotency key made in its scope, or None."""
        async with self.db.read() as conn:
            return await conn.run_sync(lambda c: by_key(c, scope, key))

    async def get(self, batch_id: int) -> dict[str, Any] | None:
        """One batch's row, or None."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(batches).where(batches.c.id == batch_id))).first()
        return None if row is None else dict(row._mapping)

    async def page(self, limit: int, before: int | None) -> list[dict[str, Any]]:
        """Batches newest first, ``limit`` of them, with ids below ``before``."""
        query = select(batches).order_by(batches.c.id.desc()).limit(limit)
        if before is not None:
            query = query.where(batches.c.id < before)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [dict(r._mapping) for r in rows]

    async def tally(self, batch_id: int) -> Tally:
        """The batch's tasks counted by status, with the first start and the last end."""
        return (await self.tallies([batch_id]))[batch_id]

    async def tallies(self, batch_ids: Sequence[int]) -> dict[int, Tally]:
        """:meth:`tally` of each batch (a page of them): the tally kept for a batch whose
        every row has finished, else counted over its rows in one grouped read (and then kept
        if they all have finished)."""
        if not batch_ids:
            return {}
        kept = select(batches.c.id, batches.c.tally, batches.c.revision, batches.c.status).where(
            batches.c.id.in_(list(batch_ids))
        )
        async with self.db.read() as conn:
            # The revision is read before the rows are counted: a retry committed in between
            # bumps it, and the count is then not kept.
            rows = (await conn.execute(kept)).all()
            tallies = {int(r.id): _TALLY.decode(r.tally) for r in rows if r.tally is not None}
            counted = await self._count(conn, [i for i in batch_ids if i not in tallies])
        tallies |= counted
        done = [
            (int(r.id), int(r.revision), counted[int(r.id)])
            for r in rows
            if int(r.id) in counted and r.status == "loaded" and _finished(counted[int(r.id)])
        ]
        if done:
            try:
                await self.db.transaction(lambda conn: settle(conn, done), small=True)
            except StorageError as exc:  # kept next time: the counts read are right anyway
                log.warning("batch.tally_not_kept", error=exc.message)
        return {batch_id: tallies.get(batch_id, _EMPTY) for batch_id in batch_ids}

    @staticmethod
    async def _count(conn: AsyncConnection, batch_ids: list[int]) -> dict[int, Tally]:
        """The batches' tasks counted by status, with the first start and the last end."""
        if not batch_ids:
            return {}
        return _tallies(batch_ids, (await conn.execute(_count_query(batch_ids))).all())

    async def results_after(self, batch_id: int, after: int, limit: int) -> list[ResultRow]:
        """Up to ``limit`` rows after row ``after``, in row order, with their tasks' outcome."""
        query = (
            select(
                batch_rows.c.row_no,
                batch_rows.c.line_no,
                tasks.c.status,
                tasks.c.result,
                tasks.c.error,
                batch_rows.c.error,
            )
            .select_from(batch_rows.outerjoin(tasks, tasks.c.id == batch_rows.c.task_id))
            .where(batch_rows.c.batch_id == batch_id, batch_rows.c.row_no > after)
            .order_by(batch_rows.c.row_no)
            .limit(limit)
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [ResultRow(*r) for r in rows]

    async def first_failures(self, batch_id: int, limit: int) -> list[FailedRow]:
        """The first ``limit`` rows that failed, in row order: refused at upload, or whose
        task failed. (It walks the batch's rows in order until it has found them: call it
        when the batch's tally has failures.)"""
        r = batch_rows.c
        refused = and_(r.task_id.is_(None), r.error.is_not(None))
        query = (
            select(r.row_no, r.line_no, r.task_id, func.coalesce(tasks.c.error, r.error))
            .select_from(batch_rows.outerjoin(tasks, tasks.c.id == r.task_id))
            .where(r.batch_id == batch_id, or_(tasks.c.status == "failed", refused))
            .order_by(r.row_no)
            .limit(limit)
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [FailedRow(*row) for row in rows]

    async def task_ids_after(
        self, batch_id: int, statuses: Sequence[str], after: int, limit: int
    ) -> list[tuple[int, int]]:
        """Up to ``limit`` (row, task id) pairs after row ``after`` whose task is in one of
        ``statuses``, in row order."""
        query = (
            select(batch_rows.c.row_no, batch_rows.c.task_id)
            .select_from(
                batch_rows.join(
                    tasks,
                    and_(tasks.c.id == batch_rows.c.task_id, tasks.c.status.in_(list(statuses))),
                )
            )
            .where(batch_rows.c.batch_id == batch_id, batch_rows.c.row_no > after)
            .order_by(batch_rows.c.row_no)
            .limit(limit)
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [(int(r[0]), int(r[1])) for r in rows]


def _count_query(batch_ids: Sequence[int]) -> Select[Any]:
    """The batches' tasks counted by status, with the first start and the last end: one
    grouped read of their rows joined to their tasks."""
    return (
        select(
            batch_rows.c.batch_id,
            tasks.c.status,
            func.count(),
            func.min(tasks.c.started_at),
            func.max(tasks.c.finished_at),
        )
        .select_from(batch_rows.join(tasks, tasks.c.id == batch_rows.c.task_id))
        .where(batch_rows.c.batch_id.in_(list(batch_ids)))
        .group_by(batch_rows.c.batch_id, tasks.c.status)
    )


def _tallies(batch_ids: Sequence[int], rows: Sequence[Any]) -> dict[int, Tally]:
    """Each batch's tally from :func:`_count_query`'s rows (an empty one for a batch with
    none)."""
    found: dict[int, list[Any]] = {batch_id: [] for batch_id in batch_ids}
    for row in rows:
        found[int(row[0])].append(row)
    return {batch_id: _tally(found_rows) for batch_id, found_rows in found.items()}


def _tally(rows: Sequence[Any]) -> Tally:
    """A batch's tally from its (batch, status, count, first start, last end) rows."""
    started = [r[3] for r in rows if r[3] is not None]
    finished = [r[4] for r in rows if r[4] is not None]
    return Tally(
        counts={r[1]: int(r[2]) for r in rows},
        first_started=min(started) if started else None,
        last_finished=max(finished) if finished else None,
    )


_TALLY = msgspec.json.Decoder(Tally)
_EMPTY = Tally(counts={}, first_started=None, last_finished=None)
#: The statuses a row's task is still to finish in.
_ACTIVE = (TaskStatus.QUEUED.value, TaskStatus.RUNNING.value)


def _finished(tally: Tally) -> bool:
    """Whether every task the tally counts has finished (none queued or running)."""
    return not any(tally.counts.get(status) for status in _ACTIVE)
