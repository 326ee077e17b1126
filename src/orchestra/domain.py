"""Domain data and pure rules: task states, their transitions, step results, times.

Domain structs are frozen; storage builds them from rows and they never reach back into the
database. Change one with :func:`msgspec.structs.replace`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import msgspec


class TaskStatus(StrEnum):
    """Where a task is in its life. Stored as these words."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: A task in one of these states may still change by itself.
ACTIVE: frozenset[TaskStatus] = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING})
#: A task in one of these states is finished; only a person (retry) moves it again.
TERMINAL: frozenset[TaskStatus] = frozenset(
    {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED}
)

#: Every legal move. Storage guards each UPDATE by the expected current state so that the
#: database enforces this table even when two actors race.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    # claimed by a worker, or cancelled before it ran
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED}),
    # finished, failed, cancelled, or back to the queue (lease expired / handed back)
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.QUEUED}
    ),
    TaskStatus.SUCCEEDED: frozenset(),
    # a person asks for a retry
    TaskStatus.FAILED: frozenset({TaskStatus.QUEUED}),
    TaskStatus.CANCELLED: frozenset({TaskStatus.QUEUED}),
}


def can_transition(current: TaskStatus, new: TaskStatus) -> bool:
    """Whether a task may move from ``current`` to ``new``."""
    return new in TRANSITIONS[current]


class StepStatus(StrEnum):
    """Where one step of a task is."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class Usage(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a model call cost, as the model server reported it."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Durations in milliseconds: total, model load, prompt evaluation, generation.
    total_ms: float | None = None
    load_ms: float | None = None
    prompt_ms: float | None = None
    generation_ms: float | None = None
    finish_reason: str | None = None


class TaskError(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a task (or one of its steps) failed, stored as JSON."""

    type: str
    message: str
    step: str | None = None
    retryable: bool = False


class Step(msgspec.Struct, frozen=True):
    """The record of one step of one attempt of a task."""

    id: str
    position: int
    status: StepStatus
    output: Any = None
    error: TaskError | None = None
    model: str | None = None
    usage: Usage | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration_ms: float | None = None


class Task(msgspec.Struct, frozen=True):
    """One submitted run of a template."""

    id: int
    template: str
    template_version: int
    status: TaskStatus
    params: dict[str, Any]
    model: str | None
    priority: int
    attempts: int
    max_attempts: int
    created_at: str
    run_at: str
    result: Any = None
    error: TaskError | None = None
    lease_owner: str | None = None
    lease_expires_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    steps: tuple[Step, ...] = ()

    @property
    def finished(self) -> bool:
        """Whether the task is in a terminal state."""
        return self.status in TERMINAL


class NewTask(msgspec.Struct, frozen=True):
    """What is needed to enqueue a task (validated already)."""

    template: str
    template_version: int
    params: dict[str, Any]
    model: str | None = None
    priority: int = 0
    max_attempts: int = 3


# Times are stored as fixed-width ISO-8601 UTC text so they sort as strings and read well in
# the sqlite3 shell: 2026-11-22T03:00:00.000000Z.
_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def now() -> datetime:
    """The current time, in UTC."""
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """Format a moment as stored: fixed-width ISO-8601 UTC with a Z."""
    return moment.astimezone(UTC).strftime(_FORMAT)


def iso_now(offset_seconds: float = 0.0) -> str:
    """The current time (plus an offset) as stored."""
    return iso(now() + timedelta(seconds=offset_seconds))
