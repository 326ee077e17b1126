"""The app factory: settings in, an ASGI app out. Nothing here reads the environment.

A service is two parts: its :class:`Runtime` (database, workers, providers: opened and closed
by the ASGI lifespan) and the Litestar app that answers its HTTP requests. The Litestar app
depends on a few settings only (:class:`Surface`), and building one costs about 0.2 s of CPU
(Litestar inspects every handler's signature), so a process builds one per surface and every
service of that surface shares it: each request carries its own service's runtime in its
scope (:mod:`orchestra.api.scope`). A process that serves one service builds one; the test
suite, which starts some 1,500 services, builds a handful per process.
"""

from __future__ import annotations

import asyncio
import functools
import time
import traceback
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import msgspec
from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.datastructures import MutableScopeHeaders
from litestar.di import NamedDependency, Provide
from litestar.exceptions import NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.plugins import PluginProtocol
from litestar.plugins.core import MsgspecDIPlugin
from litestar.routes import HTTPRoute
from litestar.types import Scope

from orchestra import __version__, logs, metrics
from orchestra.api import auth, docs_ui
from orchestra.api.batches import BatchController
from orchestra.api.errors import HANDLERS
from orchestra.api.events import EventController
from orchestra.api.health import health, health_head, models
from orchestra.api.metrics import open_paths, scrape
from orchestra.api.openapi import refine_when_built
from orchestra.api.query_rules import strict_query
from orchestra.api.runtime import Runtime, ShowKey
from orchestra.api.schedules import ScheduleController
from orchestra.api.schedules import provide as _schedules
from orchestra.api.schemas import ErrorBody, FieldOut
from orchestra.api.scope import RUNTIME, runtime_of
from orchestra.api.slow_body import BodyClock
from orchestra.api.tasks import TaskController
from orchestra.api.templates import TemplateController
from orchestra.api.webhooks import WebhookController
from orchestra.batch_lease import CUT_NOTE
from orchestra.catalog import TemplateCatalog
from orchestra.config import AuthSettings, Settings
from orchestra.errors import FieldProblem, InvalidRequest
from orchestra.tasks import TaskService
from orchestra.templating.registry import TemplateRegistry
from orchestra.web.render import ROUTING_HANDLERS, refused_page, template_config
from orchestra.web.routes import dashboard, own_paths, ui_path

log = logs.get("orchestra.api")


def _tasks(runtime: NamedDependency[Runtime]) -> TaskService:
    return runtime.tasks


def _catalog(runtime: NamedDependency[Runtime]) -> TemplateCatalog:
    return runtime.catalog


async def _allow_every_method(message: Any, scope: Any) -> None:
    """OPTIONS answers list every method of the path in ``Allow``.

    Litestar 2 answers OPTIONS with the methods of the first handler registered on a path
    only (litestar-org/litestar#4169, fixed in Litestar 3), e.g. ``GET, OPTIONS`` where POST
    works too. The route itself knows them all.
    """
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS":
        return
    template = scope.get("path_template")
    for route in scope["app"].routes:
        if isinstance(route, HTTPRoute) and route.path_format == template:
            MutableScopeHeaders(message)["allow"] = ", ".join(sorted(route.methods))
            return


def _runtime(scope: Scope) -> Runtime:
    """The ``runtime`` dependency: the runtime of the service the request reached. (Not
    ``runtime_of`` itself: Litestar resolves a dependency's annotations at registration, and
    that module names ``Runtime`` for type checkers only.)"""
    return runtime_of(scope)


class Surface(msgspec.Struct, frozen=True):
    """The settings the Litestar app is built from, and nothing else: services whose
    surfaces are equal can share one (see the module's docstring)."""

    #: ``[server] api``: false, /health and /metrics alone (:func:`_workers_only`).
    api: bool
    metrics: bool
    #: Where the dashboard is served; None: no dashboard.
    ui_path: str | None
    #: Path patterns the API's key check leaves out (the dashboard's, a public /metrics).
    unchecked: tuple[str, ...]
    auth: AuthSettings
    cors_origins: tuple[str, ...]
    max_body_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> Surface:
        """The surface ``settings`` ask for, checked.

        Raises:
            ConfigError: ``[ui] path`` or ``[server] root_path`` is not a plain path.
        """
        dashboard_path = ui_path(settings) if settings.server.api and settings.ui.enabled else None
        unchecked = open_paths(settings) + (own_paths(settings) if settings.server.api else ())
        return cls(
            api=settings.server.api,
            metrics=settings.metrics.enabled,
            ui_path=dashboard_path,
            unchecked=unchecked,
            auth=settings.auth,
            cors_origins=tuple(settings.cors.allow_origins),
            max_body_bytes=settings.limits.max_body_bytes,
        )


class ServiceApp:
    """One service as an ASGI app: the ASGI lifespan opens and closes its :attr:`runtime`,
    and each request goes to the Litestar app of its surface, carrying the runtime in its
    scope."""

    def __init__(self, runtime: Runtime, http: Litestar) -> None:
        #: What the lifespan opened: the service's database, workers and providers.
        self.runtime = runtime
        #: The Litestar app that answers the requests (shared with services of the same
        #: surface in this process).
        self.http = http

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        scope.setdefault("state", {})[RUNTIME] = self.runtime
        if scope["type"] != "http":
            await self.http(scope, receive, send)
            return
        asked = scope
        clock = BodyClock(scope, receive, send, self.runtime.settings.server.body_timeout)
        receive, send = clock.receive, clock.send
        if scope["method"] == "HEAD" and scope["path"] not in self._heads:
            # HTTP's HEAD is GET without the body: Litestar routes HEAD to HEAD handlers only
            headless = _Headless(send, receive)
            scope, send, receive = {**scope, "method": "GET"}, headless.send, headless.receive
        if self.runtime.settings.metrics.enabled:
            send = _measured(asked["method"], scope, send)
        answer = _Answer(send)
        nul = _nul_in(scope)
        if nul is not None:
            if self.runtime.settings.server.api and self._under_ui(scope["path"]):
                # The dashboard's HTML page, with its headers
                await refused_page(self.http, scope, receive, answer, _nul_refusal(nul))
            else:
                await _refuse_nul(nul, answer)
            return
        try:
            await self.http(scope, receive, answer)
        except asyncio.CancelledError:
            if not self.runtime.stopping:
                raise
            await _cut_at_stop(scope, answer)

    def _under_ui(self, path: str) -> bool:
        """Whether ``path`` is under the dashboard's path (with the dashboard enabled)."""
        settings = self.runtime.settings
        base = settings.ui.path.rstrip("/")
        return settings.ui.enabled and (path == base or path.startswith(base + "/"))

    @functools.cached_property
    def _heads(self) -> frozenset[str]:
        """The paths with a HEAD handler of their own (/health's). Any other HEAD request
        is answered as its GET without the body (:class:`_Headless`), as HTTP says: every
        API resource, the OpenAPI document, the dashboard's pages, /metrics."""
        routes = self.http.routes
        return frozenset(r.path for r in routes if isinstance(r, HTTPRoute) and "HEAD" in r.methods)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        """The ASGI lifespan protocol around :meth:`Runtime.lifespan`, as Litestar speaks it:
        a failure is reported to the server (``lifespan.startup.failed``) and raised. The
        shared Litestar app's own lifespan is not entered: it has no hooks or managers."""
        await receive()  # lifespan.startup
        started = False
        try:
            async with self.runtime.lifespan(self):
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except BaseException:
            stage = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{stage}.failed", "message": traceback.format_exc()})
            raise
        await send({"type": "lifespan.shutdown.complete"})


def _cut_body(message: str) -> bytes:
    """The 503 of a request the stop's HTTP drain ended before it was answered."""
    return msgspec.json.encode(
        ErrorBody(status=503, code="shutting_down", message=message, fields=[])
    )


#: The answer to a request the stop's HTTP drain ended before it was answered.
_CUT = _cut_body(
    "the service stopped before it answered this request: send it again (with an "
    "Idempotency-Key if it must not be carried out twice)"
)


#: The answers' headers a browser page of an allowed origin may read (the rest are hidden
#: from its script): where a made resource is, and how long to wait before asking again.
EXPOSED = (
    "Location",
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "Server-Timing",
)


def _nul_in(scope: Any) -> str | None:
    """Where a request holds a NUL character (``path``, ``query``), or None. No name or value
    here holds one (PostgreSQL's text cannot: such a request was a 500 there)."""
    if "\x00" in scope["path"]:
        return "path"
    query = scope.get("query_string", b"")
    if b"%00" in query or b"\x00" in query:
        # The parameter that holds it, as any other refusal names its field.
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if "\x00" in name + value:
                return name if name and "\x00" not in name else "query"
        return "query"
    return None


#: Why a request holding a NUL character is refused.
_NUL_REASON = "holds a NUL character (%00), which no name or value here may hold"


def _nul_refusal(where: str) -> InvalidRequest:
    """The refusal of a request holding a NUL character at ``where`` (:func:`_nul_in`)."""
    return InvalidRequest(f"{where}: {_NUL_REASON}", [FieldProblem(where, _NUL_REASON)])


async def _refuse_nul(where: str, send: Any) -> None:
    """Answer a request holding a NUL character (see :func:`_nul_in`) with the API's 400."""
    refused = _nul_refusal(where)
    fields = [FieldOut(field=f.field, message=f.message) for f in refused.fields]
    body = ErrorBody(status=400, code=refused.code, message=refused.message, fields=fields)
    await _send_json(send, 400, msgspec.json.encode(body))


async def _send_json(send: Any, status: int, body: bytes, *headers: tuple[bytes, bytes]) -> None:
    """A whole JSON answer, sent straight (for what is answered outside Litestar)."""
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*head, *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


#: On every answer: a browser must not read JSON or text as something it could run.
_NOSNIFF = (b"x-content-type-options", b"nosniff")


class _Answer:
    """A request's ``send``, noting whether its answer has begun, and adding
    ``X-Content-Type-Options: nosniff`` to every answer that does not say it (the API's JSON,
    ``/metrics``, answers made outside Litestar; the dashboard's say it with its others)."""

    __slots__ = ("begun", "send")

    def __init__(self, send: Any) -> None:
        self.send = send
        self.begun = False

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.begun = True
            headers = message.get("headers", ())
            if not any(name.lower() == _NOSNIFF[0] for name, _ in headers):
                message = {**message, "headers": [*headers, _NOSNIFF]}
        await self.send(message)


async def _cut_at_stop(scope: Any, answer: _Answer) -> None:
    """Answer a request that uvicorn cancelled at the end of the stop's HTTP drain (a slow
    upload, say) with a 503 that closes its connection, and end it normally: uvicorn's own
    answer is a 500, and an error with a traceback in the log, on every deploy. One whose
    answer had begun is left unfinished: uvicorn closes its connection, so its client sees
    it cut (ending it cleanly would pass a partial download off as whole)."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()  # taken: the request ends here, as the cancel asked
    log.info("server.request_cut", method=scope["method"], path=scope["path"], begun=answer.begun)
    if answer.begun:  # (sending more would first wait for a reader that does not read)
        return
    note = CUT_NOTE.get()  # what the request leaves, when "send it again" is wrong for it
    body = _CUT if note is None else _cut_body(note)
    await _send_json(answer.send, 503, body, (b"connection", b"close"), (b"retry-after", b"1"))


def _measured(method: str, scope: Any, send: Any) -> Any:
    """``send``, counting the request (``orchestra_http_requests``) by the route the app
    matched (Litestar puts it in ``scope`` when it routes) when its answer starts."""
    started = time.perf_counter()

    async def send_measured(message: Any) -> None:
        if message["type"] == "http.response.start":
            seconds = time.perf_counter() - started
            metrics.http_answered(method, scope.get("path_template"), message["status"], seconds)
        await send(message)

    return send_measured


class _Headless:
    """A HEAD request's ``send`` and ``receive`` while its GET handler answers it: the answer
    goes out without its body (its headers, Content-Length included, stay). A stream (an
    event stream, a batch's results) would not end: once the answer has begun, the request
    is ended and ``receive`` says the client has gone, which ends any stream."""

    __slots__ = ("_receive", "_send", "begun", "ended")

    def __init__(self, send: Any, receive: Any) -> None:
        self._send = send
        self._receive = receive
        self.begun = False
        self.ended = False

    async def send(self, message: Any) -> None:
        """Send the answer's start; its body as empty and once."""
        if self.ended:
            return
        if message["type"] == "http.response.start":
            self.begun = True
        elif message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            self.ended = True
            message = {**message, "body": b""}
        await self._send(message)

    async def receive(self) -> Any:
        """The request's messages until the answer has begun; then its end, and "gone"."""
        if not self.begun:
            return await self._receive()
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        return {"type": "http.disconnect"}


def create_app(
    settings: Settings,
    registry: TemplateRegistry | None = None,
    env: Mapping[str, str] | None = None,
    *,
    show_key: ShowKey | None = None,
) -> ServiceApp:
    """Build the service; its lifespan does the work of starting (:class:`Runtime`).

    The lifespan loads the templates (``registry``, else one reading the built-ins and
    ``settings.templates.dirs``) and upgrades the database, before the server accepts a
    connection: a broken template or database makes startup fail, every problem listed in
    ``app.runtime.startup_error``. ``env`` is where providers find the API keys their
    ``api_key_env`` names (the CLI passes the process environment; None: no keys).
    ``show_key`` receives the admin key a first start beyond loopback makes (None: no key is
    made; the CLI shows it).

    With ``[server] api = false`` the app serves /health and /metrics alone (see
    :func:`_workers_only`).

    Raises:
        ConfigError: ``[ui] path`` or ``[server] root_path`` is not a plain path.
    """
    surface = Surface.of(settings)
    if registry is None:
        registry = TemplateRegistry(settings.templates.dirs, limits=settings.limits)
    runtime = Runtime(settings, registry, env or {}, show_key=show_key)
    if surface.auth.rate_limit_per_minute:  # its counters live in the Litestar app
        return ServiceApp(runtime, _build(surface))
    return ServiceApp(runtime, _shared(surface))


class _Litestar(Litestar):
    """Litestar without the plugins it adds on its own for pydantic and attrs models whenever
    those packages are installed (another program's dependencies often bring them): no
    handler here takes or returns such a model, and the pydantic plugin alone, by importing
    pydantic, cost the service 8 MB of its RSS. Only the plugin for msgspec's types stays."""

    @staticmethod
    def _get_default_plugins(plugins: list[PluginProtocol]) -> list[PluginProtocol]:
        plugins.append(MsgspecDIPlugin())
        return plugins


@functools.lru_cache(maxsize=16)
def _shared(surface: Surface) -> Litestar:
    """The Litestar app of a surface, built once in this process."""
    return _build(surface)


def _build(surface: Surface) -> Litestar:
    if not surface.api:
        return _workers_only(surface)
    handlers: list[Any] = [
        TaskController,
        EventController,
        TemplateController,
        health,
        health_head,
        models,
    ]
    handlers.append(WebhookController)
    handlers.append(ScheduleController)
    handlers.append(BatchController)
    if surface.metrics:
        handlers.append(scrape)
    if surface.ui_path is not None:
        handlers.append(dashboard(surface.ui_path))
    app = _Litestar(
        route_handlers=handlers,
        middleware=auth.middleware(surface.auth, surface.unchecked),
        template_config=template_config() if surface.ui_path is not None else None,
        cors_config=(
            CORSConfig(allow_origins=list(surface.cors_origins), expose_headers=list(EXPOSED))
            if surface.cors_origins
            else None
        ),
        dependencies={
            # Read from the scope, not from a ``State`` parameter: Litestar copies the state
            # into a new State (and its lock) for each request that asks for one.
            "runtime": Provide(_runtime, sync_to_thread=False),
            "tasks": Provide(_tasks, sync_to_thread=False),
            "catalog": Provide(_catalog, sync_to_thread=False),
            "schedules": Provide(_schedules, sync_to_thread=False),
        },
        # Under the dashboard's path, routing's 404 and 405 are its HTML pages.
        exception_handlers=(
            HANDLERS if surface.ui_path is None else {**HANDLERS, **ROUTING_HANDLERS}
        ),
        before_send=[_allow_every_method],
        before_request=strict_query,
        openapi_config=OpenAPIConfig(
            title="AI Task Orchestra",
            version=__version__,
            description="Run AI tasks from YAML templates against local model servers.",
            # Swagger UI from the package's own files, nothing from a CDN (docs_ui).
            render_plugins=docs_ui.render_plugins(),
            openapi_router=docs_ui.docs_router(),
        ),
        # Logging is configured once by orchestra.logs; Litestar's default config would
        # replace it with its own handlers and format.
        logging_config=None,
        debug=False,
        request_max_body_size=surface.max_body_bytes,
    )
    refine_when_built(app)  # built once, when first asked for; every later request reuses it
    return app


#: What a process without the API answers on any path but /health.
WORKERS_ONLY = (
    "this process runs workers only (orchestra serve --no-api) and answers /health and "
    "/metrics alone; send API requests to a process that serves the API"
)


def _not_here(_request: Request[Any, Any, Any], _exc: NotFoundException) -> Response[ErrorBody]:
    body = ErrorBody(status=404, code="workers_only", message=WORKERS_ONLY, fields=[])
    return Response(body, status_code=404)


def _workers_only(surface: Surface) -> Litestar:
    """A worker process's HTTP surface (``--no-api``; the service's lifespan starts the same
    workers): it answers /health (for a container's probes), /metrics (what monitoring
    scrapes) and, on any other path, a JSON 404 saying that this process serves no API."""
    return _Litestar(
        route_handlers=[health, health_head, scrape] if surface.metrics else [health, health_head],
        middleware=auth.middleware(surface.auth, surface.unchecked),
        exception_handlers={**HANDLERS, NotFoundException: _not_here},
        before_request=strict_query,
        openapi_config=None,
        logging_config=None,
        debug=False,
        request_max_body_size=surface.max_body_bytes,
    )
