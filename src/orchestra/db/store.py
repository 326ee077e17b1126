"""Every query the service makes, each a named, documented method.

State changes are guarded by the state they expect (``WHERE status = 'running' AND
lease_owner = :owner AND attempts = :attempt``), so a worker that lost its lease cannot
overwrite what a newer attempt wrote: the guarded UPDATE simply matches no row.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
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
from orchestra.db.engine import Database
from orchestra.db.overview import DashboardStore, SummaryPage
from orchestra.db.rows import dump, load_details, task_from_row
from orchestra.db.statements import (
    ADD_ATTEMPT,
    CLAIM,
    ENQUEUE,
    FINISH_STEP,
    HELD,
    QUEUED,
    RUNNING,
    START_STEP,
    Lease,
    claim_statement,
    close_attempt,
    end_attempt_statement,
    lease_params,
)
from orchestra.db.tables import task_attempts, tasks
from orchestra.domain import (
    AttemptStatus,
    NewTask,
    Step,
    StepStatus,
    Task,
    TaskError,
    TaskFilter,
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
    ) -> list[Task]:
        """Atomically take up to ``limit`` due tasks, best first, and lease them to ``owner``.

        One ``UPDATE … RETURNING``: a task is claimed by exactly one caller. Each claim starts
        a new attempt (recorded in ``task_attempts`` in the same transaction). Tasks for a model
        in ``skip_models`` (at its concurrency limit) stay queued. Returned in claim order
        (priority, then run time, then age).
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

        def work(conn: Connection) -> list[dict[str, Any]]:
            if skipping is None:
                rows = CLAIM.rows(conn, params)
            else:
                rows = [dict(r._mapping) for r in conn.execute(skipping, params)]
            if rows:
                ADD_ATTEMPT.run_many(
                    conn,
                    [
                        {
                            "a_task": r["id"],
                            "a_number": r["attempts"],
                            "a_worker": owner,
                            "a_at": now,
                        }
                        for r in rows
                    ],
                )
                events.append_many(
                    conn,
                    [
                        (r["id"], "task.started", {"attempt": r["attempts"], "worker": owner})
                        for r in rows
                    ],
                    now,
                )
            return rows

        rows = await self.db.transaction(work)
        self.on_change(r["id"] for r in rows)
        claimed = [task_from_row(r) for r in rows]
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
        params = {
            **lease_params(lease),
            "step_id": step_id,
            "position": position,
            "started_at": started,
        }

        def work(conn: Connection) -> bool:
            if START_STEP.run(conn, params).rowcount != 1:
                return False
            events.append(
                conn,
                lease.task_id,
                "step.started",
                {"step": step_id, "position": position, "attempt": lease.attempt},
                started,
            )
            return True

        return self._changed(lease.task_id, await self.db.transaction(work))

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
        ``step.tokens`` event); False when the lease is lost."""
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
        skipped = step.status is StepStatus.SKIPPED
        data: dict[str, Any] = {"step": step.id, "status": step.status.value}
        if step.model:
            data["model"] = step.model
        if usage is not None:
            data["usage"] = msgspec.to_builtins(usage)
        if step.error is not None:
            data["error"] = step.error.message

        def work(conn: Connection) -> bool:
            if FINISH_STEP.run(conn, params).rowcount != 1:
                return False
            at = step.finished_at or iso_now()
            if text:  # the step's last streamed text, arrived by the time it ended
                tokens = {"step": step.id, "text": text}
                events.append(conn, lease.task_id, "step.tokens", tokens, at)
            events.append(
                conn, lease.task_id, "step.skipped" if skipped else "step.finished", data, at
            )
            return True

        return self._changed(lease.task_id, await self.db.transaction(work))

    async def finish(
        self,
        lease: Lease,
        status: TaskStatus,
        *,
        result: Any = None,
        error: TaskError | None = None,
    ) -> bool:
        """Move a running task to a terminal status; False when the lease is lost."""
        attempt = {
            TaskStatus.SUCCEEDED: AttemptStatus.SUCCEEDED,
            TaskStatus.FAILED: AttemptStatus.FAILED,
            TaskStatus.CANCELLED: AttemptStatus.CANCELLED,
        }[status]
        event: dict[str, Any] = {"status": status.value}
        if error is not None:
            event["error"] = msgspec.to_builtins(error)
        return await self._end_attempt(
            lease,
            attempt,
            error,
            ("task.finished", event),
            status=status.value,
            result=dump(result),
            error=dump(error),
            finished_at=iso_now(),
            cancel_requested=0,
        )

    async def retry_later(self, lease: Lease, error: TaskError, run_at: datetime) -> bool:
        """Put a task whose attempt failed with a retryable error back in the queue, due at
        ``run_at``; the attempt is recorded as failed with its error. False when the lease is
        lost."""
        event = {
            "attempt": lease.attempt,
            "error": msgspec.to_builtins(error),
            "next_run_at": iso(run_at),
        }
        return await self._end_attempt(
            lease,
            AttemptStatus.FAILED,
            error,
            ("task.retrying", event),
            status=QUEUED,
            error=dump(error),
            run_at=iso(run_at),
        )

    async def release(self, lease: Lease) -> bool:
        """Hand a running task back to the queue (shutdown); the attempt does not count
        against ``max_attempts``."""
        return await self._end_attempt(
            lease,
            AttemptStatus.HANDED_BACK,
            None,
            ("task.handed_back", {"attempt": lease.attempt}),
            status=QUEUED,
            handed_back=1,  # one more attempt handed back
            run_at=iso_now(),
        )

    async def _end_attempt(
        self,
        lease: Lease,
        attempt: AttemptStatus,
        why: TaskError | None,
        event: tuple[str, dict[str, Any]],
        **values: Any,
    ) -> bool:
        """The one way a worker ends its attempt: an UPDATE guarded by the lease, which also
        gives the lease up, and the attempt's record closed in the same transaction."""
        prepared = end_attempt_statement(tuple(sorted(values)))
        params = {**lease_params(lease), **{f"v_{k}": v for k, v in values.items()}}

        def work(conn: Connection) -> bool:
            if prepared.run(conn, params).rowcount != 1:
                return False
            now = iso_now()
            close_attempt(conn, lease, attempt, why, now)
            events.append(conn, lease.task_id, *event, now)
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

    async def events_after(self, task_id: int, seq: int) -> list[events.TaskEvent]:
        """A task's events after sequence number ``seq``, in order (500 at most)."""
        return await events.events_after(self.db, task_id, seq)

    async def last_event_seq(self, task_id: int) -> int:
        """The sequence number of the task's last event (0 with none)."""
        return await events.last_seq(self.db, task_id)

    async def step_text(self, task_id: int, step: str, attempt: int, upto: int) -> str:
        """The text a step of an attempt has streamed so far, up to event ``upto``."""
        return await events.step_text(self.db, task_id, step, attempt, upto)

    async def get_task(self, task_id: int) -> Task | None:
        """One task with its attempts and the steps of its current attempt, or None."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(tasks).where(tasks.c.id == task_id))).one_or_none()
            if row is None:
                return None
            details = await load_details(conn, {task_id: row.attempts})
        steps, history = details.get(task_id, ([], []))
        return task_from_row(row, steps, history)

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
        wanted = TaskFilter(status=status, template=template)
        return await DashboardStore(self.db).page(wanted, limit=limit, before=before)
