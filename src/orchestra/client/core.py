"""The client's one request/response layer, without I/O: what each operation sends (a
:class:`Call`), how an answer is decoded into the server's own structs or turned into an
:class:`~orchestra.client.errors.ApiError`, when a 429 or 503 is tried again, and how a
``text/event-stream`` is read. :class:`~orchestra.client.Client` and
:class:`~orchestra.client.AsyncClient` only send the calls, one with ``httpx.Client``, the
other with ``httpx.AsyncClient``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar, cast
from urllib.parse import quote, unquote

import httpx
import msgspec

from orchestra import __version__
from orchestra.client.errors import (
    ApiError,
    ConnectionFailed,
    InvalidApiKey,
    NotFound,
    UnsendableValue,
    error_class,
)
from orchestra.client.json_body import encode as _encode
from orchestra.client.sse import SseMessage as SseMessage
from orchestra.client.sse import SseReader as SseReader
from orchestra.client.sse import feed_event as feed_event
from orchestra.client.sse import task_event as task_event
from orchestra.domain import TaskStatus
from orchestra.retry_after import retry_after as retry_after
from orchestra.wire.schemas import (
    ErrorBody,
    HealthOut,
    ModelsOut,
    TaskList,
    TaskOut,
    TemplateList,
    TemplateOut,
    ValidationOut,
)
from orchestra.wire.tasks import SubmitTask

T = TypeVar("T")

#: Where the client goes without a URL or ORCHESTRA_URL: the server's default address.
DEFAULT_URL = "http://127.0.0.1:8000"
#: The longest ``wait`` the API takes on GET /api/v1/tasks/{id} (api.tasks.MAX_WAIT).
MAX_WAIT = 60.0
#: Seconds a long poll's read may take beyond the wait it asked for.
WAIT_MARGIN = 30.0
#: The least :func:`wait_margin` gives, whatever the client's timeout.
MIN_WAIT_MARGIN = 5.0
#: Answers tried again (with the same request) after the wait they name.
RETRY_STATUSES = frozenset({429, 503})
#: Seconds an event stream may stay silent: while nothing happens the server sends a
#: heartbeat every 15 s (``orchestra.feed.HEARTBEAT_SECONDS``), so three missed mean that it
#: or the connection is gone (a half-open connection would otherwise be read forever).
STREAM_SILENCE = 45.0
STREAM_TIMEOUT = httpx.Timeout(10.0, read=STREAM_SILENCE)
#: A batch's upload or its results: the server answers the upload once it has read it all,
#: and streams results as it reads them; five silent minutes mean it has stopped.
TRANSFER_TIMEOUT = httpx.Timeout(10.0, read=300.0)


def stream_timeout(silence: float) -> httpx.Timeout:
    """The timeout of an event stream that may stay silent for ``silence`` seconds."""
    return httpx.Timeout(10.0, read=silence)


_JSON = {"Content-Type": "application/json"}
_YAML = {"Content-Type": "application/yaml"}


class RetryPolicy(msgspec.Struct, frozen=True):
    """How 429 (rate limited) and 503 (database locked or unavailable) answers are retried,
    and requests whose connection broke before their answer (those that may be sent twice:
    :attr:`Call.resendable`)."""

    #: Tries in all, the first included (1: never retry).
    attempts: int = 5
    #: The longest wait between tries, in seconds, whatever Retry-After says.
    max_wait: float = 30.0
    #: The first wait when the answer has no Retry-After, doubling on each try.
    backoff: float = 0.5


class Registered(msgspec.Struct, frozen=True):
    """A registered template, and whether this call made a new version (False: the body
    equals the current version)."""

    template: TemplateOut
    created: bool


#: The collections whose items are named in their paths (by :func:`_segment`), and what the
#: service answers for a name that is none of them: what it would for a name with a ``/``.
_NO_SLASH_IN_NAMES = {
    "/api/v1/templates/": ("template_not_found", "no template named {!r}"),
    "/api/v1/schedules/": ("schedule_not_found", "no schedule {!r}"),
}


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One HTTP request of the API and how its successful answer is read."""

    method: str
    path: str
    decode: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    content: bytes | None = None
    #: A body sent as it is read (a dataset): each call gives it from its start.
    body: Callable[[], Iterator[bytes]] | None = None
    #: Sent as UTF-8 (httpx alone sends text headers as ASCII, refusing the rest).
    headers: Mapping[str, str] = field(default_factory=dict)
    #: The statuses that are a success (any other raises).
    ok: frozenset[int] = frozenset({200})
    #: None: the client's own timeout.
    timeout: httpx.Timeout | None = None
    #: Whether sending it twice does what sending it once does (a submit with an idempotency
    #: key); a GET or HEAD always does.
    idempotent: bool = False
    #: The error statuses tried again after their wait (a keyless upload: 429 only).
    retried: frozenset[int] = RETRY_STATUSES

    def __post_init__(self) -> None:
        """Raises :class:`NotFound` at once, as the service would, for a template or schedule
        named with a ``/`` (no name holds one): the service reads ``%2F`` as a slash."""
        for collection, (code, message) in _NO_SLASH_IN_NAMES.items():
            if not self.path.startswith(collection):
                continue
            name = self.path.removeprefix(collection).partition("/")[0]
            if "%2F" in name:
                raise NotFound(404, code, message.format(unquote(name)))

    @property
    def resendable(self) -> bool:
        """Whether it may be sent again after its connection broke before the answer came:
        the service may have done it already."""
        return self.idempotent or self.method in ("GET", "HEAD")

    def request(self, http: httpx.Client | httpx.AsyncClient, content: Any = None) -> httpx.Request:
        """The request, built by the client that sends it (its base URL and headers); a
        streamed body comes as ``content`` (an iterator, sync or async, for the client)."""
        try:
            return http.build_request(
                self.method,
                self.path,
                params=self.params,
                content=self.content if content is None else content,
                headers=[(k.encode(), v.encode()) for k, v in self.headers.items()],
                timeout=self.timeout if self.timeout is not None else http.timeout,
            )
        except UnicodeEncodeError as exc:  # a query value or header with a lone surrogate
            raise UnsendableValue(
                f"{exc.object!r} holds a lone surrogate, which UTF-8 cannot carry"
            ) from None


# -- connecting ------------------------------------------------------------------------------


def base_url(url: str | None, env: Mapping[str, str] | None = None) -> str:
    """``url``, else ORCHESTRA_URL, else :data:`DEFAULT_URL` (without a trailing slash)."""
    env = os.environ if env is None else env
    return (url or env.get("ORCHESTRA_URL") or DEFAULT_URL).rstrip("/")


def auth_headers(api_key: str | None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Authorization header for ``api_key``, else ORCHESTRA_API_KEY (none without).

    Raises:
        InvalidApiKey: the key is not printable ASCII (an HTTP header cannot carry it).
    """
    env = os.environ if env is None else env
    key = api_key or env.get("ORCHESTRA_API_KEY")
    if not key:
        return {}
    bad = next((i for i, c in enumerate(key) if not "!" <= c <= "~"), None)
    if bad is not None:
        source = "the api_key argument" if api_key else "ORCHESTRA_API_KEY"
        raise InvalidApiKey(source, bad + 1, key[bad])
    return {"Authorization": f"Bearer {key}"}


# -- answers ---------------------------------------------------------------------------------


@functools.cache
def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(kind)


def _as(kind: type[T]) -> Callable[[httpx.Response], T]:
    def decode(response: httpx.Response) -> T:
        value: T = _decoder(cast(Any, kind)).decode(response.content)
        return value

    return decode


def _nothing(response: httpx.Response) -> None:
    return None


def answer(call: Call[T], response: httpx.Response) -> T:
    """The decoded answer of a successful call (its body read).

    Raises:
        ApiError: the subclass for the answer's status, carrying its error body; an
            ``http_error`` for a success that is not the API's answer (another server's).
    """
    if response.status_code in call.ok:
        try:
            return call.decode(response)
        except msgspec.ValidationError as exc:  # JSON of another shape: another version's
            status = f"{response.status_code} {response.reason_phrase}".strip()
            raise ApiError(
                response.status_code,
                "http_error",
                f"{status}: an answer this client cannot read ({exc}): a service of another "
                f"version? (the client is {__version__})",
            ) from None
        except msgspec.DecodeError as exc:  # not JSON: a proxy's login page
            raise ApiError(
                response.status_code,
                "http_error",
                f"{_foreign(response)}; not an answer of Orchestra's API ({exc})",
            ) from None
    raise error_of(response)


def error_of(response: httpx.Response) -> ApiError:
    """The exception for an error answer (its body read): the API's error body when it has
    one, else its status and the start of its text (a proxy's page)."""
    status = response.status_code
    cls = error_class(status)
    wait = asked_wait(response.headers)
    try:
        body = _decoder(ErrorBody).decode(response.content)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return cls(status, "http_error", _foreign(response), retry_after=wait)
    return cls(
        status,
        body.code,
        body.message,
        body.fields,
        task_status=body.task_status,
        problems=body.errors,
        retry_after=wait,
    )


def _foreign(response: httpx.Response) -> str:
    """An error answer without Orchestra's body (a proxy's, another server's) in one line:
    its status, and its text when that is short plain text (never a whole HTML page)."""
    said = f"{response.status_code} {response.reason_phrase}".strip()
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    start = response.text.lstrip()[:5].lower()
    if kind in ("text/html", "application/xhtml+xml") or start in ("<!doc", "<html"):
        return f"{said} (an HTML page, not Orchestra's JSON error)"
    first = response.text.strip().split("\n", 1)[0][:200]
    return f"{said}: {first}" if first else said


def asked_wait(headers: httpx.Headers) -> float | None:
    """Seconds an answer asks the client to wait: its Retry-After, else (a rate limiter's 429)
    its RateLimit-Reset, the seconds until the limit's window starts again."""
    asked = retry_after(headers.get("Retry-After"))
    if asked is None:
        asked = retry_after(headers.get("RateLimit-Reset"))
    return asked


#: A connection that broke after the request went out, before its answer: the process that
#: had it stopped (a restart, one of several processes killed), or a kept-alive connection it
#: had closed. (A connection refused is not one: nothing was sent, and nothing answers.)
BROKEN = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


#: A request that went out (in part at least) and whose answer did not come in time.
UNANSWERED = (httpx.ReadTimeout, httpx.WriteTimeout)


def connection_failed(
    url: str, call: Call[Any], error: httpx.TransportError, *, broke_before: bool = False
) -> ConnectionFailed:
    """The error of ``call`` that got no answer: nothing reached, or the request went out
    and its connection broke (``BROKEN``; ``broke_before``: on an earlier try, whose process
    has not come back) or its answer did not come in time (``UNANSWERED``), when a request
    that changes something may have been carried out; or every connection of the client was
    in use (its pool: each open event stream holds one)."""
    reason = str(error) or type(error).__name__
    changes = call.method not in ("GET", "HEAD")
    if isinstance(error, httpx.PoolTimeout) and not (broke_before and changes):
        return ConnectionFailed(url, reason, pool_full=True)
    late = isinstance(error, UNANSWERED)
    broke = changes and (late or broke_before or isinstance(error, BROKEN))
    if broke_before and not isinstance(error, BROKEN):
        reason = f"then, sent again: {reason}"
    return ConnectionFailed(url, reason, broke=broke, timed_out=late)


def resend_delay(
    policy: RetryPolicy,
    tries: int,
    call: Call[Any],
    error: httpx.TransportError,
    *,
    broke_before: bool = False,
) -> float | None:
    """Seconds to wait before sending ``call`` again after its ``tries``-th connection broke
    with ``error`` (at once the first time: another connection, maybe to another process),
    or None when the error stands: not a broken connection, a request that may not be sent
    twice, or no tries left. Once a try's connection broke (``broke_before``), a refused one
    is a restart under way too: waited out as the policy allows."""
    restarting = broke_before and isinstance(error, httpx.ConnectError)
    if not (restarting or isinstance(error, BROKEN)) or not call.resendable:
        return None
    if tries >= policy.attempts:
        return None
    return 0.0 if tries == 1 else min(policy.backoff * 2 ** (tries - 2), policy.max_wait)


def _stopped_before_answering(response: httpx.Response) -> bool:
    """Whether an answer is the service's 503 ``shutting_down``: it stopped while the request
    ran, which may have been carried out (unlike its other 503s and its 429s)."""
    if response.status_code != 503:
        return False
    try:
        said = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        return False
    return isinstance(said, dict) and said.get("code") == "shutting_down"


def retry_delay(
    policy: RetryPolicy, tries: int, call: Call[Any], response: httpx.Response
) -> float | None:
    """Seconds to wait before sending ``call`` again after ``response`` (the ``tries``-th
    answer), or None when the answer stands: a success, another error, or no tries left."""
    if response.status_code in call.ok or response.status_code not in call.retried:
        return None
    if tries >= policy.attempts:
        return None
    if not call.resendable and _stopped_before_answering(response):
        return None  # it may have been carried out, as after a connection that broke
    asked = asked_wait(response.headers)
    wait = policy.backoff * 2 ** (tries - 1) if asked is None else asked
    return min(wait, policy.max_wait)


# -- tasks -----------------------------------------------------------------------------------


class SubmitOptions(TypedDict, total=False):
    """The fields of a submit besides the template and its params, as keywords of
    ``submit`` (:class:`~orchestra.wire.tasks.SubmitTask` says what each means). ``delay`` and
    ``timeout`` take seconds or a ``timedelta``."""

    template_version: int | None
    priority: int
    model: str | None
    run_at: datetime | None
    delay: float | timedelta | None
    max_attempts: int | None
    timeout: float | timedelta | None
    idempotency_key: str | None
    callback_url: str | None
    cache: bool | None


def submission(
    task: SubmitTask | str, params: Mapping[str, Any] | None, options: SubmitOptions
) -> SubmitTask:
    """The submit body: ``task`` itself, or a template's name with params and options (the
    other fields of :class:`~orchestra.wire.tasks.SubmitTask`)."""
    if isinstance(task, SubmitTask):
        if params is not None or options:
            raise TypeError("give a SubmitTask, or a template's name with params and options")
        return task
    fields: dict[str, Any] = {
        name: value.total_seconds() if isinstance(value, timedelta) else value
        for name, value in options.items()
    }
    return SubmitTask(template=task, params=dict(params or {}), **fields)


def submit(task: SubmitTask) -> Call[TaskOut]:
    """POST /api/v1/tasks: 201 a new task; 200 the task its idempotency key made before.

    Raises:
        UnsendableValue: ``run_at`` without a time zone (the service would read it as UTC,
            and Python reads it as local time).
    """
    if isinstance(task.run_at, datetime) and task.run_at.utcoffset() is None:
        raise UnsendableValue(
            f"run_at has no time zone ({task.run_at.isoformat()}): the service would take it "
            "as UTC; give an aware datetime, e.g. datetime.now(UTC) + timedelta(minutes=5), "
            "or datetime.now().astimezone() for local time"
        )
    return Call(
        "POST",
        "/api/v1/tasks",
        _as(TaskOut),
        content=_encode(task),
        headers=_JSON,
        ok=frozenset({200, 201}),
        idempotent=task.idempotency_key is not None,
    )


def get_task(task_id: int, wait: float = 0.0, margin: float = WAIT_MARGIN) -> Call[TaskOut]:
    """GET /api/v1/tasks/{id}, answering once it is finished or ``wait`` seconds passed (its
    answer awaited ``margin`` seconds more; connecting, at most as long, up to 10 s)."""
    wait = max(0.0, min(wait, MAX_WAIT))
    if not wait:
        return Call("GET", f"/api/v1/tasks/{task_id}", _as(TaskOut))
    return Call(
        "GET",
        f"/api/v1/tasks/{task_id}",
        _as(TaskOut),
        params={"wait": wait},
        timeout=httpx.Timeout(min(10.0, margin), read=wait + margin),
    )


def wait_margin(http: httpx.Client | httpx.AsyncClient) -> float:
    """How long past its ``wait`` a long poll's answer is awaited: the client's own timeout
    (up to :data:`WAIT_MARGIN`). A ``wait(timeout=5)`` of a client made with ``timeout=3``
    took 35 s against a server that did not answer."""
    read = http.timeout.read  # (at least 5 s: a service's answer may come a little late)
    return WAIT_MARGIN if read is None else max(min(read, WAIT_MARGIN), MIN_WAIT_MARGIN)


def finished(task: TaskOut) -> bool:
    """Whether a task is in a terminal state (a long poll may stop)."""
    return task.status not in (TaskStatus.QUEUED, TaskStatus.RUNNING)


def cancel(task_id: int) -> Call[TaskOut]:
    return Call("POST", f"/api/v1/tasks/{task_id}/cancel", _as(TaskOut))


def retry(task_id: int) -> Call[TaskOut]:
    return Call("POST", f"/api/v1/tasks/{task_id}/retry", _as(TaskOut))


#: The most rows a page of a list may hold, as the service allows (deliveries: 200).
MOST_PER_PAGE = 500


def page_size(value: int, most: int = MOST_PER_PAGE) -> int:
    """``value`` as a page's ``limit``.

    Raises:
        ValueError: the service would refuse it; said with the caller's word, ``page_size``
            (the service's 400 names ``limit``, which the caller never wrote).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise ValueError(f"page_size must be a whole number from 1 to {most}, not {value!r}")
    return value


def tasks_page(
    status: TaskStatus | str | None, template: str | None, limit: int, cursor: str | None
) -> Call[TaskList]:
    """One page of GET /api/v1/tasks (newest first)."""
    limit = page_size(limit)
    params = {"status": status, "template": template, "limit": limit, "cursor": cursor}
    return Call("GET", "/api/v1/tasks", _as(TaskList), params=_given(params))


def task_events(task_id: int, after: int = 0) -> Call[None]:
    """GET /api/v1/tasks/{id}/events: the task's events from after ``after``; the stream ends
    after ``task.finished``."""
    return Call(
        "GET",
        f"/api/v1/tasks/{task_id}/events",
        _nothing,
        params={"after": after} if after else None,
        timeout=STREAM_TIMEOUT,
    )


def words(given: str | Iterable[str]) -> list[str]:
    """Event types given as one name or several: a plain string is one name (as an
    ``Iterable[str]`` it was split into its characters)."""
    return [given] if isinstance(given, str) else list(given)


def feed(template: str | None, types: str | Iterable[str] | None, after: int | None) -> Call[None]:
    """GET /api/v1/events: every task's events (of ``template``, of ``types``), from after
    ``after`` (0: every event kept; None: from the next one), without end."""
    params: dict[str, Any] = _given({"template": template, "after": after})
    if types:
        params["type"] = words(types)
    return Call("GET", "/api/v1/events", _nothing, params=params, timeout=STREAM_TIMEOUT)


# -- templates -------------------------------------------------------------------------------


def _items(kind: type[TemplateList]) -> Any:
    decode = _as(kind)
    return lambda response: decode(response).items


def list_templates() -> Call[list[TemplateOut]]:
    return Call("GET", "/api/v1/templates", _items(TemplateList))


def get_template(name: str, version: int | None = None) -> Call[TemplateOut]:
    params = None if version is None else {"version": version}
    return Call("GET", f"/api/v1/templates/{_segment(name)}", _as(TemplateOut), params=params)


def template_versions(name: str) -> Call[list[TemplateOut]]:
    return Call("GET", f"/api/v1/templates/{_segment(name)}/versions", _items(TemplateList))


def yaml_text(source: str | bytes | Path) -> bytes:
    """A template's YAML: given as text or bytes, or read from a file."""
    if isinstance(source, Path):
        return source.read_bytes()
    return source.encode() if isinstance(source, str) else source


def validate_template(source: bytes) -> Call[ValidationOut]:
    """POST /api/v1/templates/validate: every problem, with positions (200 either way)."""
    return Call(
        "POST", "/api/v1/templates/validate", _as(ValidationOut), content=source, headers=_YAML
    )


def register_template(source: bytes) -> Call[Registered]:
    """POST /api/v1/templates: 201 a new version, 200 the same as the current one."""
    decode = _as(TemplateOut)
    return Call(
        "POST",
        "/api/v1/templates",
        lambda r: Registered(decode(r), created=r.status_code == 201),
        content=source,
        headers=_YAML,
        ok=frozenset({200, 201}),
    )


def delete_template(name: str) -> Call[None]:
    return Call("DELETE", f"/api/v1/templates/{_segment(name)}", _nothing, ok=frozenset({204}))


def reload_templates() -> Call[list[TemplateOut]]:
    return Call("POST", "/api/v1/templates/reload", _items(TemplateList))


# -- the service -----------------------------------------------------------------------------


def health(check_now: bool = False) -> Call[HealthOut]:
    """GET /health: 200 ok or degraded, 503 down (an answer, not an error)."""
    params = {"check": "now"} if check_now else None
    return Call("GET", "/health", _as(HealthOut), params=params, ok=frozenset({200, 503}))


def models(check_now: bool = False) -> Call[ModelsOut]:
    """GET /api/v1/models."""
    return Call(
        "GET", "/api/v1/models", _as(ModelsOut), params={"check": "now"} if check_now else None
    )


def _given(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def _segment(value: str | int) -> str:
    """A name as one path segment (a ``/`` or ``?`` in it cannot reach another route: a name
    with a ``/`` is answered by :class:`Call`). Its dots are escaped too: httpx took a name
    ``.`` or ``..`` as a step of the path (``..``: ``/api/v1``).

    Raises:
        UnsendableValue: it holds a lone surrogate, which UTF-8 cannot carry.
    """
    try:
        return quote(str(value), safe="").replace(".", "%2E")
    except UnicodeEncodeError:
        raise UnsendableValue(
            f"{value!r} holds a lone surrogate, which UTF-8 cannot carry"
        ) from None
