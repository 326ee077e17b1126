"""One exception tree for the whole service.

::

    OrchestraError
    ├── ConfigError                 settings file or environment is wrong (stops startup)
    ├── StartupFailed               one of `serve --processes N`'s processes did not start
    ├── TemplateError               a template cannot be loaded (carries every problem found)
    ├── NotFoundError
    │   ├── TaskNotFound
    │   └── TemplateNotFound
    ├── InvalidRequest              a request is well formed but its content is wrong
    │   └── InvalidParams           task parameters do not match the template
    ├── PayloadTooLarge             a body or template over its configured limit
    ├── BodyTimeout                 a request's body stopped arriving (408)
    ├── Unauthorized                no valid API key
    ├── Forbidden                   the key's scope does not allow the call
    ├── TooManyStreams              a key holds its most event streams open (429)
    ├── ConflictError               the request conflicts with the current state
    ├── LeaseLost                   a worker no longer holds the task it is writing
    ├── StorageError                the database cannot read or write now (retry later)
    │   ├── StorageFull             its disk is full (507)
    │   ├── StorageLocked           another connection holds the write lock (503)
    │   └── StorageUnavailable      read-only, an I/O error, a file that cannot be opened (503)
    │       └── StorageUnreachable  the database server cannot be reached (503, Retry-After)
    ├── ClientError                 orchestra.client: a call to a service failed (its
    │                               branch is drawn in orchestra.client.errors)
    └── StepError                   a step of a running task failed
        ├── RenderError             a prompt or output could not be rendered (permanent)
        ├── StepTimeout             a step or the whole attempt took too long (retryable)
        ├── InvalidOutput           structured output that stays invalid after repairs
        └── ProviderError           the model server failed (a fallback chain moves on
            │                       from any of these, unless text was streamed)
            ├── ModelNotFound       the model server does not have the model (permanent)
            └── ProviderUnavailable connection refused, timeout, 5xx (retryable)
                ├── ProviderUnreachable nothing answered (a chain may wait for it)
                └── ProviderBusy        429/503 with Retry-After (the retry waits that long)

Each class's docstring is its default message. The API maps the tree to HTTP statuses in one
place (``orchestra.api.errors``); providers wrap httpx errors at their boundary, and the
database (``orchestra.db.engine``) wraps SQLite's at its own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

#: A UTF-16 surrogate in a str: half a character, which no encoding can hold (a lone one
#: comes from a ``\ud800`` escape, in JSON, YAML or a Jinja string).
SURROGATE = re.compile("[\ud800-\udfff]")
#: What such a half is, as every message that refuses one says it.
HALF_SURROGATE = "half of a UTF-16 surrogate pair without its other half, which is not a character"


class FieldProblem(msgspec.Struct, frozen=True):
    """One problem with one named field, as reported to clients."""

    field: str
    message: str


class OrchestraError(Exception):
    """Something went wrong in Orchestra."""

    code = "error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or "").strip()
        super().__init__(self.message)


class ConfigError(OrchestraError):
    """The configuration is invalid."""

    code = "invalid_config"


class StartupFailed(OrchestraError):
    """A process failed to start, so the supervisor stopped them all."""

    code = "startup_failed"


class TemplateError(OrchestraError):
    """The template is invalid."""

    code = "invalid_template"

    def __init__(self, problems: Sequence[Any], message: str | None = None) -> None:
        self.problems = list(problems)
        first = str(self.problems[0]) if self.problems else ""
        super().__init__(message or f"{len(self.problems)} problem(s) in template: {first}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled whole (a template validated in a render process comes back with its problems).
        return (type(self), (self.problems, str(self)))


class NotFoundError(OrchestraError):
    """The resource does not exist."""

    code = "not_found"


class TaskNotFound(NotFoundError):
    """No task has this id."""

    code = "task_not_found"


class TemplateNotFound(NotFoundError):
    """No template has this name."""

    code = "template_not_found"


class InvalidRequest(OrchestraError):
    """The request is invalid."""

    code = "invalid_request"

    def __init__(self, message: str | None = None, fields: Sequence[FieldProblem] = ()) -> None:
        self.fields = list(fields)
        super().__init__(message)


class InvalidParams(InvalidRequest):
    """The task parameters do not match the template."""

    code = "invalid_params"


class ClientGone(InvalidRequest):
    """The client went away before the upload ended."""

    code = "client_gone"


class PayloadTooLarge(OrchestraError):
    """The request is larger than the service accepts."""

    code = "too_large"

    def __init__(self, message: str | None = None, fields: Sequence[FieldProblem] = ()) -> None:
        self.fields = list(fields)
        super().__init__(message)


class BodyTimeout(OrchestraError):
    """The request's body stopped arriving: no byte came for [server] body_timeout seconds."""

    code = "body_timeout"


class Unauthorized(OrchestraError):
    """A valid API key is required: send it as "Authorization: Bearer <key>"."""

    code = "unauthorized"


class Forbidden(OrchestraError):
    """This API key's scope does not allow this request."""

    code = "forbidden"


class TooManyStreams(OrchestraError):
    """This API key holds as many event streams open as it may; close one first."""

    code = "too_many_streams"


class ConflictError(OrchestraError):
    """The request conflicts with the current state of the resource."""

    code = "conflict"

    def __init__(
        self,
        message: str | None = None,
        task_status: str | None = None,
        fields: Sequence[FieldProblem] = (),
    ) -> None:
        self.task_status = task_status
        self.fields = list(fields)
        super().__init__(message)


class LeaseLost(OrchestraError):
    """The worker no longer holds the lease on this task."""

    code = "lease_lost"


class StorageError(OrchestraError):
    """The database cannot be used right now."""

    code = "storage_unavailable"
    #: A few words for /health ("disk full").
    condition = "unavailable"


class StorageFull(StorageError):
    """The database's disk is full; free space and retry."""

    code = "storage_full"
    condition = "disk full"


class StorageLocked(StorageError):
    """The database is locked by another connection; retry shortly."""

    code = "storage_locked"
    condition = "locked by another connection"


class StorageUnavailable(StorageError):
    """The database cannot be read or written (read-only, or an I/O error)."""

    code = "storage_unavailable"
    condition = "cannot write"


class StorageUnreachable(StorageUnavailable):
    """The database server cannot be reached now (its connection failed, it is restarting or
    shutting down, out of connections): likely to pass in seconds, so a 503 for it carries
    a Retry-After. Clients see it as ``storage_unavailable``."""


class StepError(OrchestraError):
    """A step failed."""

    code = "step_failed"
    #: Whether trying the same task again may succeed (used by retries).
    retryable = False


class RenderError(StepError):
    """A template expression could not be rendered."""

    code = "render_failed"


class StepTimeout(StepError):
    """The step took longer than its timeout."""

    code = "timeout"
    retryable = True


class InvalidOutput(StepError):
    """The output does not match its schema."""

    code = "invalid_output"


class ProviderError(StepError):
    """The model server failed."""

    code = "provider_error"


class ModelNotFound(ProviderError):
    """The model server does not have this model."""

    code = "model_not_found"


class ProviderUnavailable(ProviderError):
    """The model server could not be reached or failed to answer. ``retry_after``: seconds
    the task's retry waits at least (0: the retry policy's own delay)."""

    code = "provider_unavailable"
    retryable = True

    def __init__(self, message: str | None = None, retry_after: float = 0.0) -> None:
        self.retry_after = retry_after
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.retry_after))


class ProviderBusy(ProviderUnavailable):
    """The model server is busy and asked to be called again later (429 or 503 with a
    Retry-After header); ``retry_after`` is the wait it asked for, in seconds, which the
    task's retry waits at least (a retry sooner would be refused again). Clients see it as
    ``provider_unavailable``."""


class ProviderUnreachable(ProviderUnavailable):
    """Nothing answered at all (connection refused, unknown host, runtime not installed): a
    fallback chain moves on to its next entry, and when no entry answers at all it waits for
    one to come back (``[fallback] outage_wait``). Clients see it as ``provider_unavailable``."""
