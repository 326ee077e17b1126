"""Rendering pages: the context every page gets, HTML error pages, live-stream helpers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from litestar import Litestar, Request
from litestar.datastructures import Cookie
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    TooManyRequestsException,
    ValidationException,
)
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Response, ServerSentEventMessage, Template
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.template import TemplateConfig
from litestar.types import ExceptionHandlersMap, HTTPScope, Receive, Scope, Send

from orchestra import __version__, logs
from orchestra.api import errors as api_errors
from orchestra.api.errors import (
    ROUTING_NOT_FOUND,
    from_templates,
    http_headers,
    retry_after,
    status_of,
)
from orchestra.api.scope import runtime_of
from orchestra.auth import Caller, allows
from orchestra.errors import OrchestraError, StorageError
from orchestra.web import views
from orchestra.web.headers import StampedPage
from orchestra.web.links import Links

log = logs.get("orchestra.ui")

#: Where the static files are, inside the package.
STATIC = Path(__file__).parent / "static"
#: A live stream ends after this many seconds; the browser reconnects with Last-Event-ID.
#: (A stopping server does not wait for them: `orchestra serve` gives open connections a few
#: seconds, then closes them.)
STREAM_SECONDS = 300.0
#: A live stream asks this often (at most) whether its caller may still follow it.
STILL_EVERY = 2.0
#: The events that have a page fetch a part of itself: a stream asks before each (they come
#: at most once a second, or a few times in a task's life), since a part fetched after the
#: session ended is refused (a 401 in the browser's console) where the stream should have
#: ended and sent the page to log in.
FETCHING = frozenset({"changed", "refresh"})
#: Pages are never cached: they show live state (and who is logged in).
NO_STORE = {"cache-control": "no-store"}


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    """Jinja, reading the pages from package data, escaping everything by default."""
    env = Environment(
        loader=PackageLoader("orchestra.web", "pages"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(views.FILTERS)
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(env))


def caller_of(request: Request[Any, Any, Any]) -> Caller | None:
    """Who is logged in (None on the open pages: login, static files)."""
    user = request.scope.get("user")
    return user if isinstance(user, Caller) else None


def may(request: Request[Any, Any, Any], scope: str) -> bool:
    """Whether the caller's scope allows ``scope`` (read, submit, admin)."""
    caller = caller_of(request)
    return caller is not None and allows(caller.scope, scope)  # type: ignore[arg-type]


def links(request: Request[Any, Any, Any]) -> Links:
    """The dashboard's URLs for this request."""
    return Links.of(request.scope, runtime_of(request.scope).settings)


def page(
    request: Request[Any, Any, Any],
    page_name: str,
    /,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    cookies: list[Cookie] | None = None,
    started: float | None = None,
    **context: Any,
) -> Template:
    """Render the page ``page_name`` with what every page needs: links, caller, permissions.

    A page answering a POST (a form's problems, a new key's token) leaves the address bar as
    it was: htmx would record the POST's URL, which a reload or Back then asks for with GET.
    ``started`` (a :func:`time.perf_counter` time) is for an answer the dashboard's gate does
    not see: the page then carries the dashboard's headers itself, timed from then.
    """
    caller = caller_of(request)
    base = {
        "ui": links(request),
        "caller": caller,
        "can_submit": may(request, "submit"),
        "can_admin": may(request, "admin"),
        "version": __version__,
        "section": "",
        "statuses": views.STATUS_WORDS,
    }
    kept = {} if request.method in ("GET", "HEAD") else {"hx-push-url": "false"}
    kind = Template if started is None else partial(StampedPage, started=started)
    return kind(
        template_name=page_name,
        context={**base, **context},
        status_code=status_code,
        headers={**NO_STORE, **kept, **(headers or {})},
        cookies=cookies,
    )


def error_page(
    request: Request[Any, Any, Any], exc: Exception, *, started: float | None = None
) -> Template:
    """An error as an HTML page (the API's errors are JSON; the dashboard's are pages), with
    the status, headers and logging the API gives the same error. (``started``: as for
    :func:`page`.)"""
    status, message, headers = described(exc)
    if isinstance(exc, NotFoundException) and message == ROUTING_NOT_FOUND:
        message = f"there is no page at {request.url.path}"  # an address no route has
    if isinstance(exc, StorageError):
        log.warning("ui.storage_failed", code=exc.code, error=exc.message)
    elif status >= HTTP_500_INTERNAL_SERVER_ERROR:
        log.exception("ui.internal_error", path=request.url.path, method=request.method)
    return page(
        request,
        "error.html",
        status_code=status,
        headers=headers,
        started=started,
        status=status,
        message=message,
    )


async def refused_page(
    app: Litestar, scope: Scope, receive: Receive, send: Send, exc: Exception
) -> None:
    """Answer ``exc`` as the dashboard's error page, with the dashboard's headers, for a
    request refused before ``app`` routes it (a NUL character in its address)."""
    scope = cast(HTTPScope, {**scope, "app": app, "litestar_app": app})
    request: Request[Any, Any, Any] = Request(scope, receive)
    page = error_page(request, exc, started=time.perf_counter())
    await page.to_asgi_response(None, request)(scope, receive, send)


def described(exc: Exception) -> tuple[int, str, dict[str, str]]:
    """The status, message and headers the API answers ``exc`` with (a bug: 500, "internal
    error"; a RecursionError from a template, the dashboard's pages' own included, is one)."""
    headers: dict[str, str] = {}
    if isinstance(exc, OrchestraError):
        status, message = status_of(exc), exc.message
        if (wait := retry_after(exc)) is not None:
            headers["retry-after"] = str(wait)
    elif isinstance(exc, ValidationException):
        status = exc.status_code
        problems = [str(e.get("message", "")) for e in exc.extra or [] if isinstance(e, dict)]
        message = "; ".join(p for p in problems if p) or "a value in the request is not valid"
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, exc.detail
        headers.update(http_headers(exc))
    elif isinstance(exc, UnicodeDecodeError) or (
        isinstance(exc, RecursionError) and not from_templates(exc)
    ):
        status, message = 400, "the request is not valid"
    else:
        status = HTTP_500_INTERNAL_SERVER_ERROR
    if status >= HTTP_500_INTERNAL_SERVER_ERROR and not isinstance(exc, StorageError):
        message = "internal error"
    return status, message, headers


#: Every kind of error the app's own handlers answer as JSON, answered as a page here (a
#: handler is picked by the error's class, nearest first, across the app and this router).
HANDLERS: ExceptionHandlersMap = {
    kind: error_page for kind in api_errors.HANDLERS if isinstance(kind, type)
}


def _dashboard_or_api(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """A 404 or 405 that routing raised (no handler matched, so no router's handlers apply),
    or a 429 from the rate limiter: an HTML page under the dashboard's path, the API's JSON
    elsewhere. The dashboard's gate never saw the request, so the page carries the
    dashboard's headers itself."""
    started = time.perf_counter()
    settings = runtime_of(request.scope).settings
    base = settings.ui.path.rstrip("/")
    path = request.scope["path"]
    if settings.ui.enabled and (path == base or path.startswith(base + "/")):
        return error_page(request, exc, started=started)
    return api_errors.http_error(request, exc)


#: For the app: routing's own 404 and 405, and the rate limiter's 429 (its middleware runs
#: before the dashboard's gate), under the dashboard's path as its HTML pages.
ROUTING_HANDLERS: ExceptionHandlersMap = {
    NotFoundException: _dashboard_or_api,
    MethodNotAllowedException: _dashboard_or_api,
    TooManyRequestsException: _dashboard_or_api,
}


async def bounded(
    messages: AsyncIterator[ServerSentEventMessage],
    seconds: float = STREAM_SECONDS,
    still: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[ServerSentEventMessage]:
    """Pass messages on for at most ``seconds``; then end (the browser reconnects). With
    ``still``, asked before a message at most every :data:`STILL_EVERY` seconds, and before
    every one of the :data:`FETCHING` events: False ends the stream (its session ended: a
    logout, its key revoked)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    look_at = loop.time() + STILL_EVERY
    iterator = aiter(messages)
    while (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(anext(iterator), left)
        except (StopAsyncIteration, TimeoutError):
            break
        if still is not None and (loop.time() >= look_at or message.event in FETCHING):
            if not await still():
                break
            look_at = loop.time() + STILL_EVERY
        yield message
    await messages.aclose()  # type: ignore[attr-defined]
