"""What can happen to a task: the event types, each with its payload.

A task's events are stored (``task_events``) and streamed (``/api/v1/tasks/{id}/events``) as a
type word and a JSON object. :class:`EventType` names the words; each has one frozen payload
struct here whose fields, in order, are that object's keys (fields left at their default are
left out), so a payload encodes to the JSON stored and sent today. A payload knows its type
(``payload.type``): storage writes the two together and cannot mix them up.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

import msgspec

from orchestra.domain import Fallback, TaskError, Usage


class EventType(StrEnum):
    """The type of a task event, stored and streamed as these words."""

    #: Queued: by its submit, or again by a person's retry.
    TASK_QUEUED = "task.queued"
    #: A worker claimed it: a new attempt began.
    TASK_STARTED = "task.started"
    STEP_STARTED = "step.started"
    #: A piece of a step's streamed answer.
    STEP_TOKENS = "step.tokens"
    STEP_FINISHED = "step.finished"
    #: A step whose ``when`` was false.
    STEP_SKIPPED = "step.skipped"
    #: The attempt failed with an error worth retrying; the task is queued again.
    TASK_RETRYING = "task.retrying"
    #: Its worker shut down and gave the task back to the queue.
    TASK_HANDED_BACK = "task.handed_back"
    #: Its worker stopped renewing the lease; the attempt is lost.
    TASK_LEASE_EXPIRED = "task.lease_expired"
    #: Succeeded, failed or cancelled: nothing more happens until a person retries it.
    TASK_FINISHED = "task.finished"


#: The events of a task's progress: it still runs after them. Every other event may end an
#: attempt (or queue a task), and only those wake a wait for a task's end (``?wait``).
PROGRESS: frozenset[EventType] = frozenset(
    {
        EventType.TASK_STARTED,
        EventType.STEP_STARTED,
        EventType.STEP_TOKENS,
        EventType.STEP_FINISHED,
        EventType.STEP_SKIPPED,
    }
)


class EventPayload(msgspec.Struct, frozen=True, omit_defaults=True):
    """The data of one event; each subclass is the payload of one :class:`EventType`."""

    type: ClassVar[EventType]


class TaskQueued(EventPayload, frozen=True, omit_defaults=True):
    """``task.queued``: when it is due (a submit), or that a person retried it."""

    type: ClassVar[EventType] = EventType.TASK_QUEUED
    run_at: str | None = None
    retry: bool = False


class TaskStarted(EventPayload, frozen=True, omit_defaults=True):
    """``task.started``: which attempt, on which worker."""

    type: ClassVar[EventType] = EventType.TASK_STARTED
    attempt: int
    worker: str


class StepStarted(EventPayload, frozen=True, omit_defaults=True):
    """``step.started``: which step of which attempt."""

    type: ClassVar[EventType] = EventType.STEP_STARTED
    step: str
    position: int
    attempt: int


class StepTokens(EventPayload, frozen=True, omit_defaults=True):
    """``step.tokens``: text a step streamed."""

    type: ClassVar[EventType] = EventType.STEP_TOKENS
    step: str
    text: str


class StepFinished(EventPayload, frozen=True, omit_defaults=True):
    """``step.finished``: how a step ended, the model it used and what that cost; ``error``
    is the error's message; ``fallbacks``, the chain's entries passed over on the way."""

    type: ClassVar[EventType] = EventType.STEP_FINISHED
    step: str
    status: str
    model: str | None = None
    usage: Usage | None = None
    error: str | None = None
    fallbacks: tuple[Fallback, ...] | None = None


class StepSkipped(StepFinished, frozen=True, omit_defaults=True):
    """``step.skipped``: as :class:`StepFinished`, for a step that did not run."""

    type: ClassVar[EventType] = EventType.STEP_SKIPPED


class TaskRetrying(EventPayload, frozen=True, omit_defaults=True):
    """``task.retrying``: the attempt that failed, why, and when the next one is due."""

    type: ClassVar[EventType] = EventType.TASK_RETRYING
    attempt: int
    error: TaskError
    next_run_at: str


class TaskHandedBack(EventPayload, frozen=True, omit_defaults=True):
    """``task.handed_back``: the attempt given back."""

    type: ClassVar[EventType] = EventType.TASK_HANDED_BACK
    attempt: int


class TaskLeaseExpired(EventPayload, frozen=True, omit_defaults=True):
    """``task.lease_expired``: the attempt lost."""

    type: ClassVar[EventType] = EventType.TASK_LEASE_EXPIRED
    attempt: int


class TaskFinished(EventPayload, frozen=True, omit_defaults=True):
    """``task.finished``: the status it ended in and, when it did not succeed, why."""

    type: ClassVar[EventType] = EventType.TASK_FINISHED
    status: str
    error: TaskError | None = None


#: The payload struct of each event type.
PAYLOADS: dict[EventType, type[EventPayload]] = {
    payload.type: payload
    for payload in (
        TaskQueued,
        TaskStarted,
        StepStarted,
        StepTokens,
        StepFinished,
        StepSkipped,
        TaskRetrying,
        TaskHandedBack,
        TaskLeaseExpired,
        TaskFinished,
    )
}
