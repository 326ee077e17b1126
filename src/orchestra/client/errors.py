"""What the client raises: one branch of :mod:`orchestra.errors`' tree.

::

    OrchestraError
    └── ClientError                 a call to an Orchestra service failed
        ├── ConnectionFailed        nothing answered (refused, unknown host, timed out)
        ├── ClientClosed            the client was closed before or during the call
        ├── InvalidApiKey           the API key given cannot be sent (not printable ASCII)
        ├── UnsendableValue         a value JSON cannot carry (NaN, bytes, a lone surrogate)
        └── ApiError                the service answered 4xx or 5xx (status, code, message, fields)
            ├── BadRequest          400 invalid_request: a field has the wrong type or shape
            ├── AuthenticationFailed 401 unauthorized: no key, or not a valid one
            ├── PermissionDenied    403 forbidden: the key's scope is too low
            ├── NotFound            404 not_found, task_not_found, template_not_found …
            ├── Conflict            409 conflict: a finished task cancelled, a name taken …
            ├── TooLarge            413 too_large
            ├── Unprocessable       422 invalid_params, invalid_template (``problems``)
            ├── RateLimited         429 rate_limited (after the client's retries)
            ├── Unavailable         503 storage_locked, storage_unavailable; 507 storage_full
            └── ServerError         any other status (500 internal)

Each carries the API's error body: ``status``, ``code`` (the API's word, e.g.
``task_not_found``), ``message``, ``fields`` (each a field and what is wrong with it; ``field``
is the first one's name), ``task_status`` on a 409 about a task, ``problems`` (positions in a
template's YAML) on a 422 about a template.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orchestra.errors import OrchestraError

if TYPE_CHECKING:
    from orchestra.wire.schemas import FieldOut, ProblemOut


class ClientError(OrchestraError):
    """A call to the Orchestra service failed."""

    code = "client_error"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with what it carries, rebuilt without its constructor (whose arguments
        are not its ``args``): a process pool sends a worker's exception back so, and one
        that could not be rebuilt broke the pool or hung it."""
        return (_rebuilt, (type(self), self.args, dict(vars(self))))


def _rebuilt(cls: type[ClientError], args: tuple[Any, ...], state: dict[str, Any]) -> ClientError:
    """A pickled :class:`ClientError` again: its class, ``args`` and attributes."""
    error = cls.__new__(cls)
    error.args = args
    vars(error).update(state)
    return error


class ClientClosed(ClientError):
    """The client was closed: make a new one (or use it in a with block)."""

    code = "client_closed"


class UnsendableValue(ClientError, ValueError):
    """A value of the request is one JSON cannot carry: a NaN or infinite float, bytes, or a
    string holding a lone surrogate. Raised before anything is sent; the message names the
    value's place (``params.scores[2] is nan, which JSON cannot carry``)."""

    code = "unsendable_value"


class InvalidApiKey(ClientError, ValueError):
    """The API key given (or in ORCHESTRA_API_KEY) cannot be sent in an HTTP header: it holds
    a space, a line break or a character that is not printable ASCII, as no Orchestra key
    (``orc_`` and letters, digits, ``-`` and ``_``) does. Raised when the client is made;
    the key itself is never in the message."""

    code = "invalid_api_key"

    def __init__(self, source: str, position: int, found: str = "") -> None:
        self.source = source
        #: Where (1-based) the first character that cannot be sent is.
        self.position = position
        what = {
            " ": "a space",
            "\t": "a tab",
            "\n": "a line break",
            "\r": "a line break",
        }.get(found, "a character that is not printable ASCII")
        hint = " (give the key alone, without 'Bearer ')" if found == " " else ""
        super().__init__(
            f"invalid API key in {source}: {what} at character {position}{hint}; an "
            "Orchestra key looks like orc_ followed by letters, digits, - and _"
        )


class ConnectionFailed(ClientError):
    """The Orchestra service could not be reached."""

    code = "connection_failed"

    def __init__(
        self,
        url: str,
        reason: str,
        *,
        broke: bool = False,
        timed_out: bool = False,
        cut: bool = False,
        pool_full: bool = False,
    ) -> None:
        self.url = url
        self.reason = reason
        #: A request that changes something went out, and its connection broke or its answer
        #: did not come in time: it may have been carried out (a batch made, a task queued),
        #: which a key of idempotency makes safe to send again.
        self.broke = broke
        #: The server was reached, and did not answer within the client's timeout.
        self.timed_out = timed_out
        #: The answer began and was cut off while it was read (a download, an event stream).
        self.cut = cut
        #: Nothing was sent: every connection of the client's pool stayed in use.
        self.pool_full = pool_full
        if pool_full:
            message = (
                f"every connection of this client to {url} is in use ({reason}; its pool's "
                "limit, 100 unless its transport says, and each open event stream holds "
                "one): give the client a transport with more (docs/client.md), or follow "
                "streams with another client"
            )
        elif cut:
            message = f"the answer from the server at {url} was cut off ({reason})"
        elif timed_out:
            message = f"no answer in time from the server at {url} ({reason})"
        elif broke:
            message = f"the connection to the server at {url} broke before its answer ({reason})"
        else:
            message = f"cannot reach the server at {url}: {reason}"
        super().__init__(message + (": the request may have been carried out" if broke else ""))


class ApiError(ClientError):
    """The Orchestra service answered with an error."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: list[FieldOut] | None = None,
        *,
        task_status: str | None = None,
        problems: list[ProblemOut] | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.fields = list(fields or [])
        self.task_status = task_status
        self.problems = list(problems or [])
        #: Seconds the service asked to wait (429, 503), when it said.
        self.retry_after = retry_after
        super().__init__(message)

    @property
    def field(self) -> str | None:
        """The first bad field's name (``params.text``, ``cron``, ``url`` …), if any."""
        return self.fields[0].field if self.fields else None

    def __str__(self) -> str:
        """The message, and each bad field with why (when the message does not say it): what
        a log line of ``str(exc)`` needs."""
        told = [
            f"{f.field}: {f.message}"
            for f in self.fields
            if not (f.field in self.message and f.message in self.message)
        ]
        return "; ".join([self.message, *told])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, {self.message!r})"


class BadRequest(ApiError):
    """The request is invalid."""


class AuthenticationFailed(ApiError):
    """A valid API key is required (set ORCHESTRA_API_KEY)."""


class PermissionDenied(ApiError):
    """This API key's scope does not allow this request."""


class NotFound(ApiError):
    """The resource does not exist."""


class Conflict(ApiError):
    """The request conflicts with the current state of the resource."""


class TooLarge(ApiError):
    """The request is larger than the service accepts."""


class Unprocessable(ApiError):
    """The request's content does not fit (task parameters, a template)."""


class RateLimited(ApiError):
    """Too many requests: the service's rate limit for this key was reached."""


class Unavailable(ApiError):
    """The service cannot serve this now (its database is locked, full or unreachable)."""


class ServerError(ApiError):
    """The service failed to answer."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    422: Unprocessable,
    429: RateLimited,
    503: Unavailable,
    507: Unavailable,
}


def error_class(status: int) -> type[ApiError]:
    """The exception an error answer of this status raises."""
    return _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
