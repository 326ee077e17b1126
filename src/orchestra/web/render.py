"""Rendering pages: the context every page gets, HTML error pages, live-stream helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from litestar import Request
from litestar.exceptions import HTTPException
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import ServerSentEventMessage, Template
from litestar.template import TemplateConfig
from litestar.types import ExceptionHandlersMap

from orchestra import __version__
from orchestra.api.errors import status_of
from orchestra.auth import Caller, allows
from orchestra.errors import OrchestraError
from orchestra.web import views
from orchestra.web.links import Links

#: Where the static files are, inside the package.
STATIC = Path(__file__).parent / "static"
#: A live stream ends after this many seconds; the browser reconnects with Last-Event-ID.
#: (A stopping server does not wait for them: `orchestra serve` gives open connections a few
#: seconds, then closes them.)
STREAM_SECONDS = 300.0
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
    return Links.of(request.scope, request.app.state.runtime.settings)


def page(
    request: Request[Any, Any, Any],
    page_name: str,
    /,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> Template:
    """Render the page ``page_name`` with what every page needs: links, caller, permissions."""
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
    return Template(
        template_name=page_name,
        context={**base, **context},
        status_code=status_code,
        headers={**NO_STORE, **(headers or {})},
    )


def is_htmx(request: Request[Any, Any, Any]) -> bool:
    """Whether htmx sent the request (it then wants a fragment or a boosted page)."""
    return request.headers.get("hx-request") == "true"


def error_page(request: Request[Any, Any, Any], exc: Exception) -> Template:
    """An error as an HTML page (the API's errors are JSON; the dashboard's are pages)."""
    if isinstance(exc, OrchestraError):
        status, message = status_of(exc), exc.message
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, exc.detail
    else:  # pragma: no cover - handled by the app's internal_error
        raise exc
    return page(request, "error.html", status_code=status, status=status, message=message)


HANDLERS: ExceptionHandlersMap = {OrchestraError: error_page, HTTPException: error_page}


async def bounded(
    messages: AsyncIterator[ServerSentEventMessage], seconds: float = STREAM_SECONDS
) -> AsyncIterator[ServerSentEventMessage]:
    """Pass messages on for at most ``seconds``; then end (the browser reconnects)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    iterator = aiter(messages)
    while (left := deadline - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(anext(iterator), left)
        except (StopAsyncIteration, TimeoutError):
            break
        yield message
    await messages.aclose()  # type: ignore[attr-defined]
