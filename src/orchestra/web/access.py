"""Who may use the dashboard: a signed session cookie, or the API's anonymous rule.

The dashboard does not take ``Authorization`` headers (a browser cannot send them on its own):
a login page takes an API key once, checks it as the API would, and sets a cookie holding
only the key's public id, signed (itsdangerous) with a secret the database keeps. Each request
looks the id up among the active keys, so revoking the key ends its sessions at once (within
the key cache's refresh). With no cookie, the API's rule applies: on loopback with no keys, or
with ``allow_anonymous``, the caller is anonymous.

Writes (every method but GET/HEAD) must come from the dashboard's own pages: a browser says so
in ``Sec-Fetch-Site``; older ones send ``Origin``, which must name this host. The cookie is
also ``SameSite=Strict``. A caller's scope is checked by the API's scope guard, as for the API.
"""

from __future__ import annotations

import time
from typing import Any, cast
from urllib.parse import quote, urlsplit

from itsdangerous import BadSignature, TimestampSigner
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, HTTPScope, Receive, Scope, Send

from orchestra.auth import Caller
from orchestra.errors import Unauthorized
from orchestra.web.links import Links

#: The session cookie's name.
COOKIE = "orchestra_session"
#: Paths below the dashboard's own that need no session.
OPEN = ("/login", "/static/")
_SAFE = ("GET", "HEAD")


class Sessions:
    """Issues and checks session cookies: a key id and a time, signed."""

    def __init__(self, secret: str, hours: float) -> None:
        self._signer = TimestampSigner(secret, salt="orchestra.ui.session")
        self.max_age = max(60, int(hours * 3600))

    def issue(self, key_id: str) -> str:
        """The cookie value for a session of the key ``key_id``."""
        return self._signer.sign(key_id).decode()

    def key_id(self, cookie: str | None) -> str | None:
        """The key id a cookie holds, or None when it is absent, forged or expired."""
        if not cookie:
            return None
        try:
            return self._signer.unsign(cookie, max_age=self.max_age).decode()
        except BadSignature:  # SignatureExpired is one too
            return None


def same_origin(headers: Headers) -> bool:
    """Whether a write request comes from this site's own pages (not another site's form)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")  # none: typed or bookmarked by the user
    origin = headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site request: browsers send one of the two
    host = headers.get("x-forwarded-host") or headers.get("host")
    return origin != "null" and urlsplit(origin).netloc == host


async def session_caller(runtime: Any, cookie: str | None) -> Caller | None:
    """The caller a session cookie stands for; without a valid one, the anonymous caller
    where the API allows one; else None (the caller must log in)."""
    key_id = runtime.sessions.key_id(cookie)
    if key_id is not None:
        entry = (await runtime.gatekeeper.keys()).get(key_id)
        if entry is not None:
            key = entry[1]
            return Caller(key.name, key.scope, key.id)
    try:
        caller: Caller = await runtime.gatekeeper.caller(None)
    except Unauthorized:
        return None
    return caller


class DashboardGate(ASGIMiddleware):
    """Sets ``scope["user"]`` from the session; sends strangers to the login page; refuses
    cross-site writes (403)."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        send = _timed(send)
        method = cast(HTTPScope, scope)["method"]
        runtime = scope["app"].state.runtime
        links = Links.of(scope, runtime.settings)
        below = scope["path"][len(runtime.settings.ui.path.rstrip("/")) :]
        headers = Headers.from_scope(scope)
        if method not in _SAFE and not same_origin(headers):
            await _answer(send, 403, b'{"detail":"cross-site request refused"}')
            return
        if not below.startswith(OPEN):
            cookie = _cookie(headers)
            caller = await session_caller(runtime, cookie)
            if caller is None:
                login = links.ui("/login")
                if method in _SAFE:
                    target = links.ui(below or "/")
                    query = scope.get("query_string", b"").decode("latin-1")
                    if query:
                        target += "?" + query
                    login += "?next=" + quote(target, safe="")
                if headers.get("hx-request"):
                    await _answer(send, 401, b"", [(b"hx-redirect", login.encode())])
                elif method in _SAFE:
                    await _answer(send, 303, b"", [(b"location", login.encode())])
                else:
                    await _answer(send, 401, b'{"detail":"log in first"}')
                return
            scope["user"] = caller
        await next_app(scope, receive, send)


def _timed(send: Send) -> Send:
    """Adds ``Server-Timing: app;dur=MS`` (the time until the answer starts) to the answer, so
    browsers' developer tools and the benchmark see the server's own share."""
    started = time.perf_counter()

    async def timed_send(message: Any) -> None:
        if message["type"] == "http.response.start":
            ms = (time.perf_counter() - started) * 1000
            headers = list(message.get("headers", []))
            headers.append((b"server-timing", f"app;dur={ms:.2f}".encode()))
            message = {**message, "headers": headers}
        await send(message)

    return timed_send


def _cookie(headers: Headers) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


async def _answer(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    head = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": head + (headers or []),
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
