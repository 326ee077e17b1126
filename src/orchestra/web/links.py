"""The dashboard's own URLs, under whatever prefix a reverse proxy serves it at.

A proxy that serves Orchestra at ``https://host/orchestra/`` and strips ``/orchestra`` before
passing requests on makes every path the service sees start at ``/``; the links it writes
into pages must still start with ``/orchestra``. The prefix comes from the request's
``X-Forwarded-Prefix`` header (the convention of Traefik, Spring and others) or else from
``[server] root_path``.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

from orchestra import __version__
from orchestra.config import Settings
from orchestra.errors import ConfigError

#: A path prefix: "" or slash-separated plain segments (nothing a header could smuggle in).
_PREFIX = re.compile(r"^(/[A-Za-z0-9._~-]+)*$")


def clean_prefix(value: str, what: str) -> str:
    """A configured path prefix without its trailing slash.

    Raises:
        ConfigError: it is not a plain path.
    """
    prefix = value.rstrip("/")
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"{what}: {value!r} is not a path such as /orchestra")
    return prefix


class Links:
    """Builds the dashboard's URLs for one request."""

    def __init__(self, prefix: str, ui_path: str) -> None:
        self.prefix = prefix
        self.base = prefix + ui_path.rstrip("/")

    @classmethod
    def of(cls, scope: Any, settings: Settings) -> Links:
        """The links for a request (its ``X-Forwarded-Prefix``, else ``[server] root_path``)."""
        prefix = settings.server.root_path.rstrip("/")
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-prefix":
                given = value.decode("latin-1").strip().rstrip("/")
                if _PREFIX.fullmatch(given):
                    prefix = given
                break
        return cls(prefix, settings.ui.path)

    def ui(self, path: str = "/", **query: Any) -> str:
        """A dashboard page: ``ui("/tasks", status="failed")``; None values are left out."""
        url = self.base + (path if path != "/" else "/")
        params = {k: v for k, v in query.items() if v not in (None, "")}
        return f"{url}?{urlencode(params, doseq=True)}" if params else url

    def static(self, name: str) -> str:
        """A static file, with the version in the query so a new release is fetched anew."""
        return f"{self.base}/static/{name}?v={__version__}"

    def api(self, path: str) -> str:
        """A path of the service's HTTP API."""
        return self.prefix + path
