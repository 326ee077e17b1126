"""The app factory: settings in, a Litestar app out. Nothing here reads the environment."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import MutableScopeHeaders, State
from litestar.di import NamedDependency, Provide
from litestar.openapi import OpenAPIConfig
from litestar.routes import HTTPRoute

from orchestra import __version__
from orchestra.api import auth
from orchestra.api.errors import HANDLERS
from orchestra.api.health import health, models
from orchestra.api.openapi import refine
from orchestra.api.runtime import Runtime
from orchestra.api.tasks import TaskController
from orchestra.api.templates import TemplateController
from orchestra.catalog import TemplateCatalog
from orchestra.config import Settings
from orchestra.tasks import TaskService
from orchestra.templating.registry import TemplateRegistry
from orchestra.web.render import template_config
from orchestra.web.routes import dashboard, own_paths


def _runtime(state: State) -> Runtime:
    runtime: Runtime = state.runtime
    return runtime


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
) -> Litestar:
    """Build the service.

    Templates are loaded here, so a broken template stops startup with every problem listed.
    ``env`` is where providers find the API keys their ``api_key_env`` names (the CLI passes
    the process environment; None: no keys).

    Raises:
        TemplateError: a template in the built-ins or ``settings.templates.dirs`` is invalid.
    """
    if registry is None:
        registry = TemplateRegistry(settings.templates.dirs, limits=settings.limits)
        registry.load()
    runtime = Runtime(settings, registry, env or {})
    handlers: list[Any] = [TaskController, TemplateController, health, models]
    if settings.ui.enabled:
        handlers.append(dashboard(settings))
    app = Litestar(
        route_handlers=handlers,
        middleware=auth.middleware(settings.auth, own_paths(settings)),
        template_config=template_config() if settings.ui.enabled else None,
        guards=[auth.scope_guard],
        cors_config=(
            CORSConfig(allow_origins=settings.cors.allow_origins)
            if settings.cors.allow_origins
            else None
        ),
        lifespan=[runtime.lifespan],
        state=State({"runtime": runtime}),
        dependencies={
            "runtime": Provide(_runtime, sync_to_thread=False),
            "tasks": Provide(_tasks, sync_to_thread=False),
            "catalog": Provide(_catalog, sync_to_thread=False),
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
    refine(app.openapi_schema)  # built once, here; every later request serves this one
    return app
