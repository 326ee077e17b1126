"""What ``orchestra serve`` checks before it starts anything: the settings whose check needs
more than the settings file's types (the database URL's engine, the dashboard's paths).
Checked later, in the lifespan, a problem came after the server process had started and named
the key alone; here it names where the value was set, the file or the environment variable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from orchestra.config import Settings
from orchestra.config_file import origin
from orchestra.db.engine import parse_url
from orchestra.errors import ConfigError
from orchestra.web.links import clean_prefix
from orchestra.web.routes import ui_path


def check(settings: Settings, config_path: str | None) -> None:
    """Check what the service would find wrong only once started.

    Args:
        settings: The settings to serve with.
        config_path: The settings file they were read from (None: the one
            :func:`~orchestra.config_file.load` looks for).

    Raises:
        ConfigError: naming the file or variable, the key and what is wrong.
    """
    server = settings.server
    checks: list[tuple[str, Callable[[], object]]] = [
        ("database.url", lambda: parse_url(settings.database.url)),
        ("server.root_path", lambda: clean_prefix(server.root_path, "server.root_path")),
    ]
    if server.api and settings.ui.enabled:
        checks.append(("ui.path", lambda: ui_path(settings)))
    checks.append(("templates.dirs", lambda: template_folders(settings.templates.dirs)))
    for key, run in checks:
        try:
            run()
        except ConfigError as exc:
            raise ConfigError(f"{origin(key, config_path)}: {exc.message}") from None


def template_folders(dirs: list[str]) -> None:
    """Each of ``dirs`` is a folder (a relative one from the working directory).

    Raises:
        ConfigError: naming the first that is not.
    """
    for folder in dirs:
        if not Path(folder).is_dir():
            where = "" if Path(folder).is_absolute() else f" (from {Path.cwd()})"
            raise ConfigError(f"templates.dirs: {folder} is not a folder{where}")
