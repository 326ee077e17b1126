"""Where a request finds its service.

One Litestar app serves every service of the same shape in a process (see
:func:`orchestra.api.app.create_app`), so a request cannot find its service's
:class:`~orchestra.api.runtime.Runtime` on the Litestar app: the service's own ASGI app puts
it in the request's scope ``state`` before Litestar sees the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestra.api.runtime import Runtime

#: The key of the runtime in a request's scope ``state``.
RUNTIME = "orchestra.runtime"


def runtime_of(scope: Any) -> Runtime:
    """The runtime of the service that received the request with this ASGI ``scope``."""
    runtime: Runtime = scope["state"][RUNTIME]
    return runtime


def location(request: Any, path: str) -> str:
    """A ``Location`` header for ``path`` of the API, under the prefix the service is reached
    by (``X-Forwarded-Prefix``, else ``[server] root_path``): it pointed outside it, a 404
    through the proxy."""
    from orchestra.web.links import Links  # (the dashboard's package: not at import)

    return Links.of(request.scope, runtime_of(request.scope).settings).api(path)
