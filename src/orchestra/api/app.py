"""The app factory: settings in, a Litestar app out. Nothing here reads the environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.datastructures import MutableScopeHeaders, State
from litestar.di import NamedDependency, Provide
from litestar.exceptions import NotFoundException
from litestar.openapi import OpenAPIConfig
from litestar.routes import HTTPRoute

from orchestra import __version__
from orchestra.api import auth
from orchestra.api.batches import BatchController
from orchestra.api.errors import HANDLERS
from orchestra.api.events import EventController
from orchestra.api.health import health, models
from orchestra.api.metrics import open_paths, scrape
from orchestra.api.openapi import refine_when_built
from orchestra.api.runtime import Runtime, ShowKey
from orchestra.api.schedules import ScheduleController
from orchestra.api.schedules import provide as _schedules
from orchestra.api.schemas import ErrorBody
from orchestra.api.tasks import TaskController
from orchestra.api.templates import TemplateController
from orchestra.api.webhooks import WebhookController
from orchestra.catalog import TemplateCatalog
from orchestra.config import Settings
from orchestra.tasks import TaskService
from orchestra.templating.registry import TemplateRegistry
from orchestra.web.render import template_config
from orchestra.web.routes import dashboard, own_paths


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


def create_app(
    settings: Settings,
    registry: TemplateRegistry | None = None,
    env: Mapping[str, str] | None = None,
    *,
    show_key: ShowKey | None = None,
) -> Litestar:
    """Build the service; its lifespan does the work of starting (:class:`Runtime`).

    The lifespan loads the templates (``registry``, else one reading the built-ins and
    ``settings.templates.dirs``) and upgrades the database, before the server accepts a
    connection: a broken template or database makes startup fail, every problem listed in
    ``app.state.runtime.startup_error``. ``env`` is where providers find the API keys their
    ``api_key_env`` names (the CLI passes the process environment; None: no keys).
    ``show_key`` receives the admin key a first start beyond loopback makes (None: no key is
    made; the CLI shows it).

    With ``[server] api = false`` the app serves /health and /metrics alone (see
    :func:`_workers_only`).
    """
    if registry is None:
        registry = TemplateRegistry(settings.templates.dirs, limits=settings.limits)
    runtime = Runtime(settings, registry, env or {}, show_key=show_key)
    if not settings.server.api:
        return _workers_only(settings, runtime)
    handlers: list[Any] = [TaskController, EventController, TemplateController, health, models]
    handlers.append(WebhookController)
    handlers.append(ScheduleController)
    handlers.append(BatchController)
    if settings.metrics.enabled:
        handlers.append(scrape)
    if settings.ui.enabled:
        handlers.append(dashboard(settings))
    app = Litestar(
        route_handlers=handlers,
        middleware=auth.middleware(settings.auth, own_paths(settings) + open_paths(settings)),
        template_config=template_config() if settings.ui.enabled else None,
        cors_config=(
            CORSConfig(allow_origins=settings.cors.allow_origins)
            if settings.cors.allow_origins
            else None
        ),
        lifespan=[runtime.lifespan],
        state=State({"runtime": runtime}),
        dependencies={
            # The runtime itself, not read from a ``State`` parameter: Litestar copies the app's
            # state into a new State (and its lock) for each request that asks for one.
            "runtime": Provide(runtime.itself, sync_to_thread=False),
            "tasks": Provide(_tasks, sync_to_thread=False),
            "catalog": Provide(_catalog, sync_to_thread=False),
            "schedules": Provide(_schedules, sync_to_thread=False),
        },
        exception_handlers=HANDLERS,
        before_send=[_allow_every_method],
        openapi_config=OpenAPIConfig(
            title="AI Task Orchestra",
            version=__version__,
            description="Run AI tasks from YAML templates against local model servers.",
        ),
        # Logging is configured once by orchestra.logs; Litestar's default config would
        # replace it with its own handlers and format.
        logging_config=None,
        debug=False,
        request_max_body_size=settings.limits.max_body_bytes,
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


def _workers_only(settings: Settings, runtime: Runtime) -> Litestar:
    """A worker process's app (``--no-api``): the same lifespan, so the same workers, and an
    HTTP listener that answers /health (for a container's probes), /metrics (what monitoring
    scrapes) and, on any other path, a JSON 404 saying that this process serves no API."""
    return Litestar(
        route_handlers=[health, scrape] if settings.metrics.enabled else [health],
        middleware=auth.middleware(settings.auth, open_paths(settings)),
        lifespan=[runtime.lifespan],
        state=State({"runtime": runtime}),
        exception_handlers={**HANDLERS, NotFoundException: _not_here},
        openapi_config=None,
        logging_config=None,
        debug=False,
        request_max_body_size=settings.limits.max_body_bytes,
    )
