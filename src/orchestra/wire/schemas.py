"""Request and response bodies of the task, template, model and health endpoints (the
controllers in :mod:`orchestra.api` send them; :mod:`orchestra.client` decodes into them).
Separate from tables and domain structs on purpose: the API is a contract, and it changes only
when we mean it to."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from orchestra.domain import (
    Attempt,
    Fallback,
    Step,
    Task,
    TaskError,
    TaskStatus,
    TaskSummary,
    Usage,
    due_at,
    iso,
    total_usage,
)
from orchestra.llm.base import Crash, Phase, ProcessInfo, ProcessState
from orchestra.llm.model_crashes import signal_label

if TYPE_CHECKING:  # the server's types, for the constructors only: the client never loads them
    from orchestra.llm.router import ProviderState
    from orchestra.templating.model import Template
    from orchestra.templating.source import TemplateProblem


class ErrorOut(msgspec.Struct, frozen=True, omit_defaults=True):
    """What went wrong with a task (or one of its steps)."""

    type: str
    message: str
    step: str | None = None
    #: Whether trying again may succeed (a server down, a timeout); false for a missing model,
    #: bad credentials, a template that cannot render.
    retryable: bool = False
    #: Seconds the model server asked to wait (Retry-After); the retry waited at least that.
    retry_after: float | None = None


class FieldOut(msgspec.Struct, frozen=True):
    """One bad field of a request."""

    field: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    """The body of every 4xx and 5xx answer."""

    status: int
    code: str
    message: str
    fields: list[FieldOut]
    #: On a 409 about a task: the status it is in.
    task_status: str | None = None
    #: On a 422 about a template: every problem, with its position in the YAML.
    errors: list[ProblemOut] | None = None


class MessageOut(msgspec.Struct, frozen=True):
    """One chat message sent to a model."""

    role: str
    content: str


class StepOut(msgspec.Struct, frozen=True):
    """One step of a task's current attempt."""

    id: str
    status: str
    output: Any
    error: ErrorOut | None
    #: The provider that answered, as named in [providers].
    provider: str | None
    #: "provider/model": what answered (usable as a template's `model`).
    model: str | None
    usage: Usage | None
    started_at: str | None
    finished_at: str | None
    duration_ms: float | None
    #: An llm step's messages as rendered and sent ({"role", "content"} each); else null.
    prompt: list[MessageOut] | None = None
    #: The fallback chain's entries passed over before ``model`` answered, each with why
    #: (``{"route", "reason"}``); null when the chain's first entry answered.
    fallbacks: list[Fallback] | None = None

    @classmethod
    def of(cls, step: Step) -> StepOut:
        """From a domain step."""
        return cls(
            id=step.id,
            status=step.status.value,
            output=step.output,
            error=_error(step.error),
            provider=step.model.partition("/")[0] if step.model else None,
            model=step.model,
            usage=_usage(step.usage),
            started_at=step.started_at,
            finished_at=step.finished_at,
            duration_ms=rounded_ms(step.duration_ms),
            prompt=None
            if step.prompt is None
            else [MessageOut(m["role"], m["content"]) for m in step.prompt],
            fallbacks=None if step.fallbacks is None else list(step.fallbacks),
        )


class TaskAttemptOut(msgspec.Struct, frozen=True):
    """One try of a task."""

    number: int
    worker: str
    status: str
    started_at: str
    finished_at: str | None
    error: ErrorOut | None

    @classmethod
    def of(cls, attempt: Attempt) -> TaskAttemptOut:
        """From a domain attempt."""
        return cls(
            number=attempt.number,
            worker=attempt.worker,
            status=attempt.status.value,
            started_at=attempt.started_at,
            finished_at=attempt.finished_at,
            error=_error(attempt.error),
        )


#: Decimals a duration in milliseconds keeps on the wire: whole microseconds, the precision
#: of the times it is measured between (without it, a difference of two clock readings
#: shows as 304.76599999999996).
MS_DECIMALS = 3


def rounded_ms(value: float | None) -> float | None:
    """A duration in milliseconds, to the microsecond."""
    return None if value is None else round(value, MS_DECIMALS)


def _usage(usage: Usage | None) -> Usage | None:
    """``usage`` with its durations to the microsecond (a task's is a sum of its steps')."""
    if usage is None:
        return None
    return msgspec.structs.replace(
        usage,
        total_ms=rounded_ms(usage.total_ms),
        load_ms=rounded_ms(usage.load_ms),
        prompt_ms=rounded_ms(usage.prompt_ms),
        generation_ms=rounded_ms(usage.generation_ms),
    )


def _error(error: TaskError | None) -> ErrorOut | None:
    if error is None:
        return None
    return ErrorOut(
        type=error.type,
        message=error.message,
        step=error.step,
        retryable=error.retryable,
        retry_after=error.retry_after,
    )


class TaskOut(msgspec.Struct, frozen=True):
    """A task as clients see it."""

    id: int
    template: str
    template_version: int
    status: TaskStatus
    params: dict[str, Any]
    model: str | None
    #: The priority asked for: a batch row's is its batch's (queued in the batch lane below
    #: every single task, docs/batches.md).
    priority: int
    result: Any
    error: ErrorOut | None
    steps: list[StepOut]
    #: The sum of the steps' usage (tokens and milliseconds) in the current attempt.
    usage: Usage | None
    attempts: list[TaskAttemptOut]
    max_attempts: int
    timeout: float | None
    idempotency_key: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    next_run_at: str | None

    @classmethod
    def of(cls, task: Task) -> TaskOut:
        """From a domain task."""
        return cls(
            id=task.id,
            template=task.template,
            template_version=task.template_version,
            status=task.status,
            params=task.params,
            model=task.model,
            priority=task.asked_priority,
            result=task.result,
            error=_error(task.error),
            steps=[StepOut.of(s) for s in task.steps],
            usage=_usage(total_usage(s.usage for s in task.steps)),
            attempts=[TaskAttemptOut.of(a) for a in task.history],
            max_attempts=task.max_attempts,
            timeout=task.timeout_seconds,
            idempotency_key=task.idempotency_key,
            created_at=task.created_at,
            started_at=task.started_at,
            finished_at=task.finished_at,
            next_run_at=task.next_run_at,
        )


class TaskSummaryOut(msgspec.Struct, frozen=True):
    """A task as a listing shows it: no ``params``, ``result``, steps or attempts (``GET
    /api/v1/tasks/{id}`` has them), so a page's size does not depend on what the tasks hold."""

    id: int
    template: str
    template_version: int
    status: TaskStatus
    model: str | None
    error: ErrorOut | None
    #: The current (or last) attempt's number: attempts started so far, 0 before the first.
    attempt: int
    #: Prompt and completion tokens of the current attempt's steps.
    tokens: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    #: From the current attempt's start to the task's end; null until it has both.
    duration_ms: float | None
    #: When a queued task becomes due (its submit, the end of its delay, or its retry's
    #: backoff); null for the other statuses.
    next_run_at: str | None = None

    @classmethod
    def of(cls, task: TaskSummary) -> TaskSummaryOut:
        """From a domain summary."""
        return cls(
            id=task.id,
            template=task.template,
            template_version=task.template_version,
            status=task.status,
            model=task.model,
            error=_error(task.error),
            attempt=task.attempts,
            tokens=task.tokens,
            created_at=task.created_at,
            started_at=task.started_at,
            finished_at=task.finished_at,
            duration_ms=rounded_ms(task.duration_ms),
            next_run_at=due_at(task.status, task.run_at),
        )


class TaskList(msgspec.Struct, frozen=True):
    """A page of task summaries, newest first; pass ``next_cursor`` as ``cursor`` for the next
    page."""

    items: list[TaskSummaryOut]
    next_cursor: str | None


class StepSummary(msgspec.Struct, frozen=True):
    """A step of a template."""

    id: str
    kind: str
    model: str | None


class TemplateOut(msgspec.Struct, frozen=True):
    """A template: what it does and the parameters it takes (as JSON Schema)."""

    name: str
    version: int
    origin: str
    description: str
    model: str | None
    parameters: dict[str, Any]
    steps: list[StepSummary]

    @classmethod
    def of(cls, template: Template) -> TemplateOut:
        """From a loaded template."""
        return cls(
            name=template.name,
            version=template.version,
            origin=template.origin,
            description=template.description,
            model=template.model,
            parameters=template.params_schema(),
            steps=[
                StepSummary(id=s.id, kind=s.kind, model=getattr(s, "model", None))
                for s in template.steps
            ],
        )


class TemplateList(msgspec.Struct, frozen=True):
    """Templates (every template offered for new tasks, or every version of one)."""

    items: list[TemplateOut]


class ProblemOut(msgspec.Struct, frozen=True):
    """One problem in a template, with 1-based line and column (0: of a file or folder as a
    whole, a template folder that does not exist), and the file it is in (a template folder's
    file; the request's own text is named as such)."""

    line: int
    column: int
    path: str
    message: str
    file: str | None = None

    @classmethod
    def of(cls, problem: TemplateProblem) -> ProblemOut:
        """From a template problem."""
        return cls(problem.line, problem.column, problem.path, problem.message, problem.file)


class ValidationOut(msgspec.Struct, frozen=True):
    """Whether a template is valid, and every problem if not."""

    valid: bool
    errors: list[ProblemOut]
    name: str | None = None


def _iso_epoch(seconds: float | None) -> str | None:
    return None if seconds is None else _iso_at(seconds)


def _iso_at(seconds: float) -> str:
    return iso(datetime.fromtimestamp(seconds, UTC))


class CrashOut(msgspec.Struct, frozen=True):
    """How a model process last died."""

    at: str
    #: What it was doing.
    phase: Phase
    #: The signal's name (SIGSEGV), or null when it exited by itself.
    signal: str | None
    exit_code: int | None
    message: str

    @classmethod
    def of(cls, crash: Crash) -> CrashOut:
        return cls(
            at=_iso_at(crash.at),
            phase=crash.phase,
            signal=signal_label(crash.signal) if crash.signal else None,
            exit_code=crash.exit_code,
            message=crash.message,
        )


class ProcessOut(msgspec.Struct, frozen=True):
    """A provider's own model process (the embedded model's)."""

    #: idle (starts on first use), starting, ready, restarting (after a crash), down (crashed
    #: too often or cannot load; a health check tries a fresh process), stopped.
    state: ProcessState
    pid: int | None
    #: Its resident memory in bytes (the service's own does not include the model).
    rss_bytes: int | None
    restarts: int
    crashes: int
    last_crash: CrashOut | None
    #: When it starts again (state restarting).
    restart_at: str | None

    @classmethod
    def of(cls, info: ProcessInfo) -> ProcessOut:
        return cls(
            state=info.state,
            pid=info.pid,
            rss_bytes=info.rss_bytes,
            restarts=info.restarts,
            crashes=info.crashes,
            last_crash=CrashOut.of(info.last_crash) if info.last_crash else None,
            restart_at=_iso_epoch(info.restart_at),
        )


class ProviderOut(msgspec.Struct, frozen=True):
    """One provider as last checked."""

    name: str
    kind: str
    available: bool
    detail: str
    #: The models it reports having (null: it does not say).
    models: list[str] | None
    #: When it was last checked (or, for the embedded model, last changed state).
    checked_at: str | None
    #: The embedded model's process; null for model servers.
    process: ProcessOut | None = None

    @classmethod
    def of(cls, state: ProviderState) -> ProviderOut:
        return cls(
            name=state.name,
            kind=state.kind,
            available=state.available,
            detail=state.detail,
            models=None if state.models is None else list(state.models),
            checked_at=_iso_epoch(state.checked_at),
            process=ProcessOut.of(state.process) if state.process else None,
        )


class ModelOut(msgspec.Struct, frozen=True):
    """A logical model name, its fallback chain, and the entry that would serve now."""

    name: str
    chain: list[str]
    #: The first available entry of the chain (null: none is available now).
    serves: str | None
    #: Each entry of the chain not expected to answer now, with why (a failed call, a health
    #: check, a model its provider does not list); such entries are asked last.
    unavailable: dict[str, str]


class ModelsOut(msgspec.Struct, frozen=True):
    """GET /api/v1/models."""

    models: list[ModelOut]
    providers: list[ProviderOut]


class HealthOut(msgspec.Struct, frozen=True, omit_defaults=True):
    """Whether the service and what it depends on answer."""

    #: ok: the database answers, writes succeed, this process's workers claim and a provider
    #: is available; degraded: writes fail, the disk is low, claims fail or no provider is
    #: available; down: the database does not answer.
    status: str
    #: "ok", or what is wrong: "error: disk full since …", "low disk: 80 MB free", …
    database: str
    #: This process's workers: "ok", or why they claim nothing ("error: claims fail
    #: (RuntimeError: …) since …"). Left out without workers (``--no-workers``) and for a
    #: caller without the read scope.
    workers: str | None = None
    #: Left out for a caller without the read scope (no key, once keys exist).
    providers: dict[str, ProviderOut] | None = None
    #: Left out for a caller without the read scope.
    version: str | None = None
