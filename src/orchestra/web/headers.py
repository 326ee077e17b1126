"""What every answer under the dashboard's path carries: the security headers and the
server's own time (``Server-Timing``).

Pages, fragments, streams, static files and error pages pass through the dashboard's gate
(:class:`~orchestra.web.access.DashboardGate`), which stamps them with :func:`stamped`, its
own refusals and redirects too. Routing's own 404 and 405 never reach the router (no route
matched, so no router's middleware runs): their page stamps itself (:class:`StampedPage`).
"""

from __future__ import annotations

import time
from typing import Any

from litestar.response import Template
from litestar.response.base import ASGIResponse
from litestar.types import Send

#: Scripts and styles come only from the dashboard's own files: no inline script, no inline
#: style, nothing from elsewhere. Markup that a task's data might smuggle in cannot run.
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
#: Sent with every answer under the dashboard's path (lower-case names, as ASGI has them).
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}


def server_timing(started: float) -> str:
    """The ``Server-Timing`` value for an answer whose work began at ``started``
    (:func:`time.perf_counter`)."""
    return f"app;dur={(time.perf_counter() - started) * 1000:.2f}"


def stamped(send: Send) -> Send:
    """``send``, adding the security headers (each one the answer did not set itself) and
    ``Server-Timing`` (the time from now until the answer starts) to the answer's start, so
    browsers' developer tools and the benchmark see the server's own share."""
    started = time.perf_counter()

    async def stamped_send(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            present = {name.lower() for name, _ in headers}
            headers.extend(
                (name.encode(), value.encode())
                for name, value in SECURITY_HEADERS.items()
                if name.encode() not in present
            )
            headers.append((b"server-timing", server_timing(started).encode()))
            message = {**message, "headers": headers}
        await send(message)

    return stamped_send


class StampedPage(Template):
    """A page that carries the dashboard's headers itself, timed from ``started``: for
    answers the gate never sees."""

    __slots__ = ("started",)

    def __init__(self, *args: Any, started: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = started

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        """The rendered page, with the security headers and ``Server-Timing`` (rendering
        included)."""
        response = super().to_asgi_response(*args, **kwargs)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers.add("server-timing", server_timing(self.started))
        return response
