"""The API's documentation under /schema: Swagger UI from files shipped in the package.

Litestar's own pages load their scripts from public CDNs (unpinned, without integrity checks)
and so do not work without internet; a changed CDN script would run on the service's own
origin, next to the dashboard. Here the only page, at ``/schema`` and ``/schema/swagger``, loads
Swagger UI from ``docs_static/`` (see its ``vendor/VERSIONS.md``), served at ``/schema/static``
by the API itself (the dashboard may be off, or elsewhere), and starts it from a file of ours:
the page has no inline script or style, so its CSP allows the service's own files alone.
The document stays at ``/schema/openapi.json`` and ``/schema/openapi.yaml`` (``.yml``).

Every URL the page writes is relative to the page, so it holds behind a proxy that serves the
service under a prefix (``[server] root_path``, ``X-Forwarded-Prefix``) without trusting
either.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from litestar import Request, Router
from litestar._openapi.plugin import handle_schema_path_not_found
from litestar.datastructures import CacheControlHeader
from litestar.exceptions import NotFoundException
from litestar.openapi.plugins import JsonRenderPlugin, OpenAPIRenderPlugin, YamlRenderPlugin
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, Receive, Scope, Send

from orchestra import __version__
from orchestra.web.headers import SECURITY_HEADERS as DASHBOARD_HEADERS

#: Where the documentation is served (Litestar's default).
SCHEMA_PATH = "/schema"
#: The page's own files: ``start.js`` (ours) and ``vendor/`` (swagger-ui-dist, unchanged).
STATIC = Path(__file__).parent / "docs_static"
#: A year: each URL carries the release (``?v=``), so a new release is fetched anew.
CACHE_SECONDS = 365 * 24 * 3600

#: Sent with every answer under /schema (pages, files, the document), unless it set its own:
#: the dashboard's, whose CSP lets scripts, styles and requests go to the service's own files
#: and API only (Swagger UI's stylesheet draws its icons as ``data:`` images).
SECURITY_HEADERS = tuple(
    (name.encode(), value.encode()) for name, value in DASHBOARD_HEADERS.items()
)

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}: API documentation</title>
<link rel="icon" type="image/png" href="{static}vendor/favicon-32x32.png?v={version}">
<link rel="stylesheet" href="{static}vendor/swagger-ui.css?v={version}">
<link rel="stylesheet" href="{static}vendor/index.css?v={version}">
</head>
<body>
<div id="swagger-ui" data-spec-url="{document}"></div>
<script src="{static}vendor/swagger-ui-bundle.js?v={version}"></script>
<script src="{static}start.js?v={version}"></script>
</body>
</html>
"""


class SwaggerPage(OpenAPIRenderPlugin):
    """Swagger UI at ``/schema/swagger`` (and, as the only page, at ``/schema``).

    Not Litestar's ``SwaggerRenderPlugin``: its page starts Swagger UI from an inline script
    that carries the whole document, takes its favicon from a CDN and adds an OAuth2 redirect
    page this API has no use for.
    """

    def __init__(self) -> None:
        super().__init__(path="/swagger")

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        """The page, its URLs relative to the one the browser asked for."""
        # The path as sent: Litestar drops a trailing slash from ``path``.
        raw = request.scope.get("raw_path") or request.scope["path"].encode()
        here = "schema/" if _at_root(raw.decode("latin-1")) else ""
        page = _PAGE.format(
            title=html.escape(str(openapi_schema["info"]["title"])),
            static=f"{here}static/",
            document=f"{here}openapi.json",
            version=html.escape(__version__),
        )
        return page.encode()


def _at_root(path: str) -> bool:
    """Whether the browser sees the page at ``…/schema`` itself, where relative URLs resolve
    beside it rather than below it (at ``…/schema/`` and ``…/schema/swagger`` they resolve
    below ``…/schema/``)."""
    return path == SCHEMA_PATH


def reached_by(request: Request[Any, Any, Any], document: dict[str, Any]) -> dict[str, Any]:
    """The document with ``servers`` naming the path prefix the request came by
    (``X-Forwarded-Prefix``, else ``[server] root_path``): Swagger UI's Try it out sends its
    requests there, and ``/`` behind a proxy's prefix went outside it (404s)."""
    from orchestra.api.scope import runtime_of
    from orchestra.web.links import Links  # (the dashboard's package: not at import)

    prefix = Links.of(request.scope, runtime_of(request.scope).settings).prefix
    return {**document, "servers": [{"url": prefix or "/"}]}


class JsonDocument(JsonRenderPlugin):
    """``/schema/openapi.json``, its ``servers`` as :func:`reached_by` says."""

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        """The document as JSON."""
        return super().render(request, reached_by(request, openapi_schema))


class YamlDocument(YamlRenderPlugin):
    """``/schema/openapi.yaml`` (and ``.yml``), its ``servers`` as :func:`reached_by` says."""

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        """The document as YAML."""
        return super().render(request, reached_by(request, openapi_schema))


def render_plugins() -> list[OpenAPIRenderPlugin]:
    """The pages under /schema: Swagger UI (also the root page) and the document itself."""
    return [SwaggerPage(), JsonDocument(), YamlDocument()]


def secured(app: ASGIApp) -> ASGIApp:
    """Middleware: ``app``'s answers, with :data:`SECURITY_HEADERS` added to each; an unknown
    path is the API's JSON 404 (Litestar's handler of the other paths under /schema answers
    an HTML page, and errors always have the JSON body)."""

    async def with_headers(scope: Scope, receive: Receive, send: Send) -> None:
        handler: Any = scope["route_handler"].fn
        if handler is handle_schema_path_not_found:
            raise NotFoundException

        async def stamped(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, stamped)

    return with_headers


def docs_router() -> Router:
    """The router Litestar adds the pages of :func:`render_plugins` to (``openapi_router``),
    holding the page's files (``/schema/static/…``). A new one for each app: a router belongs
    to the app it is registered with."""
    static = create_static_files_router(
        path="/static",
        directories=[STATIC],
        name="docs.static",
        send_as_attachment=False,
        cache_control=CacheControlHeader(max_age=CACHE_SECONDS, public=True),
        include_in_schema=False,
    )
    return Router(
        SCHEMA_PATH,
        route_handlers=[static],
        middleware=[secured],
        include_in_schema=False,
        dto=None,  # as Litestar's own router for these pages
        return_dto=None,
    )
