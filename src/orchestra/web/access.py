"""Who may use the dashboard: a session cookie, or the API's anonymous rule.

The dashboard does not take ``Authorization`` headers (a browser cannot send them on its own):
a login page takes an API key once, checks it as the API would, and starts a session (see
:mod:`orchestra.db.sessions`: the cookie holds a random token, the database its SHA-256 and
the key's id). Each request looks the key up among the active ones, so revoking the key ends
its sessions within the key cache's refresh; logging out deletes the session. With no
cookie, the API's rule applies: on loopback with no keys (and a Host naming this machine), or
with ``allow_anonymous``, the caller is anonymous.

Writes (every method but GET/HEAD) must come from the dashboard's own pages: a browser says so
in ``Sec-Fetch-Site``; older ones send ``Origin``, which must name this host. The cookie is
``SameSite=Lax``: sent when a link on another site opens a page (a GET, which changes nothing
here), never with another site's write. A caller's scope is checked by the API's scope guard,
as for the API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast
from urllib.parse import quote, urlsplit

import msgspec
from litestar import Request
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp, HTTPScope, Receive, Scope, Send

from orchestra.api.auth import forwarded, same_origin
from orchestra.api.scope import runtime_of
from orchestra.auth import Caller
from orchestra.errors import Forbidden, StorageError, Unauthorized
from orchestra.web.headers import stamped
from orchestra.web.links import Links
from orchestra.web.render import bounded, error_page
from orchestra.wire.schemas import ErrorBody

#: The session cookie's name.
COOKIE = "orchestra_session"
#: Paths below the dashboard's own that need no session: the login page, static files.
OPEN_PAGES = ("/login",)
OPEN_PREFIX = "/static/"
_SAFE = ("GET", "HEAD")


async def session_caller(
    runtime: Any, cookie: str | None, host: str | None, proxied: bool
) -> Caller | None:
    """The caller a session cookie stands for; without a valid one, the anonymous caller
    where the API allows one; else None (the caller must log in)."""
    key_id = await runtime.sessions.key_id(cookie)
    if key_id is not None:
        caller: Caller | None = await runtime.gatekeeper.by_id(key_id)
        if caller is not None:
            return caller
    try:
        return await runtime.gatekeeper.caller(None, host, proxied)  # type: ignore[no-any-return]
    except Unauthorized:
        return None


def still_signed_in(request: Request[Any, Any, Any]) -> Callable[[], Awaitable[bool]]:
    """For a live stream (:func:`~orchestra.web.render.bounded`): whether the caller who
    opened it may still follow it: its session not ended (logged out, expired) and its key
    not revoked; an anonymous caller, while anonymous callers may call. While the database
    cannot be read, it may."""
    runtime = runtime_of(request.scope)
    caller = request.scope.get("user")
    token = request.cookies.get(COOKIE)

    async def still() -> bool:
        if not isinstance(caller, Caller):
            return True
        try:
            if caller.key_id is not None and await runtime.sessions.key_id(token) != caller.key_id:
                return False
        except StorageError:
            return True
        return bool(await runtime.gatekeeper.admits(caller))

    return still


def live_stream(
    request: Request[Any, Any, Any], messages: AsyncIterator[ServerSentEventMessage]
) -> ServerSentEvent:
    """A dashboard page's live stream of ``messages``: ended after a while (the browser
    reconnects) or when its caller may no longer follow it (:func:`still_signed_in`), and
    counted against the signed-in key's streams, with its API event streams (``[auth]
    max_streams_per_key``; a caller without a key is not counted, as in the API). Call it
    last, once nothing else can refuse the request: the answer gives the place back.

    Raises:
        TooManyStreams: The key holds its most streams (429, with Retry-After: the page's
            stream is refused for good, and its sse extension opens a new one later,
            waiting twice as long each time, up to a minute).
    """
    caller = request.scope.get("user")
    key_id = caller.key_id if isinstance(caller, Caller) else None
    release = runtime_of(request.scope).streams.take(key_id)
    # Spelled as Litestar's own Cache-Control, which it then does not add a second time.
    return _HeldStream(
        bounded(messages, still=still_signed_in(request)),
        release,
        headers={"Cache-Control": "no-store"},
    )


class _HeldStream(ServerSentEvent):
    """A server-sent event stream that calls ``release`` once its answer is over, however
    it ended (its client gone, its messages over, the service stopping)."""

    def __init__(self, content: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.release = release

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        """Litestar's answer, giving the stream's place back at its end."""
        answer = super().to_asgi_response(*args, **kwargs)
        return cast(ASGIResponse, _Releasing(answer, self.release))


class _Releasing:
    """An ASGI answer, then ``release`` (however the answer ended)."""

    __slots__ = ("answer", "release")

    def __init__(self, answer: ASGIResponse, release: Callable[[], None]) -> None:
        self.answer = answer
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.answer(scope, receive, send)
        finally:
            self.release()


class DashboardGate(ASGIMiddleware):
    """Sets ``scope["user"]`` from the session; sends strangers to the login page; refuses
    cross-site writes (403); stamps every answer with the dashboard's headers
    (:func:`~orchestra.web.headers.stamped`)."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        send = stamped(send)  # every answer below, this gate's own ones too
        method = cast(HTTPScope, scope)["method"]
        runtime = runtime_of(scope)
        links = Links.of(scope, runtime.settings)
        below = scope["path"][len(runtime.settings.ui.path.rstrip("/")) :]
        headers = Headers.from_scope(scope)
        if method not in _SAFE and not same_origin(headers):  # the error page, as any 403
            request: Request[Any, Any, Any] = Request(scope, receive)
            refused = Forbidden(
                "cross-site request refused: another site's page cannot change anything here"
            )
            await error_page(request, refused).to_asgi_response(None, request)(scope, receive, send)
            return

        if below not in OPEN_PAGES and not below.startswith(OPEN_PREFIX):
            proxied = forwarded(cast(HTTPScope, scope)["headers"])
            caller = await session_caller(runtime, cookie_of(headers), headers.get("host"), proxied)
            if caller is None:
                login = links.ui("/login")
                target = _come_back_to(scope, headers, links, below)
                if target:
                    login += "?next=" + quote(target, safe="")
                if method not in _SAFE:  # the login page says it was not done
                    login += ("&" if target else "?") + "unsent=1"
                if headers.get("hx-request"):
                    await _answer(send, 401, b"", [(b"hx-redirect", login.encode())])
                elif method == "GET" and "text/event-stream" in headers.get("accept", ""):
                    await _answer(send, 200, _log_in_event(links.ui("/login")), typed=_STREAM)
                elif method in _SAFE:
                    await _answer(send, 303, b"", [(b"location", login.encode())])
                else:
                    await _answer(send, 401, _message("log in first"))
                return
            scope["user"] = caller
        await next_app(scope, receive, send)


def _come_back_to(scope: Scope, headers: Headers, links: Links, below: str) -> str | None:
    """The page to show after logging in: the one asked for, or for a fragment htmx asked
    for, the page it was on (a bare fragment is no page to land on)."""
    if headers.get("hx-request"):
        current = urlsplit(headers.get("hx-current-url", ""))
        if current.path.startswith(links.base + "/"):
            return current.path + (f"?{current.query}" if current.query else "")
        return None
    if cast(HTTPScope, scope)["method"] not in _SAFE:
        return None
    target = links.ui(below or "/")
    query = scope.get("query_string", b"").decode("latin-1")
    return f"{target}?{query}" if query else target


#: An event stream's content type (for ``_answer``, whose answers are JSON otherwise).
_STREAM = b"text/event-stream; charset=utf-8"


def _log_in_event(login: str) -> bytes:
    """What a live stream without a session gets: one ``login`` event naming the login page,
    which dashboard.js follows (coming back to the page it is on). An EventSource cannot
    follow a redirect to a page, nor read a status: given a 303 or a 401, it only errs, and
    the page would take its ended session for an outage. ``retry`` keeps a page without the
    script from asking again more than once a minute."""
    return f"retry: 60000\nevent: login\ndata: {login}\n\n".encode()


def _message(text: str) -> bytes:
    """A 401's body, as the API's error bodies are."""
    return msgspec.json.encode(ErrorBody(401, Unauthorized.code, text, []))


def cookie_of(headers: Headers) -> str | None:
    """The session cookie's value, if the request has one."""
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


async def _answer(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    typed: bytes = b"application/json",
) -> None:
    head = [(b"content-type", typed), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body, "more_body": False})
