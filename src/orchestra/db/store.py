"""Every query the service makes, each a named, documented method.

State changes are guarded by the state they expect (``WHERE status = 'running' AND
lease_owner = :owner AND attempts = :attempt``), so a worker that lost its lease cannot
overwrite what a newer attempt wrote: the guarded UPDATE simply matches no row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
from sqlalchemy import and_, case, delete, exists, insert, literal, select, update
from sqlalchemy.engine import Row

from orchestra.db.engine import Database
from orchestra.db.tables import task_steps, tasks
from orchestra.domain import (
    NewTask,
    Step,
    StepStatus,
    Task,
    TaskError,
    TaskStatus,
    Usage,
    iso_now,
)

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.decode


def _dump(value: Any) -> str | None:
    return None if value is None else _json_encode(value).decode()


def _load(value: str | None) -> Any:
    return None if value is None else _json_decode(value)


class Lease(msgspec.Struct, frozen=True):
    """Proof that a worker holds a task: who, and for which attempt."""

    task_id: int
    owner: str
    attempt: int


class TaskPage(msgspec.Struct, frozen=True):
    """One page of a task listing, newest first."""

    items: list[Task]
    next_cursor: int | None


def _error(value: str | None) -> TaskError | None:
    return None if value is None else msgspec.json.decode(value, type=TaskError)


def task_from_row(row: Row[Any], steps: Sequence[Step] = ()) -> Task:
    """Build a :class:`Task` from a ``tasks`` row (and its current attempt's steps)."""
    m = row._mapping
    return Task(
        id=m["id"],
        template=m["template"],
        template_version=m["template_version"],
        status=TaskStatus(m["status"]),
        params=_json_decode(m["params"]),
        model=m["model"],
        priority=m["priority"],
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        created_at=m["created_at"],
        run_at=m["run_at"],
        result=_load(m["result"]),
        error=_error(m["error"]),
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        steps=tuple(steps),
    )


def step_from_row(row: Row[Any]) -> Step:
    """Build a :class:`Step` from a ``task_steps`` row."""
    m = row._mapping
    usage = m["usage"]
    return Step(
        id=m["step_id"],
        position=m["position"],
        status=StepStatus(m["status"]),
        output=_load(m["output"]),
        error=_error(m["error"]),
        model=m["model"],
        usage=None if usage is None else msgspec.json.decode(usage, type=Usage),
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        duration_ms=m["duration_ms"],
    )


def _holds(lease: Lease) -> Any:
    """The guard every worker write carries."""
    return and_(
        tasks.c.id == lease.task_id,
        tasks.c.status == TaskStatus.RUNNING.value,
        tasks.c.lease_owner == lease.owner,
        tasks.c.attempts == lease.attempt,
    )


class TaskStore:
    """Tasks and their steps in the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- submitting ---------------------------------------------------------------------------

    async def enqueue(self, new: NewTask) -> Task:
        """Insert a queued task and return it."""
        created = iso_now()
        stmt = (
            insert(tasks)
            .values(
                template=new.template,
                template_version=new.template_version,
                status=TaskStatus.QUEUED.value,
                params=_dump(new.params),
                model=new.model,
                priority=new.priority,
                max_attempts=new.max_attempts,
                run_at=created,
                created_at=created,
            )
            .returning(*tasks.c)
        )
        async with self.db.write() as conn:
            row = (await conn.execute(stmt)).one()
        return task_from_row(row)

    # -- the worker's side --------------------------------------------------------------------

    async def claim(self, owner: str, limit: int, lease_seconds: float) -> list[Task]:
        """Atomically take up to ``limit`` due tasks, best first, and lease them to ``owner``.

        One ``UPDATE … RETURNING``: a task is claimed by exactly one caller. Each claim counts
        as an attempt. Returned in claim order (priority, then run time, then age).
        """
        now = iso_now()
        due = (
            select(tasks.c.id)
            .where(tasks.c.status == TaskStatus.QUEUED.value, tasks.c.run_at <= now)
            .order_by(tasks.c.priority.desc(), tasks.c.run_at, tasks.c.id)
            .limit(limit)
        )
        stmt = (
            update(tasks)
            .where(tasks.c.id.in_(due), tasks.c.status == TaskStatus.QUEUED.value)
            .values(
                status=TaskStatus.RUNNING.value,
                lease_owner=owner,
                lease_expires_at=iso_now(lease_seconds),
                attempts=tasks.c.attempts + 1,
                started_at=now,
                finished_at=None,
            )
            .returning(*tasks.c)
        )
        async with self.db.write() as conn:
            rows = (await conn.execute(stmt)).all()
        claimed = [task_from_row(r) for r in rows]
        claimed.sort(key=lambda t: (-t.priority, t.run_at, t.id))
        return claimed

    async def renew_leases(
        self, owner: str, task_ids: Iterable[int], lease_seconds: float
    ) -> set[int]:
        """Extend ``owner``'s leases on ``task_ids``; returns the ids still held."""
        ids = list(task_ids)
        if not ids:
            return set()
        stmt = (
            update(tasks)
            .where(
                tasks.c.id.in_(ids),
                tasks.c.status == TaskStatus.RUNNING.value,
                tasks.c.lease_owner == owner,
            )
            .values(lease_expires_at=iso_now(lease_seconds))
            .returning(tasks.c.id)
        )
        async with self.db.write() as conn:
            return set((await conn.execute(stmt)).scalars())

    async def start_step(self, lease: Lease, step_id: str, position: int) -> bool:
        """Record that a step started; False when the lease is lost."""
        values = {
            "task_id": lease.task_id,
            "attempt": lease.attempt,
            "step_id": step_id,
            "position": position,
            "status": StepStatus.RUNNING.value,
            "started_at": iso_now(),
        }
        # INSERT … SELECT … WHERE EXISTS(lease): the step row only appears while the lease holds.
        source = select(*[literal(v).label(k) for k, v in values.items()]).where(
            exists().where(_holds(lease))
        )
        stmt = insert(task_steps).from_select(list(values), source)
        async with self.db.write() as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def finish_step(self, lease: Lease, step: Step) -> bool:
        """Store a step's outcome; False when the lease is lost."""
        usage = step.usage
        stmt = (
            update(task_steps)
            .where(
                task_steps.c.task_id == lease.task_id,
                task_steps.c.attempt == lease.attempt,
                task_steps.c.step_id == step.id,
                exists().where(_holds(lease)),
            )
            .values(
                status=step.status.value,
                output=_dump(step.output),
                error=_dump(step.error),
                model=step.model,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
                usage=_dump(usage),
                finished_at=step.finished_at,
                duration_ms=step.duration_ms,
            )
        )
        async with self.db.write() as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def finish(
        self,
        lease: Lease,
        status: TaskStatus,
        *,
        result: Any = None,
        error: TaskError | None = None,
    ) -> bool:
        """Move a running task to a terminal status; False when the lease is lost."""
        stmt = (
            update(tasks)
            .where(_holds(lease))
            .values(
                status=status.value,
                result=_dump(result),
                error=_dump(error),
                finished_at=iso_now(),
                lease_owner=None,
                lease_expires_at=None,
            )
        )
        async with self.db.write() as conn:
            return (await conn.execute(stmt)).rowcount == 1

    async def release(self, lease: Lease) -> bool:
        """Hand a running task back to the queue (shutdown); the attempt is not counted."""
        stmt = (
            update(tasks)
            .where(_holds(lease))
            .values(
                status=TaskStatus.QUEUED.value,
                attempts=tasks.c.attempts - 1,
                run_at=iso_now(),
                lease_owner=None,
                lease_expires_at=None,
                started_at=None,
            )
        )
        async with self.db.write() as conn:
            await conn.execute(
                delete(task_steps).where(
                    task_steps.c.task_id == lease.task_id,
                    task_steps.c.attempt == lease.attempt,
                    exists().where(_holds(lease)),
                )
            )
            return (await conn.execute(stmt)).rowcount == 1

    async def requeue_expired(self) -> dict[int, TaskStatus]:
        """Return tasks whose lease expired (their worker died) to the queue.

        The dead attempt was counted when it was claimed; a task that has used all its
        attempts fails instead, with an error saying so. Returns each affected id and the
        status it moved to.
        """
        now = iso_now()
        exhausted = tasks.c.attempts >= tasks.c.max_attempts
        gave_up = _dump(
            TaskError(
                type="lease_expired",
                message="the worker running this task stopped responding (its lease expired) "
                "and the task has no attempts left",
            )
        )
        stmt = (
            update(tasks)
            .where(tasks.c.status == TaskStatus.RUNNING.value, tasks.c.lease_expires_at < now)
            .values(
                status=case((exhausted, TaskStatus.FAILED.value), else_=TaskStatus.QUEUED.value),
                error=case((exhausted, gave_up), else_=tasks.c.error),
                finished_at=case((exhausted, now), else_=None),
                run_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(tasks.c.id, tasks.c.status)
        )
        async with self.db.write() as conn:
            rows = (await conn.execute(stmt)).all()
        return {row.id: TaskStatus(row.status) for row in rows}

    # -- reading ------------------------------------------------------------------------------

    async def get_task(self, task_id: int) -> Task | None:
        """One task with the steps of its current attempt, or None."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(tasks).where(tasks.c.id == task_id))).one_or_none()
            if row is None:
                return None
            steps = (
                await conn.execute(
                    select(task_steps)
                    .where(
                        task_steps.c.task_id == task_id,
                        task_steps.c.attempt == row.attempts,
                    )
                    .order_by(task_steps.c.position)
                )
            ).all()
        return task_from_row(row, [step_from_row(s) for s in steps])

    async def list_page(
        self,
        *,
        status: TaskStatus | None = None,
        template: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> TaskPage:
        """A page of tasks, newest first, with keyset pagination on the id.

        Args:
            before: the cursor: only tasks with a smaller id (the previous page's last id).
        """
        query = select(tasks).order_by(tasks.c.id.desc()).limit(limit + 1)
        if status is not None:
            query = query.where(tasks.c.status == status.value)
        if template is not None:
            query = query.where(tasks.c.template == template)
        if before is not None:
            query = query.where(tasks.c.id < before)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
            page, more = rows[:limit], len(rows) > limit
            steps_by_task = await self._steps_for(conn, {r.id: r.attempts for r in page})
        items = [task_from_row(r, steps_by_task.get(r.id, [])) for r in page]
        return TaskPage(items=items, next_cursor=items[-1].id if more and items else None)

    @staticmethod
    async def _steps_for(conn: Any, attempts: Mapping[int, int]) -> dict[int, list[Step]]:
        """The current attempt's steps of many tasks in one query (no N+1)."""
        if not attempts:
            return {}
        rows = (
            await conn.execute(
                select(task_steps)
                .where(task_steps.c.task_id.in_(list(attempts)))
                .order_by(task_steps.c.task_id, task_steps.c.position)
            )
        ).all()
        out: dict[int, list[Step]] = {}
        for row in rows:
            if attempts[row.task_id] == row.attempt:
                out.setdefault(row.task_id, []).append(step_from_row(row))
        return out
