"""The hot path's SQL, compiled once: the statements every task runs through.

Each is a :class:`~orchestra.db.engine.Prepared` statement with named parameters, run on the
writer's raw connection inside a transaction the store opens; ``store`` says when and why.
Worker writes carry the lease guard (:data:`HOLDS`), so a worker that lost its task changes
nothing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Connection,
    Integer,
    and_,
    bindparam,
    exists,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from orchestra.db.engine import Prepared
from orchestra.db.rows import dump
from orchestra.db.tables import task_attempts, task_steps, tasks
from orchestra.domain import AttemptStatus, Lease, StepStatus, TaskError, TaskStatus

QUEUED, RUNNING = TaskStatus.QUEUED.value, TaskStatus.RUNNING.value


# The guard every worker write carries: the task is still running under this lease.
HOLDS = and_(
    tasks.c.id == bindparam("h_task"),
    tasks.c.status == RUNNING,
    tasks.c.lease_owner == bindparam("h_owner"),
    tasks.c.attempts == bindparam("h_attempt"),
)


def lease_params(lease: Lease) -> dict[str, Any]:
    """The values of the lease guard's parameters."""
    return {"h_task": lease.task_id, "h_owner": lease.owner, "h_attempt": lease.attempt}


# INSERT … SELECT … WHERE EXISTS(lease): the step row only appears while the lease holds.
START_STEP = Prepared(
    insert(task_steps).from_select(
        ["task_id", "attempt", "step_id", "position", "status", "started_at"],
        select(
            bindparam("h_task"),
            bindparam("h_attempt"),
            bindparam("step_id"),
            bindparam("position"),
            literal(StepStatus.RUNNING.value),
            bindparam("started_at"),
        ).where(exists().where(HOLDS)),
    )
)
_STEP_FIELDS = (
    "status",
    "output",
    "error",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "usage",
    "finished_at",
    "duration_ms",
    "prompt",
)
FINISH_STEP = Prepared(
    update(task_steps)
    .where(
        task_steps.c.task_id == bindparam("h_task"),
        task_steps.c.attempt == bindparam("h_attempt"),
        task_steps.c.step_id == bindparam("step_id"),
        exists().where(HOLDS),
    )
    .values({name: bindparam(f"v_{name}") for name in _STEP_FIELDS})
)
HELD = Prepared(select(literal(1)).where(HOLDS))
CLOSE_ATTEMPT = Prepared(
    update(task_attempts)
    .where(
        task_attempts.c.task_id == bindparam("h_task"),
        task_attempts.c.number == bindparam("h_attempt"),
    )
    .values(status=bindparam("v_status"), finished_at=bindparam("v_at"), error=bindparam("v_error"))
)


def claim_statement(skip_models: tuple[str, ...] = ()) -> Any:
    """The claim: one UPDATE … RETURNING over the best due tasks."""
    due = (
        select(tasks.c.id)
        .where(tasks.c.status == QUEUED, tasks.c.run_at <= bindparam("c_now"))
        .order_by(tasks.c.priority.desc(), tasks.c.run_at, tasks.c.id)
        .limit(bindparam("c_limit", type_=Integer))
    )
    if skip_models:
        # NOT IN is NULL for a NULL model: say explicitly that model-less tasks may run.
        due = due.where(or_(tasks.c.model.is_(None), tasks.c.model.not_in(list(skip_models))))
    return (
        update(tasks)
        .where(tasks.c.id.in_(due), tasks.c.status == QUEUED)
        .values(
            status=RUNNING,
            lease_owner=bindparam("c_owner"),
            lease_expires_at=bindparam("c_expires"),
            attempts=tasks.c.attempts + 1,
            started_at=bindparam("c_now"),
            finished_at=None,
        )
        .returning(*tasks.c)
    )


CLAIM = Prepared(claim_statement())
ADD_ATTEMPT = Prepared(
    insert(task_attempts).values(
        task_id=bindparam("a_task"),
        number=bindparam("a_number"),
        worker=bindparam("a_worker"),
        status=AttemptStatus.RUNNING.value,
        started_at=bindparam("a_at"),
    )
)


def _ending(**values: Any) -> Prepared:
    """An UPDATE that ends the lease's attempt: guarded by the lease, and giving it up."""
    return Prepared(
        update(tasks).where(HOLDS).values(lease_owner=None, lease_expires_at=None, **values)
    )


#: The attempt ended the task: succeeded, failed or cancelled (``v_status``), with its result
#: or error; a cancel asked for is answered.
FINISH = _ending(
    status=bindparam("v_status"),
    result=bindparam("v_result"),
    error=bindparam("v_error"),
    finished_at=bindparam("v_at"),
    cancel_requested=0,
)
#: The attempt failed with an error worth retrying: back to the queue, due at ``v_run_at``.
RETRY_LATER = _ending(status=QUEUED, error=bindparam("v_error"), run_at=bindparam("v_run_at"))
#: Shutdown hands the task back: queued again, due now; one more attempt handed back, so it
#: does not count against ``max_attempts``.
HAND_BACK = _ending(status=QUEUED, handed_back=tasks.c.handed_back + 1, run_at=bindparam("v_at"))


_ENQUEUE_COLUMNS = (
    "template",
    "template_version",
    "status",
    "params",
    "model",
    "priority",
    "max_attempts",
    "timeout_seconds",
    "run_at",
    "created_at",
    "idempotency_key",
    "idempotency_scope",
    "request_hash",
)
# SQLite's (and PostgreSQL's) INSERT … ON CONFLICT DO NOTHING: the idempotency key, unique
# within its scope (the API key that used it), decides.
ENQUEUE = Prepared(
    sqlite_insert(tasks)
    .values({name: bindparam(f"e_{name}") for name in _ENQUEUE_COLUMNS})
    .on_conflict_do_nothing(index_elements=["idempotency_scope", "idempotency_key"])
    .returning(*tasks.c)
)


def close_attempt(
    conn: Connection,
    lease: Lease,
    status: AttemptStatus,
    error: TaskError | None,
    now: str,
) -> None:
    """Record how the lease's attempt ended (inside the transaction that ends it)."""
    CLOSE_ATTEMPT.run(
        conn, {**lease_params(lease), "v_status": status.value, "v_at": now, "v_error": dump(error)}
    )
