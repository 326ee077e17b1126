"""Rows to domain structs, and the JSON text columns in both directions.

Each domain struct is built by one explicit constructor here; nothing else reads row mappings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestra.db.tables import task_attempts, task_steps
from orchestra.domain import (
    Attempt,
    AttemptStatus,
    Fallback,
    Step,
    StepStatus,
    Task,
    TaskError,
    TaskStatus,
    TaskSummary,
    Usage,
)

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.decode


def owners_on(column: ColumnElement[Any], host: str, *where: Any) -> Select[Any]:
    """The distinct names in ``column`` of processes on ``host`` (``host:pid:…``, see
    :mod:`orchestra.owners`) among the rows ``where`` selects."""
    return select(column).where(*where, column.startswith(host + ":", autoescape=True)).distinct()


def dump(value: Any) -> str | None:
    """A value as the JSON text stored in a column (None stays NULL)."""
    return None if value is None else _json_encode(value).decode()


def load(value: str | None) -> Any:
    """A JSON text column as a value (NULL is None)."""
    return None if value is None else _json_decode(value)


def error_of(value: str | None) -> TaskError | None:
    """An ``error`` JSON column as a :class:`TaskError`."""
    return None if value is None else msgspec.json.decode(value, type=TaskError)


def task_from_row(
    row: Row[Any] | Mapping[str, Any],
    steps: Sequence[Step] = (),
    history: Sequence[Attempt] = (),
) -> Task:
    """Build a :class:`Task` from a ``tasks`` row (or its mapping), its current steps and its
    attempts."""
    m = row._mapping if isinstance(row, Row) else row
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
        handed_back=m["handed_back"],
        timeout_seconds=m["timeout_seconds"],
        cancel_requested=bool(m["cancel_requested"]),
        idempotency_key=m["idempotency_key"],
        result=load(m["result"]),
        error=error_of(m["error"]),
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        steps=tuple(steps),
        history=tuple(history),
        cache=None if m.get("cache") is None else bool(m["cache"]),
    )


def lasted_ms(started: str | None, finished: str | None) -> float | None:
    """Milliseconds from ``started`` to ``finished`` (stored times); None when either is;
    never below 0 (the wall clock may have stepped back meanwhile), as steps' durations."""
    if started is None or finished is None:
        return None
    elapsed = datetime.fromisoformat(finished) - datetime.fromisoformat(started)
    return max(0.0, elapsed.total_seconds() * 1000)


def summary_from_row(row: Row[Any], tokens: int) -> TaskSummary:
    """Build a :class:`TaskSummary` from a ``tasks`` row (the listing's columns) and the tokens
    its current attempt used."""
    m = row._mapping
    started, finished = m["started_at"], m["finished_at"]
    return TaskSummary(
        id=m["id"],
        template=m["template"],
        template_version=m["template_version"],
        status=TaskStatus(m["status"]),
        model=m["model"],
        created_at=m["created_at"],
        started_at=started,
        finished_at=finished,
        duration_ms=lasted_ms(started, finished),
        tokens=tokens,
        attempts=m["attempts"],
        error=error_of(m["error"]),
        run_at=m.get("run_at"),
    )


def step_from_row(row: Row[Any]) -> Step:
    """Build a :class:`Step` from a ``task_steps`` row."""
    m = row._mapping
    usage = m["usage"]
    return Step(
        id=m["step_id"],
        position=m["position"],
        status=StepStatus(m["status"]),
        output=load(m["output"]),
        error=error_of(m["error"]),
        model=m["model"],
        usage=None if usage is None else msgspec.json.decode(usage, type=Usage),
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        duration_ms=m["duration_ms"],
        prompt=load(m["prompt"]),
        fallbacks=None
        if m["fallbacks"] is None
        else msgspec.json.decode(m["fallbacks"], type=tuple[Fallback, ...]),
    )


def attempt_from_row(row: Row[Any]) -> Attempt:
    """Build an :class:`Attempt` from a ``task_attempts`` row."""
    m = row._mapping
    return Attempt(
        number=m["number"],
        worker=m["worker"],
        status=AttemptStatus(m["status"]),
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        error=error_of(m["error"]),
    )


async def load_details(
    conn: AsyncConnection, attempts: Mapping[int, int]
) -> dict[int, tuple[list[Step], list[Attempt]]]:
    """The current attempt's steps and every attempt of many tasks: two queries, no N+1."""
    out: dict[int, tuple[list[Step], list[Attempt]]] = {i: ([], []) for i in attempts}
    if not attempts:
        return out
    ids = list(attempts)
    steps = await conn.execute(
        select(task_steps)
        .where(task_steps.c.task_id.in_(ids))
        .order_by(task_steps.c.task_id, task_steps.c.position)
    )
    for row in steps:
        if attempts[row.task_id] == row.attempt:
            out[row.task_id][0].append(step_from_row(row))
    tries = await conn.execute(
        select(task_attempts)
        .where(task_attempts.c.task_id.in_(ids))
        .order_by(task_attempts.c.task_id, task_attempts.c.number)
    )
    for row in tries:
        out[row.task_id][1].append(attempt_from_row(row))
    return out
