"""Every query the service makes, each a named, documented method.

State changes are guarded by the state they expect (``WHERE status = 'running' AND
lease_owner = :owner AND attempts = :attempt``), so a worker that lost its lease cannot
overwrite what a newer attempt wrote: the guarded UPDATE simply matches no row.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

import msgspec
from sqlalchemy import (
    Connection,
    Row,
    case,
    delete,
    select,
    text,
    update,
)

from orchestra.db import bulk, events
from orchestra.db.engine import Database, Prepared
from orchestra.db.overview import SummaryPage
from orchestra.db.reads import Reads, reads_for
from orchestra.db.rows import dump, task_from_row
from orchestra.db.statements import (
    ADD_ATTEMPT,
    CLAIM,
    ENQUEUE,
    FINISH,
    FINISH_STEP,
    HAND_BACK,
    HELD,
    QUEUED,
    RETRY_LATER,
    RUNNING,
    START_STEP,
    claim_statement,
    close_attempt,
    lease_params,
)
from orchestra.db.tables import task_attempts, tasks
from orchestra.domain import (
    AttemptStatus,
    Lease,
    NewTask,
    Step,
    StepStatus,
    Task,
    TaskError,
    TaskStatus,
    iso,
    iso_now,
)

#: The idempotency scope of requests without an API key (and of keys stored before keys were
#: scoped, schema version 7).
ANONYMOUS_SCOPE = ""


class Enqueued(msgspec.Struct, frozen=True):
    """The outcome of an enqueue: the task, and whether this call created it.

    ``created`` is False when an earlier submit used the same idempotency key; ``same_request``
    then tells whether that submit had the same body.
    """

    task: Task
    created: bool
    same_request: bool = True


class Renewal(msgspec.Struct, frozen=True):
    """The outcome of renewing leases: which are still held, which were asked to cancel."""

    held: set[int]
    cancel_requested: set[int]


class _Ending(msgspec.Struct, frozen=True):
    """How an attempt ends: the task's UPDATE and its values, the attempt's status and error,
    and the event that says so."""

    statement: Prepared
    values: dict[str, Any]
    attempt: AttemptStatus
    why: TaskError | None
    event: str
    data: dict[str, Any]


def _start_step(conn: Connection, lease: Lease, step_id: str, position: int, at: str) -> bool:
    """A step's ``running`` row and its ``step.started`` event, while the lease holds (inside
    a write transaction); False when it does not."""
    params = {
        **lease_params(lease),
        "step_id": step_id,
        "position": position,
        "started_at": at,
    }
    if START_STEP.run(conn, params).rowcount != 1:
        return False
    data = {"step": step_id, "position": position, "attempt": lease.attempt}
    events.append(conn, lease.task_id, "step.started", data, at)
    return True


def _end_step(conn: Connection, lease: Lease, step: Step, text: str) -> bool:
    """A step's outcome and its events (``text`` first, the rest of its streamed answer), while
    the lease holds (inside a write transaction); False when it does not."""
    usage = step.usage
    params = {
        **lease_params(lease),
        "step_id": step.id,
        "v_status": step.status.value,
        "v_output": dump(step.output),
        "v_error": dump(step.error),
        "v_model": step.model,
        "v_prompt_tokens": usage.prompt_tokens if usage else None,
        "v_completion_tokens": usage.completion_tokens if usage else None,
        "v_usage": dump(usage),
        "v_finished_at": step.finished_at,
        "v_duration_ms": step.duration_ms,
        "v_prompt": dump(step.prompt),
    }
    if FINISH_STEP.run(conn, params).rowcount != 1:
        return False
    data: dict[str, Any] = {"step": step.id, "status": step.status.value}
    if step.model:
        data["model"] = step.model
    if usage is not None:
        data["usage"] = msgspec.to_builtins(usage)
    if step.error is not None:
        data["error"] = step.error.message
    at = step.finished_at or iso_now()
    if text:  # the step's last streamed text, arrived by the time it ended
        events.append(conn, lease.task_id, "step.tokens", {"step": step.id, "text": text}, at)
    skipped = step.status is StepStatus.SKIPPED
    events.append(conn, lease.task_id, "step.skipped" if skipped else "step.finished", data, at)
    return True


class TaskStore:
    """Tasks, their attempts and their steps in the database."""

    def __init__(
        self, db: Database, on_change: Callable[[Iterable[int]], None] = lambda _ids: None
    ) -> None:
        """``on_change`` is called with task ids after each committed change to them (it wakes
        the requests waiting on those tasks: ``?wait`` and event streams)."""
        self.db = db
        self.on_change = on_change

    def _changed(self, task_id: int, changed: bool) -> bool:
        """Tell the waiters about a committed change to ``task_id``; passes ``changed`` on."""
        if changed:
            self.on_change([task_id])
        return changed

    # -- submitting ---------------------------------------------------------------------------

    async def enqueue(self, new: NewTask, *, key_id: str | None = None) -> Enqueued:
        """Insert a queued task; with an idempotency key already used, return that task.

        Idempotency keys are scoped to the API key that submits (``key_id``; None: anonymous),
        so one caller's key never finds, nor blocks, another caller's task.
        """
        created = iso_now()
        scope = key_id or ANONYMOUS_SCOPE
        values = {
            "template": new.template,
            "template_version": new.template_version,
            "status": QUEUED,
            "params": dump(new.params),
            "model": new.model,
            "priority": new.priority,
            "max_attempts": new.max_attempts,
            "timeout_seconds": new.timeout_seconds,
            "run_at": iso(new.run_at) if new.run_at else created,
            "created_at": created,
            "idempotency_key": new.idempotency_key,
            "idempotency_scope": scope,
            "request_hash": new.request_hash,
        }
        params = {f"e_{name}": value for name, value in values.items()}

        def work(conn: Connection) -> dict[str, Any] | None:
            rows = ENQUEUE.rows(conn, params)
            if not rows:
                return None
            row = rows[0]
            events.append(conn, row["id"], "task.queued", {"run_at": row["run_at"]}, created)
            return row

        row = await self.db.transaction(work)
        if row is not None:
            return Enqueued(task=task_from_row(row), created=True)
        async with self.db.read() as conn:
            existing = (
                await conn.execute(
                    select(tasks).where(
                        tasks.c.idempotency_scope == scope,
                        tasks.c.idempotency_key == new.idempotency_key,
                    )
                )
            ).one()
        return Enqueued(
            task=task_from_row(existing),
            created=False,
            same_request=existing.request_hash == new.request_hash,
        )

    # -- the worker's side --------------------------------------------------------------------

    async def claim(
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        *,
        skip_models: Collection[str] = (),
        first_step: Callable[[Task], str | None] | None = None,
    ) -> list[Task]:
        """Atomically take up to ``limit`` due tasks, best first, and lease them to ``owner``.

        One ``UPDATE … RETURNING``: a task is claimed by exactly one caller. Each claim starts
        a new attempt (recorded in ``task_attempts`` in the same transaction). Tasks for a model
        in ``skip_models`` (at its concurrency limit) stay queued. Returned in claim order
        (priority, then run time, then age).

        Args:
            first_step: names each claimed task's first step (None: none), which the claim
                then starts too, in the same transaction, as :meth:`start_step` would: so a
                task's first write after its claim is its first step's end. Called on the
                writer's thread inside the transaction: it must be quick and touch only memory.
        """
        now = iso_now()
        params = {
            "c_now": now,
            "c_limit": limit,
            "c_owner": owner,
            "c_expires": iso_now(lease_seconds),
        }
        # Usually the prepared statement; with models at their limit (a NOT IN list), Core.
        skipping = claim_statement(tuple(skip_models)) if skip_models else None

        def work(conn: Connection) -> list[Task]:
            if skipping is None:
                rows = CLAIM.rows(conn, params)
            else:
                rows = [dict(r._mapping) for r in conn.execute(skipping, params)]
            if not rows:
                return []
            claimed = [task_from_row(r) for r in rows]
            ADD_ATTEMPT.run_many(
                conn,
                [
                    {"a_task": t.id, "a_number": t.attempts, "a_worker": owner, "a_at": now}
                    for t in claimed
                ],
            )
            events.append_many(
                conn,
                [(t.id, "task.started", {"attempt": t.attempts, "worker": owner}) for t in claimed],
                now,
            )
            if first_step is not None:
                for task in claimed:
                    step_id = first_step(task)
                    if step_id is not None:
                        lease = Lease(task_id=task.id, owner=owner, attempt=task.attempts)
                        _start_step(conn, lease, step_id, 0, now)
            return claimed

        claimed = await self.db.transaction(work)
        self.on_change(t.id for t in claimed)
        claimed.sort(key=lambda t: (-t.priority, t.run_at, t.id))
        return claimed

    async def renew_leases(
        self, owner: str, task_ids: Iterable[int], lease_seconds: float
    ) -> Renewal:
        """Extend ``owner``'s leases on ``task_ids``; says which are held and which were asked
        to cancel (so a worker in any process learns of a cancel at its next renewal)."""
        ids = list(task_ids)
        if not ids:
            return Renewal(held=set(), cancel_requested=set())
        stmt = (
            update(tasks)
            .where(tasks.c.id.in_(ids), tasks.c.status == RUNNING, tasks.c.lease_owner == owner)
            .values(lease_expires_at=iso_now(lease_seconds))
            .returning(tasks.c.id, tasks.c.cancel_requested)
        )
        rows = await self.db.transaction(lambda conn: conn.execute(stmt).all())
        return Renewal(
            held={r.id for r in rows}, cancel_requested={r.id for r in rows if r.cancel_requested}
        )

    async def start_step(self, lease: Lease, step_id: str, position: int) -> bool:
        """Record that a step started; False when the lease is lost."""
        started = iso_now()
        written = await self.db.transaction(
            lambda conn: _start_step(conn, lease, step_id, position, started)
        )
        return self._changed(lease.task_id, written)

    async def add_text(self, lease: Lease, step_id: str, text: str) -> bool:
        """Record a piece of a step's streamed answer (a ``step.tokens`` event); False when the
        lease is lost."""

        def work(conn: Connection) -> bool:
            if HELD.run(conn, lease_params(lease)).fetchone() is None:
                return False
            events.append(
                conn, lease.task_id, "step.tokens", {"step": step_id, "text": text}, iso_now()
            )
            return True

        return self._changed(lease.task_id, await self.db.transaction(work))

    async def finish_step(self, lease: Lease, step: Step, text: str = "") -> bool:
        """Store a step's outcome, after ``text`` (the rest of its streamed answer, as a
        ``step.tokens`` event); False when the lease is lost.

        The attempt's last step is better ended with the attempt itself: the ``step`` argument
        of :meth:`finish`, :meth:`retry_later` and :meth:`release`.
        """
        written = await self.db.transaction(lambda conn: _end_step(conn, lease, step, text))
        return self._changed(lease.task_id, written)

    async def finish(
        self,
        lease: Lease,
        status: TaskStatus,
        *,
        result: Any = None,
        error: TaskError | None = None,
        step: Step | None = None,
        text: str = "",
    ) -> bool:
        """Move a running task to a terminal status; False when the lease is lost.

        Args:
            step: the attempt's last step, ended in the same transaction (after ``text``, the
                rest of its streamed answer), as :meth:`finish_step` would.
        """
        attempt = {
            TaskStatus.SUCCEEDED: AttemptStatus.SUCCEEDED,
            TaskStatus.FAILED: AttemptStatus.FAILED,
            TaskStatus.CANCELLED: AttemptStatus.CANCELLED,
        }[status]
        event: dict[str, Any] = {"status": status.value}
        if error is not None:
            event["error"] = msgspec.to_builtins(error)
        now = iso_now()
        values = {
            "v_status": status.value,
            "v_result": dump(result),
            "v_error": dump(error),
            "v_at": now,
        }
        ending = _Ending(FINISH, values, attempt, error, "task.finished", event)
        return await self._end(lease, ending, now, step, text)

    async def retry_later(
        self,
        lease: Lease,
        error: TaskError,
        run_at: datetime,
        *,
        step: Step | None = None,
        text: str = "",
    ) -> bool:
        """Put a task whose attempt failed with a retryable error back in the queue, due at
        ``run_at``; the attempt is recorded as failed with its error. False when the lease is
        lost. ``step`` and ``text``: as for :meth:`finish`."""
        event = {
            "attempt": lease.attempt,
            "error": msgspec.to_builtins(error),
            "next_run_at": iso(run_at),
        }
        values = {"v_error": dump(error), "v_run_at": iso(run_at)}
        ending = _Ending(RETRY_LATER, values, AttemptStatus.FAILED, error, "task.retrying", event)
        return await self._end(lease, ending, iso_now(), step, text)

    async def release(self, lease: Lease, *, step: Step | None = None, text: str = "") -> bool:
        """Hand a running task back to the queue (shutdown); the attempt does not count
        against ``max_attempts``. ``step`` and ``text``: as for :meth:`finish`."""
        now = iso_now()
        event = {"attempt": lease.attempt}
        ending = _Ending(
            HAND_BACK, {"v_at": now}, AttemptStatus.HANDED_BACK, None, "task.handed_back", event
        )
        return await self._end(lease, ending, now, step, text)

    async def _end(
        self, lease: Lease, ending: _Ending, now: str, step: Step | None, text: str
    ) -> bool:
        """End the lease's attempt in one transaction: its last step (when given), the task's
        row (the ending's UPDATE, guarded by the lease, which also gives the lease up), the
        attempt's record and the ending's event."""
        params = {**lease_params(lease), **ending.values}

        def work(conn: Connection) -> bool:
            if step is not None:
                # Fenced by the same lease as the UPDATE after it: both match or neither does.
                _end_step(conn, lease, step, text)
            if ending.statement.run(conn, params).rowcount != 1:
                return False
            close_attempt(conn, lease, ending.attempt, ending.why, now)
            events.append(conn, lease.task_id, ending.event, ending.data, now)
            return True

        return self._changed(lease.task_id, await self.db.transaction(work))

    async def requeue_expired(self) -> dict[int, TaskStatus]:
        """Return tasks whose lease expired (their worker died) to the queue.

        The dead attempt is recorded as lost and counts against ``max_attempts``; a task with
        no attempts left fails instead, with an error saying so. Returns each affected id and
        the status it moved to.
        """
        now = iso_now()
        exhausted = (tasks.c.attempts - tasks.c.handed_back) >= tasks.c.max_attempts
        lost = TaskError(
            type="lease_expired",
            message="the worker running this attempt stopped renewing its lease "
            "(it crashed or was cut off)",
            retryable=True,
        )
        gave_up = TaskError(
            type="lease_expired",
            message="the worker running this task stopped responding (its lease expired) "
            "and the task has no attempts left",
        )
        stmt = (
            update(tasks)
            .where(tasks.c.status == RUNNING, tasks.c.lease_expires_at < now)
            .values(
                status=case((exhausted, TaskStatus.FAILED.value), else_=QUEUED),
                error=case((exhausted, dump(gave_up)), else_=dump(lost)),
                finished_at=case((exhausted, now), else_=None),
                run_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(tasks.c.id, tasks.c.status, tasks.c.attempts)
        )

        def work(conn: Connection) -> Sequence[Row[Any]]:
            rows = conn.execute(stmt).all()
            for row in rows:
                conn.execute(
                    update(task_attempts)
                    .where(
                        task_attempts.c.task_id == row.id, task_attempts.c.number == row.attempts
                    )
                    .values(status=AttemptStatus.LOST.value, finished_at=now, error=dump(lost))
                )
                events.append(conn, row.id, "task.lease_expired", {"attempt": row.attempts}, now)
                if row.status == TaskStatus.FAILED.value:
                    finished = {"status": row.status, "error": msgspec.to_builtins(gave_up)}
                    events.append(conn, row.id, "task.finished", finished, now)
            return rows

        rows = await self.db.transaction(work)
        self.on_change(row.id for row in rows)
        return {row.id: TaskStatus(row.status) for row in rows}

    # -- requests from people -----------------------------------------------------------------

    async def cancel(self, task_id: int) -> TaskStatus | None:
        """Cancel a task: a queued one at once; a running one is flagged for its worker.

        Returns the status after the call (``running`` when the worker still has to stop), or
        None when there is no such task.
        """
        now = iso_now()

        def work(conn: Connection) -> TaskStatus | None:
            return bulk.cancel(conn, [task_id], now).get(task_id) or bulk.status_of(conn, task_id)

        status = await self.db.transaction(work)
        self.on_change([task_id])
        return status

    async def cancel_many(self, ids: Collection[int]) -> dict[int, TaskStatus]:
        """:meth:`cancel` for a chunk of tasks (up to a few thousand), in one transaction.

        Returns the tasks acted on: cancelled, or running (flagged for its worker); ids of
        missing or finished tasks are left out.
        """
        now = iso_now()
        acted = await self.db.transaction(lambda conn: bulk.cancel(conn, ids, now))
        self.on_change(acted)
        return acted

    async def retry(self, task_id: int) -> tuple[TaskStatus | None, bool]:
        """Queue a failed or cancelled task again as a new attempt, due now.

        The task gets at least one more attempt than it has used. Returns (status after, whether
        it was re-queued); the status is None when there is no such task.
        """
        now = iso_now()

        def work(conn: Connection) -> tuple[TaskStatus | None, bool]:
            requeued = bool(bulk.retry(conn, [task_id], now))
            return bulk.status_of(conn, task_id), requeued

        status, requeued = await self.db.transaction(work)
        if requeued:
            self.on_change([task_id])
        return status, requeued

    async def retry_many(self, ids: Collection[int]) -> dict[int, bool]:
        """:meth:`retry` for a chunk of tasks (up to a few thousand), in one transaction.

        Returns, for each id given, whether that task was queued again.
        """
        now = iso_now()
        requeued = set(await self.db.transaction(lambda conn: bulk.retry(conn, ids, now)))
        self.on_change(requeued)
        return {task_id: task_id in requeued for task_id in ids}

    async def delete_finished_before(self, cutoff: datetime, batch: int = 500) -> int:
        """Delete up to ``batch`` finished tasks (with their steps and attempts) that finished
        before ``cutoff``, oldest first; returns how many. Small batches keep each write
        transaction short, so the queue never waits long behind retention."""
        # The index is named: left to itself the planner takes ix_tasks_status_id for the
        # status list and sorts every finished task, holding the writer for half a second per
        # batch at a million rows (0.4 ms this way).
        oldest = (
            text(
                "SELECT id FROM tasks INDEXED BY ix_tasks_finished_status "
                "WHERE finished_at IS NOT NULL AND finished_at < :cutoff "
                "AND status IN ('succeeded', 'failed', 'cancelled') "
                "ORDER BY finished_at LIMIT :batch"
            )
            .bindparams(cutoff=iso(cutoff), batch=batch)
            .columns(tasks.c.id)
        )
        stmt = delete(tasks).where(tasks.c.id.in_(oldest))
        return await self.db.transaction(lambda conn: conn.execute(stmt).rowcount)

    # -- reading ------------------------------------------------------------------------------

    @cached_property
    def reads(self) -> Reads:
        """The reads the API serves most (a task, its events, a page): one statement each
        where the database allows it (:func:`~orchestra.db.reads.reads_for` chooses)."""
        return reads_for(self.db)

    async def events_after(self, task_id: int, seq: int) -> list[events.TaskEvent]:
        """A task's events after sequence number ``seq``, in order (500 at most)."""
        return await self.reads.events_after(task_id, seq)

    async def last_event_seq(self, task_id: int) -> int:
        """The sequence number of the task's last event (0 with none)."""
        return await events.last_seq(self.db, task_id)

    async def step_text(self, task_id: int, step: str, attempt: int, upto: int) -> str:
        """The text a step of an attempt has streamed so far, up to event ``upto``."""
        return await events.step_text(self.db, task_id, step, attempt, upto)

    async def get_task(self, task_id: int) -> Task | None:
        """One task with its attempts and the steps of its current attempt, or None."""
        return await self.reads.task(task_id)

    async def list_page(
        self,
        *,
        status: TaskStatus | None = None,
        template: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> SummaryPage:
        """A page of task summaries, newest first, with keyset pagination on the id.

        Summaries leave out ``params``, the result, steps and attempts, and the query does not
        read those columns: a page's size is bounded by ``limit``, however big the tasks are.
        The dashboard's listing, with only a status and a template to filter on.

        Args:
            before: the cursor: only tasks with a smaller id (the previous page's last id).
        """
        return await self.reads.page(status, template, limit, before)
