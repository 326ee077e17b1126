"""The one place errors become HTTP answers. Clients get a JSON body, never a stack trace."""

from __future__ import annotations

import functools
import math
import re
from enum import Enum
from typing import Any, Literal, NamedTuple, get_args, get_origin, get_type_hints

from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    NotFoundException,
    SerializationException,
    ValidationException,
)
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_403_FORBIDDEN,
    HTTP_404_NOT_FOUND,
    HTTP_408_REQUEST_TIMEOUT,
    HTTP_409_CONFLICT,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
    HTTP_507_INSUFFICIENT_STORAGE,
)
from litestar.utils.scope.state import ScopeState
from msgspec import Struct

from orchestra import logs
from orchestra.api.schemas import NUMBER, ErrorBody, FieldOut, ProblemOut
from orchestra.api.scope import runtime_of
from orchestra.api.stream_slots import RETRY_AFTER as STREAM_RETRY_AFTER
from orchestra.batch_lease import CUT_KEPT
from orchestra.batch_model import BatchNotFound
from orchestra.errors import (
    HALF_SURROGATE,
    BodyTimeout,
    ConflictError,
    Forbidden,
    InvalidParams,
    InvalidRequest,
    NotFoundError,
    OrchestraError,
    PayloadTooLarge,
    StorageError,
    StorageFull,
    StorageLocked,
    StorageUnreachable,
    TaskNotFound,
    TemplateError,
    TooManyStreams,
    Unauthorized,
)
from orchestra.schedules import NAME_PATTERN
from orchestra.webhooks import DestinationRefused, MalformedDestination, WebhookNotFound

log = logs.get("orchestra.api")

_STATUS: list[tuple[type[OrchestraError], int]] = [
    (NotFoundError, HTTP_404_NOT_FOUND),
    (InvalidParams, HTTP_422_UNPROCESSABLE_ENTITY),
    (MalformedDestination, HTTP_400_BAD_REQUEST),
    # A well-formed URL that cannot be used (a private address, a host that does not resolve).
    (DestinationRefused, HTTP_422_UNPROCESSABLE_ENTITY),
    (InvalidRequest, HTTP_400_BAD_REQUEST),
    (ConflictError, HTTP_409_CONFLICT),
    (TemplateError, HTTP_422_UNPROCESSABLE_ENTITY),
    (PayloadTooLarge, HTTP_413_REQUEST_ENTITY_TOO_LARGE),
    (BodyTimeout, HTTP_408_REQUEST_TIMEOUT),
    (Unauthorized, HTTP_401_UNAUTHORIZED),
    (Forbidden, HTTP_403_FORBIDDEN),
    (TooManyStreams, HTTP_429_TOO_MANY_REQUESTS),
    (StorageFull, HTTP_507_INSUFFICIENT_STORAGE),
    (StorageError, HTTP_503_SERVICE_UNAVAILABLE),
]
#: Seconds a client is told to wait when another connection holds the database's lock.
LOCKED_RETRY_AFTER = 1
#: Seconds a client is told to wait when the database server cannot be reached (a restart,
#: a network cut): long enough not to add to the load of a database coming back.
UNREACHABLE_RETRY_AFTER = 5


def retry_after(exc: OrchestraError) -> int | None:
    """The ``Retry-After`` seconds of a 503 that is likely to pass by itself (the lock held,
    the database server away); None for every other error (a read-only database or a full
    disk waits for its operator, not a time)."""
    if isinstance(exc, StorageLocked):
        return LOCKED_RETRY_AFTER
    if isinstance(exc, StorageUnreachable):
        return UNREACHABLE_RETRY_AFTER
    if isinstance(exc, TooManyStreams):
        return STREAM_RETRY_AFTER
    return None


def _body(
    status: int,
    code: str,
    message: str,
    fields: list[FieldOut] | None = None,
    task_status: str | None = None,
    errors: list[ProblemOut] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[ErrorBody]:
    body = ErrorBody(
        status=status,
        code=code,
        message=message,
        fields=fields or [],
        task_status=task_status,
        errors=errors,
    )
    return Response(body, status_code=status, headers=headers)


def status_of(exc: OrchestraError) -> int:
    """The HTTP status an error answers with (500 for one the tree does not map)."""
    return next((s for cls, s in _STATUS if isinstance(exc, cls)), HTTP_500_INTERNAL_SERVER_ERROR)


def orchestra_error(request: Request[Any, Any, Any], exc: OrchestraError) -> Response[ErrorBody]:
    """Map the error tree to statuses."""
    status = status_of(exc)
    if status == HTTP_500_INTERNAL_SERVER_ERROR:
        log.error("api.unexpected_error", error=exc.message, code=exc.code)
        return _internal()
    fields = [FieldOut(f.field, f.message) for f in getattr(exc, "fields", [])]
    problems = None
    if isinstance(exc, TemplateError):
        problems = [ProblemOut.of(p) for p in exc.problems]
    headers = None
    if isinstance(exc, Unauthorized):  # RFC 9110: a 401 names the scheme it would accept
        headers = {"WWW-Authenticate": "Bearer"}
    elif (wait := retry_after(exc)) is not None:
        headers = {"Retry-After": str(wait)}
    if isinstance(exc, StorageError):  # a line per outage, not per request refused
        runtime_of(request.scope).refused.failed(exc, code=exc.code)
    task_status = getattr(exc, "task_status", None)
    return _body(status, exc.code, exc.message, fields, task_status, problems, headers)


#: The headers the API reads, by the name of the handler's parameter that Litestar reports:
#: an error names the header as it is sent.
_HEADERS = {
    "last_event_id": "Last-Event-ID",
    "idempotency_header": "Idempotency-Key",
    "idempotency_key": "Idempotency-Key",
}


def _field(extra: dict[str, Any]) -> str:
    key = str(extra.get("key") or "")
    source = extra.get("source")
    if source == "header":
        return _HEADERS.get(key, key)
    if source in ("query", "path", "cookie") or not key:
        return key or "body"
    return key


#: msgspec's words for an object's own problems, which Litestar files under the body ("data").
_OBJECT_PROBLEM = re.compile(
    r"Object (missing required|contains unknown) field `([^`]+)`(?: - at `\$\.?([^`]*)`)?"
)


#: What Litestar's router says of an address no route has (a bare "Not Found").
ROUTING_NOT_FOUND = NotFoundException().detail

#: What a date and time field takes (msgspec says "Invalid RFC3339 encoded datetime"; a date
#: alone is refused, since its time would be a guess).
_DATETIME = "a date and time such as 2030-01-01T09:00:00Z (RFC 3339)"

#: msgspec's words for a value of the wrong JSON type: "Expected `int | null`, got `str`".
_WRONG_TYPE = re.compile(r"Expected `([^`]+)`, got `([^`]+)`")
#: What each of msgspec's type names asks for, and what it calls the value given.
_WANTED = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "object": "an object",
    "array": "an array",
    "null": "null",
    "datetime": _DATETIME,
}
_GIVEN = {**_WANTED, "float": "a number with a fraction", "bool": "a boolean"}


#: msgspec's words for a bound: "Expected `int` <= 500", "Expected `str` of length >= 1".
_BOUND = re.compile(r"Expected `(\w+)`( of length)? (>=|<=|>|<) (\S+)")
_BOUND_WORDS = {">=": "at least", "<=": "at most", ">": "more than", "<": "less than"}
_LENGTH_UNITS = {"str": "characters", "array": "items", "object": "entries", "bytes": "bytes"}
#: msgspec's words for a pattern, and the patterns the API declares in words (ids and
#: cursors; schedule names, which are also the schedules list's cursor).
_PATTERN = re.compile(r"Expected `str` matching regex '(.*)'")
_PATTERN_WORDS = {
    NUMBER: "1 to 18 digits",
    NAME_PATTERN: "a letter followed by up to 99 letters, digits, '_', '.' or '-'",
}


def _bound_in_words(found: re.Match[str]) -> str:
    """ "Expected `int` <= 500" as "must be at most 500"; "Expected `str` of length >= 1" as
    "must not be empty"."""
    kind, length, op, limit = found.groups()
    if length and op == ">=" and limit == "1":
        return "must not be empty"
    number = limit.removesuffix(".0")
    if length:
        unit = _LENGTH_UNITS.get(kind, "long")
        return f"must be {_BOUND_WORDS[op]} {number} {unit}"
    return f"must be {_BOUND_WORDS[op]} {number}"


def _in_words(message: str, field: str = "") -> str:
    """msgspec's "Expected `int | null`, got `str`" as "must be an integer or null, not a
    string", its bounds and the API's number pattern in words too (for ``field``); any other
    message as it is."""
    if message == "Invalid RFC3339 encoded datetime":
        return f"must be {_DATETIME}"
    bound = _BOUND.fullmatch(message)
    if bound is not None:
        return _bound_in_words(bound)
    pattern = _PATTERN.fullmatch(message)
    if pattern is not None and pattern.group(1) in _PATTERN_WORDS:
        words = _PATTERN_WORDS[pattern.group(1)]
        return f"must be a next_cursor value ({words})" if field == "cursor" else f"must be {words}"
    found = _WRONG_TYPE.fullmatch(message)
    if found is None:
        return message
    wanted = [_WANTED.get(name.strip()) for name in found.group(1).split("|")]
    given = _GIVEN.get(found.group(2))
    if given is None or None in wanted:
        return message
    return f"must be {' or '.join(w for w in wanted if w)}, not {given}"


def _problem(extra: dict[str, Any]) -> FieldOut:
    """One problem, naming the field itself: an empty body, a missing or an unknown field are
    reported by Litestar as the field "data" (the handler's parameter)."""
    field = _field(extra)
    message = _in_words(str(extra.get("message", "invalid value")), field)
    if field == "data" and message == "'data'":
        return FieldOut("body", "is empty: send a JSON object")
    found = _OBJECT_PROBLEM.fullmatch(message)
    if found is None:
        return FieldOut("body" if field == "data" else field, message)
    kind, name, within = found.groups()
    base = within or ("" if field == "data" else field)
    where = f"{base}.{name}" if base else name
    return FieldOut(where, "is required" if kind == "missing required" else "unknown field")


#: Litestar's words for a required query parameter or header left out.
_MISSING = re.compile(r"Missing required (?:query|header|cookie) parameter '([^']+)'")


#: msgspec's words for a value that is none of an enum's.
_NOT_IN_ENUM = re.compile(r"Invalid enum value (.*)")


def _choices(request: Request[Any, Any, Any], name: str) -> list[str] | None:
    """The values a parameter of the route's handler takes, or a field of its body
    (``catch_up`` of a schedule), when its type is an enum or a ``Literal``; else None."""
    try:
        parameters = request.route_handler.parsed_fn_signature.parameters
    except AttributeError:
        return None
    if name in parameters:
        return _values(parameters[name].annotation)
    if "data" in parameters:
        return _values(_field_type(parameters["data"].annotation, name))
    return None


def _values(kind: Any) -> list[str] | None:
    """The values an enum or a ``Literal`` allows, found through ``X | None``, ``list[X]``
    and ``Annotated[X, …]``; None for any other type."""
    if isinstance(kind, type) and issubclass(kind, Enum):
        return [str(member.value) for member in kind]
    if get_origin(kind) is Literal:
        return [str(value) for value in get_args(kind)]
    for inner in get_args(kind):
        if inner is not type(None) and (found := _values(inner)) is not None:
            return found
    return None


def _field_type(kind: Any, path: str) -> Any:
    """The type of the field at ``path`` (``retry.backoff``, ``items[2].kind``) of the struct
    ``kind``; None where the path leaves structs."""
    for part in re.sub(r"\[\d+\]", "", path).split("."):
        struct = next(
            (k for k in (kind, *get_args(kind)) if isinstance(k, type) and issubclass(k, Struct)),
            None,
        )
        if struct is None:
            return None
        try:
            kind = get_type_hints(struct).get(part)
        except NameError:  # an annotation that does not resolve here
            return None
    return kind


def _with_choices(request: Request[Any, Any, Any], problem: FieldOut) -> FieldOut:
    """msgspec's "Invalid enum value 'x'", with the values that would do."""
    found = _NOT_IN_ENUM.fullmatch(problem.message)
    choices = None if found is None else _choices(request, problem.field)
    if found is None or not choices:
        return problem
    given = found.group(1)
    reason = f"{given} is not one of {', '.join(choices)}"
    if "," in given:
        reason += " (one value, not a list)"
    return FieldOut(problem.field, reason)


def validation_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[ErrorBody]:
    """A request whose body, path or query does not fit its declared types."""
    extras = exc.extra if isinstance(exc.extra, list) else []
    fields = [
        _as_sent(request, e, _with_choices(request, _problem(e)))
        for e in extras
        if isinstance(e, dict)
    ]
    detail = exc.detail or "invalid request"
    missing = _MISSING.match(detail)
    if not fields and missing:
        fields = [FieldOut(missing.group(1), "is required")]
    if not fields and "JSON" in detail:
        return _bad_body(f"is not valid JSON: {detail}")
    if fields:
        detail = "; ".join(f"{f.field}: {f.message}" for f in fields)
    return _body(HTTP_400_BAD_REQUEST, "invalid_request", detail, fields)


def _as_sent(request: Request[Any, Any, Any], extra: dict[str, Any], problem: FieldOut) -> FieldOut:
    """A query parameter's problem with its value quoted as sent. Every query value is text, so
    msgspec's "…, not a string" says nothing of what was wrong; and NaN passes no bound (it
    said "must be at least 0"), while a number past a float's range said "Number out of
    range"."""
    key = str(extra.get("key") or "")
    raw = request.query_params.get(key) if extra.get("source") == "query" else None
    if not isinstance(raw, str):
        return problem
    shown = repr(raw if len(raw) <= _QUOTED_ID else raw[:_QUOTED_ID] + "…")
    if problem.message.endswith(", not a string"):  # "or null" means nothing in a query
        wanted = problem.message.removesuffix("a string").replace(" or null", "")
        return FieldOut(problem.field, wanted + shown)
    numeric = extra.get("message") == "Number out of range" or _BOUND.fullmatch(
        str(extra.get("message", ""))
    )
    if numeric and _not_finite(raw):
        return FieldOut(problem.field, f"must be a finite number, not {shown}")
    return problem


def _not_finite(raw: str) -> bool:
    """Whether ``raw`` reads as a number that is NaN or infinite."""
    try:
        return not math.isfinite(float(raw))
    except ValueError:
        return False


def _bad_body(reason: str, status: int = HTTP_400_BAD_REQUEST) -> Response[ErrorBody]:
    """A body that could not be read at all: the message and the field ``body`` say why."""
    code = "too_large" if status == HTTP_413_REQUEST_ENTITY_TOO_LARGE else "invalid_request"
    return _body(status, code, f"the request body {reason}", [FieldOut("body", reason)])


def _undecodable(exc: HTTPException, body: bytes | None = None) -> str | None:
    """Why the body could not be decoded, when ``exc`` is Litestar's answer to that (its
    ClientException raised from the decoder's SerializationException); else None. ``body``,
    when known, names a lone surrogate escape, which msgspec reports as a truncated body."""
    if not isinstance(exc.__cause__, SerializationException):
        return None
    detail = str(exc.detail)
    if "UTF-8" in detail:
        return "is not UTF-8 text"
    lone = _lone_surrogate(body) if body and "truncated" in detail else None
    if lone is not None:
        escape, at = lone
        return f"is not valid JSON: the string escape {escape} at byte {at} is {HALF_SURROGATE}"
    acronym = detail[1:2].isupper()  # "JSON is malformed" keeps its capitals
    return f"is not valid JSON: {detail if acronym else detail[:1].lower() + detail[1:]}"


#: A \uXXXX escape of a UTF-16 surrogate, after an even number of backslashes (so itself an
#: escape, not the text "\\ud800").
_SURROGATE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*(\\u[dD][89a-fA-F][0-9a-fA-F]{2})")


def _lone_surrogate(body: bytes) -> tuple[str, int] | None:
    """The first ``\\uXXXX`` escape in ``body`` that is half a surrogate pair without its
    other half, and its byte offset; None when there is none."""
    pending: tuple[str, int] | None = None  # a high half waiting for its low half
    for found in _SURROGATE_ESCAPE.finditer(body):
        escape, at = found.group(1).decode("ascii"), found.start(1)
        low = escape[3].lower() in "cdef"
        if pending is not None:
            if low and at == pending[1] + 6:
                pending = None
                continue
            return pending
        if low:
            return escape, at
        pending = (escape, at)
    return pending


def _body_of(request: Request[Any, Any, Any]) -> bytes | None:
    """The request's body, when it was read already (a failed decode read it)."""
    body = ScopeState.from_scope(request.scope).body
    return body if isinstance(body, bytes) else None


#: What each integer path parameter is the id of: the error a missing one raises and its
#: noun. Every ``{name:int}`` parameter of an API route belongs here: a route with one that is
#: not keeps the generic 404 (test_api_lows walks every such route of the OpenAPI document).
_ID_PARAMS: dict[str, tuple[type[NotFoundError], str]] = {
    "task_id": (TaskNotFound, "task"),
    "batch_id": (BatchNotFound, "batch"),
    "webhook_id": (WebhookNotFound, "webhook"),
    # A delivery is found within its webhook: a missing one is the webhook's 404.
    "delivery_id": (WebhookNotFound, "delivery"),
}
_INT_PARAM = re.compile(r"\{(\w+):int\}")
_INTEGER = re.compile(r"[+-]?[0-9]+")
#: The longest id a message quotes.
_QUOTED_ID = 40


class _IdPath(NamedTuple):
    """An API route with integer ids, as a pattern whose groups are its id segments."""

    pattern: re.Pattern[str]
    error: type[NotFoundError]
    nouns: tuple[str, ...]


@functools.lru_cache(maxsize=16)
def _id_paths(paths: frozenset[str]) -> tuple[_IdPath, ...]:
    """The API routes among ``paths`` with integer ids (``/api/v1/tasks/{task_id:int}``),
    each matching any segment where an id goes, so that an id that is not a number (which
    matches no route) is answered as a number no resource has."""
    found = []
    for path in sorted(paths):
        names = _INT_PARAM.findall(path)
        if not path.startswith("/api/") or not names or not set(names) <= _ID_PARAMS.keys():
            continue
        literal = _INT_PARAM.split(path)[::2]  # the text around the parameters
        regex = "([^/]+)".join(re.escape(part) for part in literal)
        errors = [_ID_PARAMS[name] for name in names]
        found.append(_IdPath(re.compile(regex + "/?"), errors[-1][0], tuple(n for _, n in errors)))
    return tuple(found)


def _not_a_number(request: Request[Any, Any, Any]) -> NotFoundError | None:
    """The resource's own 404 for a path whose id is not an integer (``/api/v1/tasks/abc``:
    no task 'abc'); None for any other path."""
    path, root = request.scope["path"], request.scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root) :]
    for pattern, error, nouns in _id_paths(frozenset(r.path for r in request.app.routes)):
        found = pattern.fullmatch(path)
        if found is None:
            continue
        segments = found.groups()
        for index, (segment, noun) in enumerate(zip(segments, nouns, strict=True)):
            if _INTEGER.fullmatch(segment):
                continue
            shown = segment if len(segment) <= _QUOTED_ID else segment[:_QUOTED_ID] + "…"
            # A delivery is named within its webhook: "webhook 1 has no delivery 'x'".
            owner = f"{nouns[index - 1]} {segments[index - 1]} has " if index else ""
            return error(f"{owner}no {noun} {shown!r} (the {noun} id is an integer)")
    return None


def http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    """Litestar's own errors (404 route, 405 method, 413 body size …) in our shape, with
    their headers (a 405's Allow, a 429's Retry-After). A path whose id is not a number
    (``/api/v1/tasks/abc``) answers as a number no resource has: ``task_not_found``."""
    if exc.status_code == HTTP_404_NOT_FOUND and (missing := _not_a_number(request)):
        return orchestra_error(request, missing)
    code = {
        400: "invalid_request",
        404: "not_found",
        401: "unauthorized",
        403: "forbidden",
        405: "method_not_allowed",
        413: "too_large",
        429: "rate_limited",
    }.get(exc.status_code, "http_error")
    undecodable = _undecodable(exc, _body_of(request))
    if undecodable is not None:
        return _bad_body(undecodable)
    if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
        limit = runtime_of(request.scope).settings.limits.max_body_bytes
        return _bad_body(f"is over [limits] max_body_bytes ({limit:,} bytes)", exc.status_code)
    message = str(exc.detail)
    if exc.status_code == HTTP_404_NOT_FOUND and message == ROUTING_NOT_FOUND:  # say where
        message = f"there is nothing at {request.url.path} ({_where_things_are(request)})"
    return _body(exc.status_code, code, message, headers=http_headers(exc))


def _where_things_are(request: Request[Any, Any, Any]) -> str:
    """Where the API's paths are listed, and the dashboard when this service has one (a
    browser pointed at the service's address found only the first)."""
    settings = runtime_of(request.scope).settings
    api = "the API's paths: /schema"
    if not (settings.ui.enabled and settings.server.api):
        return api
    dashboard = settings.server.root_path.rstrip("/") + "/" + settings.ui.path.strip("/") + "/"
    return f"the dashboard: {dashboard}; {api}"


def http_headers(exc: HTTPException) -> dict[str, str]:
    """The headers a Litestar error answers with: its own (a 405's Allow, the rate limiter's
    RateLimit-*), and a 429's ``Retry-After``."""
    headers = dict(exc.headers or {})
    if exc.status_code == 429:
        # Litestar's limiter tells the wait in RateLimit-Reset alone; Retry-After is what
        # every HTTP client reads.
        lower = {name.lower(): value for name, value in headers.items()}
        if "retry-after" not in lower and "ratelimit-reset" in lower:
            headers["Retry-After"] = str(max(1, int(float(lower["ratelimit-reset"]))))
    return headers


#: Where a RecursionError that is not the request body's comes from: reading or rendering
#: a template (a template's problems are TemplateErrors, so one of these is a bug).
_NOT_THE_BODY = ("orchestra/templating/", "orchestra/catalog.py", "/jinja2/", "/ruamel/")


def from_templates(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while reading or rendering a template, not a body."""
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if any(part in filename for part in _NOT_THE_BODY):
            return True
        tb = tb.tb_next
    return False


def too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[ErrorBody]:
    """A body nested so deeply that decoding it ran out of stack (msgspec raises
    RecursionError past about a thousand levels). One raised by a template's YAML or Jinja
    is not the body's: it is an internal error, logged with its traceback."""
    if from_templates(exc):
        return internal_error(request, exc)
    return _bad_body("nests too deeply")


def not_text(_: Request[Any, Any, Any], exc: UnicodeDecodeError) -> Response[ErrorBody]:
    """A body (or a string in it) that is not UTF-8."""
    return _bad_body("is not UTF-8 text")


def internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """A bug: log it with its traceback; the client learns only that it happened."""
    log.exception("api.internal_error", path=request.url.path, method=request.method)
    return _internal()


def _internal() -> Response[ErrorBody]:
    """A 500: "internal error", and what an upload cut by it left, when one was."""
    kept = CUT_KEPT.get()
    message = "internal error" if kept is None else f"internal error; {kept}"
    return _body(HTTP_500_INTERNAL_SERVER_ERROR, "internal", message)


HANDLERS: dict[Any, Any] = {
    ValidationException: validation_error,
    OrchestraError: orchestra_error,
    HTTPException: http_error,
    RecursionError: too_deep,
    UnicodeDecodeError: not_text,
    Exception: internal_error,
}
