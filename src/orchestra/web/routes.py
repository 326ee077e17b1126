"""The dashboard as one Litestar router: pages, static files, the gate (which also sends the
security headers: :mod:`orchestra.web.headers`)."""

from __future__ import annotations

import re

from litestar import Router
from litestar.static_files import create_static_files_router

from orchestra.api.auth import scope_guard
from orchestra.api.docs_ui import SCHEMA_PATH
from orchestra.api.metrics import PATH as METRICS_PATH
from orchestra.config import Settings
from orchestra.errors import ConfigError
from orchestra.web.access import DashboardGate
from orchestra.web.admin_pages import AccessPages, KeyPages
from orchestra.web.batch_pages import BatchPages
from orchestra.web.links import clean_prefix
from orchestra.web.overview import OverviewPages
from orchestra.web.render import HANDLERS, STATIC
from orchestra.web.schedule_pages import SchedulePages
from orchestra.web.task_pages import TaskPages
from orchestra.web.template_pages import TemplatePages
from orchestra.web.webhook_pages import WebhookPages

#: The paths the service serves besides the dashboard, and whose they are.
SERVICE_PATHS = {
    "/api": "the API's",
    "/health": "the health check's",
    METRICS_PATH: "Prometheus's",
    SCHEMA_PATH: "the API's description's",
}


def ui_path(settings: Settings) -> str:
    """Where the dashboard is served, checked.

    Raises:
        ConfigError: ``[ui] path`` or ``[server] root_path`` is not a plain path, or the
            dashboard's path is under one the service serves (:data:`SERVICE_PATHS`).
    """
    clean_prefix(settings.server.root_path, "server.root_path")
    path = clean_prefix(settings.ui.path, "ui.path")
    if not path:
        raise ConfigError("ui.path: the dashboard needs a path of its own, such as /ui")
    first = "/" + path.split("/")[1]
    if first in SERVICE_PATHS:
        # The API's key check leaves the dashboard's paths to the dashboard: at /api it would
        # check no request; at /metrics its routes clash with the service's.
        raise ConfigError(
            f"ui.path: {first} is {SERVICE_PATHS[first]}; the dashboard needs a path of its "
            "own, such as /ui"
        )
    return path


def own_paths(settings: Settings) -> tuple[str, ...]:
    """Path patterns the dashboard authenticates itself (the API's key check skips them)."""
    if not settings.ui.enabled:
        return ()
    return (f"^{re.escape(ui_path(settings))}(/|$)",)


def dashboard(path: str) -> Router:
    """The dashboard's router, mounted at ``path`` (``[ui] path``, checked: :func:`ui_path`)."""
    static = create_static_files_router(
        path="/static",
        directories=[STATIC],
        name="ui.static",
        send_as_attachment=False,
        cache_control=None,
        include_in_schema=False,
    )
    return Router(
        path=path,
        route_handlers=[
            OverviewPages,
            TaskPages,
            BatchPages,
            TemplatePages,
            SchedulePages,
            WebhookPages,
            AccessPages,
            KeyPages,
            static,
        ],
        middleware=[DashboardGate()],
        guards=[scope_guard],  # the API's middleware checks scopes itself; pages have theirs
        exception_handlers=HANDLERS,
        include_in_schema=False,
    )
