"""Domain data and pure rules: task states, their transitions, step results, times.

Domain structs are frozen; storage builds them from rows and they never reach back into the
database. Change one with :func:`msgspec.structs.replace`.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Literal, TypeVar

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


class AttemptStatus(StrEnum):
    """How one attempt of a task ended (or that it is still running)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    #: Its worker stopped renewing the lease (crashed, or was cut off).
    LOST = "lost"
    #: Given back to the queue at shutdown; not counted against max_attempts.
    HANDED_BACK = "handed_back"


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
    #: "prompt" when the prompt filled the context window (the model dropped its beginning),
    #: "output" when the answer hit its length limit (finish reason "length").
    truncated: str | None = None
    #: Answered from the cache of model answers (docs/cache.md): no model was asked; the
    #: tokens are those of the answer when it was made, the durations are left out.
    cached: bool = False

    def plus(self, other: Usage) -> Usage:
        """The sum of two calls' usage (a step that asked the model more than once)."""

        def add(a: float | None, b: float | None) -> Any:
            return b if a is None else a if b is None else a + b

        return Usage(
            prompt_tokens=add(self.prompt_tokens, other.prompt_tokens),
            completion_tokens=add(self.completion_tokens, other.completion_tokens),
            total_ms=add(self.total_ms, other.total_ms),
            load_ms=add(self.load_ms, other.load_ms),
            prompt_ms=add(self.prompt_ms, other.prompt_ms),
            generation_ms=add(self.generation_ms, other.generation_ms),
            finish_reason=other.finish_reason or self.finish_reason,
            truncated=other.truncated or self.truncated,
            cached=self.cached and other.cached,  # cached when no call asked a model
        )

    def flag_truncation(self, num_ctx: int | None) -> Usage:
        """Mark a prompt that filled ``num_ctx`` tokens, or an answer stopped by its length."""
        if num_ctx and self.prompt_tokens is not None and self.prompt_tokens >= num_ctx:
            return msgspec.structs.replace(self, truncated="prompt")
        if self.finish_reason == "length":
            return msgspec.structs.replace(self, truncated="output")
        return self


def total_usage(usages: Iterable[Usage | None]) -> Usage | None:
    """The sum of several steps' usage (None when none reported any)."""
    total: Usage | None = None
    for usage in usages:
        if usage is not None:
            total = usage if total is None else total.plus(usage)
    return total


class TaskError(msgspec.Struct, frozen=True, omit_defaults=True):
    """Why a task (or one of its steps) failed, stored as JSON."""

    type: str
    message: str
    step: str | None = None
    retryable: bool = False
    #: Seconds the model server asked to wait before it is called again (Retry-After);
    #: the retry waits at least this long.
    retry_after: float | None = None


#: The error of a task cancelled by a person (the API, the dashboard, a batch's cancel).
CANCELLED_BY_REQUEST = TaskError(type="cancelled", message="cancelled by request")


class Attempt(msgspec.Struct, frozen=True):
    """One try of a task: who ran it, when, and how it ended."""

    number: int
    worker: str
    status: AttemptStatus
    started_at: str
    finished_at: str | None = None
    error: TaskError | None = None


class Fallback(msgspec.Struct, frozen=True):
    """An entry of a fallback chain that a step's model call passed over, and why."""

    #: "provider/model", as in the chain.
    route: str
    #: Why it did not answer: the call's error, or what made it unavailable before.
    reason: str


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
    #: The messages sent to the model, as rendered ({"role", "content"} each), for an llm step.
    prompt: list[dict[str, str]] | None = None
    #: The chain's entries passed over before the one that answered (``model``); None when
    #: the first answered.
    fallbacks: tuple[Fallback, ...] | None = None


class Task(msgspec.Struct, frozen=True):
    """One submitted run of a template."""

    id: int
    template: str
    template_version: int
    status: TaskStatus
    params: dict[str, Any]
    model: str | None
    priority: int
    #: Attempts started so far; the current attempt's number while running.
    attempts: int
    max_attempts: int
    created_at: str
    run_at: str
    handed_back: int = 0
    timeout_seconds: float | None = None
    cancel_requested: bool = False
    idempotency_key: str | None = None
    result: Any = None
    error: TaskError | None = None
    lease_owner: str | None = None
    lease_expires_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    steps: tuple[Step, ...] = ()
    history: tuple[Attempt, ...] = ()
    #: The task's say on the cache of model answers: True use it, False bypass it, None: as
    #: each step says (docs/cache.md).
    cache: bool | None = None

    @property
    def finished(self) -> bool:
        """Whether the task is in a terminal state."""
        return self.status in TERMINAL

    @property
    def counted_attempts(self) -> int:
        """Attempts that count against ``max_attempts`` (hand-backs at shutdown do not)."""
        return self.attempts - self.handed_back

    @property
    def next_run_at(self) -> str | None:
        """When a queued task becomes due (after a delay or a retry backoff)."""
        return due_at(self.status, self.run_at)

    @property
    def asked_priority(self) -> int:
        """The priority the task was asked for (a batch row's: its batch's, see
        :func:`asked_priority`); ``priority`` is the one the queue orders by."""
        return asked_priority(self.priority)


class Lease(msgspec.Struct, frozen=True):
    """Proof that a worker holds a task: who, and for which attempt. Every write of a running
    task is guarded by it, so a worker that lost the task changes nothing."""

    task_id: int
    owner: str
    attempt: int


class TaskSummary(msgspec.Struct, frozen=True):
    """A task as a listing shows it: no params, result, steps or attempts, but its duration and
    the tokens its current attempt used."""

    id: int
    template: str
    template_version: int
    status: TaskStatus
    model: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    #: From the current attempt's start to the task's end; None until it has both.
    duration_ms: float | None
    #: Prompt and completion tokens of the current attempt's steps (0 before any reported).
    tokens: int
    attempts: int
    error: TaskError | None = None
    #: When a queued task becomes due (its submit, the end of its delay, or its retry); for
    #: other statuses the time it last did.
    run_at: str | None = None


class TaskFilter(msgspec.Struct, frozen=True):
    """Which tasks a listing, a count or a bulk action is about; a field left None does not
    narrow. All given fields must hold.

    ``created_from <= created_at < created_to``; a time without a zone is taken as UTC.
    ``text`` is a substring of the params, the result or the error, searched in their JSON
    text (a quote or a backslash matches as typed; ASCII letters in any case; ``%`` and ``_``
    are plain characters).
    """

    status: TaskStatus | None = None
    template: str | None = None
    model: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    text: str | None = None


#: The idempotency scope of requests without an API key (and of keys stored before keys were
#: scoped, schema version 7).
ANONYMOUS_SCOPE = ""

#: A single task's priority runs from PRIORITY_MIN to PRIORITY_MAX (higher runs first).
PRIORITY_MIN = -1000
PRIORITY_MAX = 1000


def in_batch_lane(priority: int) -> bool:
    """A task queued below every single task's priority is a batch's row (the batch lane,
    :data:`orchestra.db.batches.LANE`): it may not take a worker's reserved slot."""
    return priority < PRIORITY_MIN


#: How far below its batch's priority a batch row's task is queued: below every single task's,
#: so :func:`in_batch_lane` is true of every row's task (:mod:`orchestra.db.batches`).
BATCH_LANE = PRIORITY_MAX - PRIORITY_MIN + 1


def asked_priority(priority: int) -> int:
    """The priority a task was asked for: a batch row's task is stored :data:`BATCH_LANE`
    lower (its batch's priority is PRIORITY_MIN to PRIORITY_MAX too, so the lanes do not
    overlap and this is exact); what the API and the dashboard show."""
    return priority + BATCH_LANE if in_batch_lane(priority) else priority


class NewTask(msgspec.Struct, frozen=True):
    """A task to enqueue, validated and with its defaults applied: each field is the
    ``tasks`` column of the same name (storage writes them as they are, and the times and
    JSON as it stores them)."""

    template: str
    template_version: int
    params: dict[str, Any]
    model: str | None = None
    priority: int = 0
    max_attempts: int = 3
    #: None: due at once (when it is queued).
    run_at: datetime | None = None
    timeout_seconds: float | None = None
    idempotency_key: str | None = None
    #: Whose idempotency keys these are: the submitting API key's id ("" for anonymous
    #: callers), so one caller's key never finds, nor blocks, another caller's task.
    idempotency_scope: str = ANONYMOUS_SCOPE
    request_hash: str | None = None
    #: The task's say on the cache of model answers (None: as each step says).
    cache: bool | None = None


# Times are stored as fixed-width ISO-8601 UTC text so they sort as strings and read well in
# the sqlite3 shell: 2026-11-22T03:00:00.000000Z.


def now() -> datetime:
    """The current time, in UTC."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A moment with a zone; one given without is taken as UTC (as the API reads them)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


#: Ids are 64-bit signed integers (SQLite's INTEGER, PostgreSQL's bigint); larger numbers
#: cannot name a row, and a query with one overflows (an error, not a miss).
MAX_ID = 2**63 - 1


def storable_id(number: int) -> bool:
    """Whether ``number`` can name a row at all (a task, a batch, a webhook, a delivery)."""
    return 0 < number <= MAX_ID


_Row = TypeVar("_Row")


def first_page(found: Sequence[_Row], limit: int) -> tuple[list[_Row], _Row | None]:
    """A page of a keyset-paged list read as ``limit + 1`` rows: its first ``limit`` rows,
    and the last of them when there are more (whose key is the next page's cursor), else
    None: a full last page is not followed by an empty one."""
    page = list(found[:limit])
    return page, page[-1] if len(found) > limit and page else None


def iso(moment: datetime) -> str:
    """Format a moment as stored: fixed-width ISO-8601 UTC with a Z."""
    utc = moment if moment.tzinfo is UTC else moment.astimezone(UTC)
    # isoformat is C; strftime with %f cost 2 % of the service's CPU under load.
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def due_at(status: TaskStatus, run_at: str | None) -> str | None:
    """When a task in ``status`` whose row says ``run_at`` becomes due: its ``run_at`` while
    it is queued (a delay, a retry's backoff); None in any other status."""
    return run_at if status is TaskStatus.QUEUED else None


def iso_now(offset_seconds: float = 0.0) -> str:
    """The current time (plus an offset) as stored."""
    return iso(now() + timedelta(seconds=offset_seconds))


_DURATION = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


#: Control characters (C0 and DEL): no name or key given to the service holds one.
CONTROL = re.compile("[\x00-\x1f\x7f]")


def model_name_problem(name: str) -> str | None:
    """Why ``name`` names no model wherever it is given (a submit, a batch, a template), or
    None: spaces at its ends, a provider's prefix with nothing after it (``ollama/``), or
    template syntax (a model's name is not rendered). Such names were taken, and failed only
    when a worker asked for them."""
    if not name:
        return "must not be empty (leave it out for the default)"
    if name != name.strip():
        return "must not begin or end with a space"
    if CONTROL.search(name):
        return "must not hold a control character (NUL, a line break, a tab)"
    if name.endswith("/"):
        provider = name.rstrip("/")
        return f"ends with '/': name the model after its provider ({provider}/llama3.2)"
    if "{{" in name or "{%" in name:
        return "is a model's name, not a template: it is not rendered"
    return None


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``500ms``, ``1.5s``, ``2m``, ``1h``.

    Raises:
        ValueError: not a duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s or 2m, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        try:
            seconds = float(value)
        except OverflowError:  # an integer past any float
            seconds = math.inf
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"expected a duration like 500ms, 30s, 2m or 1h, got {value!r}")
        seconds = float(match.group("n")) * _UNITS[match.group("unit")]
    if not math.isfinite(seconds):  # .inf, .nan, 1e400, a 400-digit number of hours
        raise ValueError(f"a duration must be a finite number, got {value!r}")
    return seconds


#: The longest a retry waits for a model server's Retry-After, in seconds.
MAX_RETRY_AFTER = 3600.0
#: The longest a template's or a step's ``timeout`` may be, in seconds: a year (a bound a
#: template that worked before never met; past it, no time is meant).
MAX_TIMEOUT = 365 * 86_400.0
#: The longest wait between two attempts (a template's ``initial_delay`` and ``max_delay``),
#: in seconds: a year, likewise.
MAX_RETRY_DELAY = 365 * 86_400.0


class RetryPolicy(msgspec.Struct, frozen=True):
    """How a task is retried after a retryable error."""

    max_attempts: int = 3
    backoff: Literal["exponential", "fixed"] = "exponential"
    initial_delay: float = 1.0
    max_delay: float = 60.0

    def delay(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next attempt, after ``failed_attempts`` failures.

        Exponential doubles from ``initial_delay`` up to ``max_delay``. Jitter ("equal
        jitter": half fixed, half random) spreads retries of many tasks that failed together,
        so they do not hit a recovering model server at the same instant.
        """
        steps = max(failed_attempts - 1, 0)
        base = self.initial_delay * (2**steps if self.backoff == "exponential" else 1)
        base = min(base, self.max_delay)
        return base / 2 + (rng or random).uniform(0, base / 2)


class Retry(msgspec.Struct, frozen=True):
    """A failed attempt is tried again: at ``at``, ``delay`` seconds after it failed."""

    at: datetime
    delay: float
    #: Attempts still allowed after the one that failed.
    attempts_left: int


def decide_retry(
    task: Task,
    error: TaskError,
    policy: RetryPolicy,
    *,
    at: datetime,
    rng: random.Random | None = None,
) -> Retry | None:
    """Whether a task's failed attempt is tried again, and when; None: the task ends failed.

    A retryable error is tried again while the task has attempts left: its
    :attr:`Task.counted_attempts` (the failed one included; hand-backs at shutdown do not
    count) is below its own ``max_attempts`` (``policy`` gives only the backoff). The next
    attempt is due ``policy.delay(counted_attempts)`` seconds after ``at``. A non-retryable
    error, or the last attempt, ends the task.

    Args:
        task: the task as it was claimed for the attempt that failed.
        at: when it failed.
        rng: the jitter's randomness (the ``random`` module when None).
    """
    counted = task.counted_attempts
    if not error.retryable or counted >= task.max_attempts:
        return None
    # At least what the model server asked for (Retry-After), up to an hour.
    delay = max(policy.delay(counted, rng), min(error.retry_after or 0.0, MAX_RETRY_AFTER))
    # Templates are held to MAX_RETRY_DELAY when loaded; capped here too, so that no policy
    # can make a time past the calendar (OverflowError) or NaN and leave the task running.
    delay = min(delay, MAX_RETRY_DELAY) if math.isfinite(delay) else MAX_RETRY_DELAY
    return Retry(
        at=at + timedelta(seconds=delay), delay=delay, attempts_left=task.max_attempts - counted
    )
