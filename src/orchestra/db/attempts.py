"""An attempt's life on the writer: claimed, its lease renewed, its steps written, and its end
(finished, retried later, handed back, or lost when its lease expired).

Each operation is a transaction body (``conn`` is the writer's connection, inside a transaction
:class:`~orchestra.db.store.TaskStore` opens) with its SQL beside it; the hot path's statements
are :class:`~orchestra.db.prepared.Prepared`, compiled once. A worker's writes carry the lease
guard (:data:`HOLDS`), so a worker that lost its task changes nothing: the guarded statement
matches no row. Status guards come from :mod:`orchestra.db.guards`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import msgspec
from sqlalchemy import (
    ColumnElement,
    Connection,
    Text,
    and_,
    bindparam,
    case,
    exists,
    insert,
    literal,
    or_,
    select,
    update,
)

from orchestra.db import events, guards
from orchestra.db.portable import elapsed_ms
from orchestra.db.prepared import Prepared
from orchestra.db.rows import dump
from orchestra.db.tables import task_attempts, task_steps, tasks
from orchestra.domain import (
    CANCELLED_BY_REQUEST,
    AttemptStatus,
    Lease,
    Step,
    StepStatus,
    TaskError,
    TaskStatus,
)
from orchestra.event_types import (
    EventPayload,
    StepFinished,
    StepSkipped,
    StepStarted,
    StepTokens,
    TaskFinished,
    TaskLeaseExpired,
)

# -- the lease ------------------------------------------------------------------------------


def _held(sources: frozenset[TaskStatus] = guards.LEASED) -> ColumnElement[bool]:
    """The lease guard: the task is still in ``sources`` (running) under this lease."""
    return and_(
        tasks.c.id == bindparam("h_task"),
        guards.status_in(sources),
        tasks.c.lease_owner == bindparam("h_owner"),
        tasks.c.attempts == bindparam("h_attempt"),
    )


#: The guard every worker write carries: the task is still running under this lease.
HOLDS = _held()
HELD = Prepared(select(literal(1)).where(HOLDS))


def lease_params(lease: Lease) -> dict[str, Any]:
    """The values of the lease guard's parameters."""
    return {"h_task": lease.task_id, "h_owner": lease.owner, "h_attempt": lease.attempt}


class Renewal(msgspec.Struct, frozen=True):
    """The outcome of renewing leases: which are still held, which were asked to cancel."""

    held: set[int]
    cancel_requested: set[int]


def renew(conn: Connection, owner: str, ids: Collection[int], expires: str) -> Renewal:
    """Extend ``owner``'s leases on ``ids`` to ``expires``."""
    rows = conn.execute(
        update(tasks)
        .where(tasks.c.id.in_(list(ids)), guards.status_in(guards.LEASED))
        .where(tasks.c.lease_owner == owner)
        .values(lease_expires_at=expires)
        .returning(tasks.c.id, tasks.c.cancel_requested)
    ).all()
    return Renewal(
        held={r.id for r in rows}, cancel_requested={r.id for r in rows if r.cancel_requested}
    )


# -- steps ----------------------------------------------------------------------------------

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
    "fallbacks",
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


def start_step(conn: Connection, lease: Lease, step_id: str, position: int, at: str) -> bool:
    """A step's ``running`` row and its ``step.started`` event, while the lease holds; False
    when it does not."""
    params = {
        **lease_params(lease),
        "step_id": step_id,
        "position": position,
        "started_at": at,
    }
    if START_STEP.run(conn, params).rowcount != 1:
        return False
    events.append(conn, lease.task_id, step_started(lease, step_id, position), at)
    return True


def step_started(lease: Lease, step_id: str, position: int) -> StepStarted:
    """The event :func:`start_step` ends with."""
    return StepStarted(step=step_id, position=position, attempt=lease.attempt)


def add_text(conn: Connection, lease: Lease, step_id: str, text: str, at: str) -> bool:
    """A piece of a step's streamed answer (a ``step.tokens`` event), while the lease holds;
    False when it does not."""
    if HELD.run(conn, lease_params(lease)).fetchone() is None:
        return False
    events.append(conn, lease.task_id, StepTokens(step=step_id, text=text), at)
    return True


def end_step(conn: Connection, lease: Lease, step: Step, text: str, at: str) -> bool:
    """A step's outcome and its events (``text`` first, the rest of its streamed answer), while
    the lease holds; False when it does not. The events are at the step's ``finished_at``, or
    ``at`` when it has none."""
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
        "v_fallbacks": dump(step.fallbacks),
    }
    if FINISH_STEP.run(conn, params).rowcount != 1:
        return False
    at = step.finished_at or at
    if text:  # the step's last streamed text, arrived by the time it ended
        events.append(conn, lease.task_id, StepTokens(step=step.id, text=text), at)
    events.append(conn, lease.task_id, step_ended(step), at)
    return True


def step_ended(step: Step) -> StepFinished | StepSkipped:
    """The event :func:`end_step` ends with."""
    ended = StepSkipped if step.status is StepStatus.SKIPPED else StepFinished
    return ended(
        step=step.id,
        status=step.status.value,
        model=step.model or None,
        usage=step.usage,
        error=step.error.message if step.error is not None else None,
        fallbacks=step.fallbacks,
    )


# -- the attempt's end ----------------------------------------------------------------------
# Each end is its own statement, guarded by the lease and giving it up (lease_owner and
# lease_expires_at cleared); what else each sets is written out in full.

#: The attempt ended the task: succeeded, failed or cancelled (``v_status``), with its result
#: or error; a cancel asked for is answered.
FINISH = Prepared(
    update(tasks)
    .where(_held(guards.FINISH.sources))
    .values(
        status=bindparam("v_status"),
        result=bindparam("v_result"),
        error=bindparam("v_error"),
        finished_at=bindparam("v_at"),
        cancel_requested=0,
        lease_owner=None,
        lease_expires_at=None,
    )
)
#: A task a cancel was asked for while its attempt ran: whatever the attempt's end would have
#: queued again (a retry, a hand-back, a lost lease), it is cancelled (it was queued, and run
#: again: a batch's row 80 s after its batch's cancel).
ASKED_TO_CANCEL = tasks.c.cancel_requested != 0
#: The attempt failed with an error worth retrying: back to the queue, due at ``v_run_at``.
RETRY_LATER = Prepared(
    update(tasks)
    .where(_held(guards.RETRY_LATER.sources), ~ASKED_TO_CANCEL)
    .values(
        status=TaskStatus.QUEUED.value,
        error=bindparam("v_error"),
        run_at=bindparam("v_run_at"),
        lease_owner=None,
        lease_expires_at=None,
    )
)
#: Shutdown hands the task back: queued again in its place (its ``run_at`` as it was: it
#: was due before the tasks queued while it ran), and ``handed_back`` counts one more, so
#: this attempt does not count against ``max_attempts``.
HAND_BACK = Prepared(
    update(tasks)
    .where(_held(guards.HAND_BACK.sources), ~ASKED_TO_CANCEL)
    .values(
        status=TaskStatus.QUEUED.value,
        handed_back=tasks.c.handed_back + 1,
        lease_owner=None,
        lease_expires_at=None,
    )
)
#: Instead of :data:`RETRY_LATER` or :data:`HAND_BACK`, for a task a cancel was asked for.
CANCEL_INSTEAD = Prepared(
    update(tasks)
    .where(_held(guards.RETRY_LATER.sources & guards.HAND_BACK.sources), ASKED_TO_CANCEL)
    .values(
        status=TaskStatus.CANCELLED.value,
        error=dump(CANCELLED_BY_REQUEST),
        finished_at=bindparam("v_at"),
        cancel_requested=0,
        lease_owner=None,
        lease_expires_at=None,
    )
)
CLOSE_ATTEMPT = Prepared(
    update(task_attempts)
    .where(
        task_attempts.c.task_id == bindparam("h_task"),
        task_attempts.c.number == bindparam("h_attempt"),
    )
    .values(status=bindparam("v_status"), finished_at=bindparam("v_at"), error=bindparam("v_error"))
)


# The steps an attempt was still in when it ended otherwise than by its steps (cancelled,
# timed out, handed back): failed with the attempt's error, at its end.
CLOSE_STEPS = Prepared(
    update(task_steps)
    .where(
        task_steps.c.task_id == bindparam("h_task"),
        task_steps.c.attempt == bindparam("h_attempt"),
        task_steps.c.status == StepStatus.RUNNING.value,
    )
    .values(
        status=StepStatus.FAILED.value,
        error=bindparam("v_error"),
        finished_at=bindparam("v_at"),
        duration_ms=elapsed_ms(task_steps.c.started_at, bindparam("v_at", type_=Text())),
    )
)


class Ending(msgspec.Struct, frozen=True):
    """How an attempt ends: the task's statement (:data:`FINISH`, :data:`RETRY_LATER` or
    :data:`HAND_BACK`) and its values, the attempt's status and error, the event that says
    so, and the task's status it leaves."""

    statement: Prepared
    values: dict[str, Any]
    attempt: AttemptStatus
    why: TaskError | None
    event: EventPayload
    then: TaskStatus


#: How a task whose attempt would have queued it again ends when a cancel was asked for.
CANCELLED_MEANWHILE = TaskFinished(status=TaskStatus.CANCELLED.value, error=CANCELLED_BY_REQUEST)


def end_attempt(
    conn: Connection, lease: Lease, ending: Ending, at: str, step: Step | None, text: str
) -> TaskStatus | None:
    """End the lease's attempt: its last step (when given), the task's row (the ending's
    statement, guarded by the lease, which also gives the lease up), the attempt's record and
    the ending's event. Returns the task's status after (``ending.then``; cancelled instead
    of queued when a cancel was asked for: :data:`CANCEL_INSTEAD`), or None when the lease
    does not hold."""
    if step is not None:
        # Fenced by the same lease as the UPDATE after it: both match or neither does.
        end_step(conn, lease, step, text, at)
    held = lease_params(lease)
    attempt, why, event, then = ending.attempt, ending.why, ending.event, ending.then
    if ending.statement.run(conn, {**held, **ending.values}).rowcount != 1:
        if (
            then is not TaskStatus.QUEUED
            or CANCEL_INSTEAD.run(conn, {**held, "v_at": at}).rowcount != 1
        ):
            return None
        event, then = CANCELLED_MEANWHILE, TaskStatus.CANCELLED
        if attempt is AttemptStatus.HANDED_BACK:  # else it failed, and says why
            attempt, why = AttemptStatus.CANCELLED, CANCELLED_BY_REQUEST
    closed = {**held, "v_status": attempt.value, "v_at": at, "v_error": dump(why)}
    CLOSE_ATTEMPT.run(conn, closed)
    if step is None:  # ended between or inside its steps: none is left running
        CLOSE_STEPS.run(conn, closed)
    events.append(conn, lease.task_id, event, at)
    return then


# -- lost attempts --------------------------------------------------------------------------

#: The error of an attempt whose worker stopped renewing its lease.
LOST = TaskError(
    type="lease_expired",
    message="the worker running this attempt stopped renewing its lease "
    "(it crashed or was cut off)",
    retryable=True,
)
#: The error of a task that lost its worker on its last attempt.
GAVE_UP = TaskError(
    type="lease_expired",
    message="the worker running this task stopped responding (its lease expired) "
    "and the task has no attempts left",
)


def died(cause: str) -> tuple[TaskError, TaskError]:
    """The errors of an attempt whose process died (``cause``: which, and how), when the task
    is queued again and when it has no attempts left."""
    lost = f"the process running this attempt died ({cause})"
    return (
        TaskError(type="lease_expired", message=lost, retryable=True),
        TaskError(type="lease_expired", message=f"{lost}; the task has no attempts left"),
    )


class LeaseEnd(msgspec.Struct, frozen=True):
    """A task whose lease ended without its worker: the status it moved to (queued again,
    failed out of attempts, or cancelled when a cancel was asked for), its template (for the
    metrics and the log) and the attempt lost."""

    status: TaskStatus
    template: str
    attempt: int


def expire_leases(
    conn: Connection,
    now: str,
    *,
    owner: str | None = None,
    cause: str = "",
    running: Collection[int] = (),
) -> dict[int, LeaseEnd]:
    """Return tasks whose lease expired before ``now`` to the queue, or fail those with no
    attempts left; each lost attempt is recorded. Returns each id and how it ended.

    With ``owner``, the leases of that worker pool are ended now, whenever they would have
    expired: its process is known dead (``cause`` says how), so its tasks need not wait out
    their leases. The attempt still counts, as an expired one does: a task that kills its
    process does not run forever.

    ``running``: the tasks the reaping process runs itself, whose leases it renews: left be
    whatever their expiry says (the wall clock jumped forward: a laptop woke from sleep, a
    clock was stepped), as a process knows its own tasks are alive.
    """
    exhausted = (tasks.c.attempts - tasks.c.handed_back) >= tasks.c.max_attempts
    lost, gave_up = (LOST, GAVE_UP) if owner is None else died(cause)
    gone = tasks.c.lease_expires_at < now if owner is None else tasks.c.lease_owner == owner
    if running:
        gone = and_(gone, tasks.c.id.not_in(list(running)))
    cancelled, failed = TaskStatus.CANCELLED.value, TaskStatus.FAILED.value
    rows = conn.execute(
        update(tasks)
        .where(guards.LEASE_EXPIRED.guard, gone)
        .values(
            status=case(
                (ASKED_TO_CANCEL, cancelled), (exhausted, failed), else_=TaskStatus.QUEUED.value
            ),
            error=case(
                (ASKED_TO_CANCEL, dump(CANCELLED_BY_REQUEST)),
                (exhausted, dump(gave_up)),
                else_=dump(lost),
            ),
            finished_at=case((or_(ASKED_TO_CANCEL, exhausted), now), else_=None),
            cancel_requested=0,
            # Its first loss keeps its place (it was due before the tasks queued while it
            # ran); lost again, it may be what kills its process: behind them, not at the
            # head of the queue, where each process in turn would take it and die.
            run_at=case((tasks.c.attempts - tasks.c.handed_back <= 1, tasks.c.run_at), else_=now),
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(tasks.c.id, tasks.c.status, tasks.c.attempts, tasks.c.template)
    ).all()
    for row in rows:
        conn.execute(
            update(task_attempts)
            .where(task_attempts.c.task_id == row.id, task_attempts.c.number == row.attempts)
            .values(status=AttemptStatus.LOST.value, finished_at=now, error=dump(lost))
        )
        closed = {"h_task": row.id, "h_attempt": row.attempts, "v_error": dump(lost), "v_at": now}
        CLOSE_STEPS.run(conn, closed)
        events.append(conn, row.id, TaskLeaseExpired(attempt=row.attempts), now)
        if row.status == failed:
            events.append(conn, row.id, TaskFinished(status=row.status, error=gave_up), now)
        elif row.status == cancelled:
            events.append(conn, row.id, CANCELLED_MEANWHILE, now)
    return {row.id: LeaseEnd(TaskStatus(row.status), row.template, row.attempts) for row in rows}
