"""Logging in and out of the dashboard, and managing API keys (admin scope)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from litestar.datastructures import Cookie
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Template

from orchestra.api.auth import credentials
from orchestra.api.scope import runtime_of
from orchestra.api.slow_body import read_within
from orchestra.auth import SCOPES
from orchestra.db.keys import MAX_NAME
from orchestra.errors import ConflictError, InvalidRequest, NotFoundError, Unauthorized
from orchestra.web.access import COOKIE, cookie_of
from orchestra.web.render import caller_of, links, page

#: What making the first key does, said before it is made (and ticked to go ahead).
TURNS_ON_AUTH = (
    "No API key exists yet, so the API and this dashboard are open to this machine without "
    "one. Making the first key turns authentication on: from then on every API request needs "
    "a key (clients without one get 401), and this dashboard asks you to log in with a key."
)


def _safe_next(target: str, base: str) -> str:
    """Where to go after logging in: only a page of this dashboard (never another site)."""
    if target.startswith(base + "/") or target == base:
        if not target.startswith("//") and "\\" not in target:
            return target
    return base + "/"


def _secure(request: Request[Any, Any, Any]) -> bool:
    proto = request.headers.get("x-forwarded-proto") or request.url.scheme
    return proto == "https"


#: The largest login form accepted, in bytes (a key, the page to go to next, a flag).
LOGIN_MAX_BYTES = 8 * 1024


class AccessPages(Controller):
    """Log in with an API key; log out."""

    @get("/login", name="ui.login")
    async def login_page(
        self,
        request: Request[Any, Any, Any],
        next: FromQuery[str] = "",
        unsent: FromQuery[bool] = False,
    ) -> Template:
        """The login form; ``unsent``: a change was asked for after the session had ended,
        and was not made (it said nothing, and the page came back as it was)."""
        return page(request, "login.html", next=next, error="", unsent=unsent)

    @post("/login", status_code=303, request_max_body_size=LOGIN_MAX_BYTES)
    async def login(self, request: Request[Any, Any, Any]) -> Redirect | Template:
        """Check the key as the API would; on success, a signed session cookie.

        The only body read before any credential: it is small (over :data:`LOGIN_MAX_BYTES`,
        413, from its Content-Length at once or as it arrives) and must arrive whole within
        ``[server] body_timeout`` (else 408), so a login sent a byte at a time cannot hold a
        connection, nor a large form hold the event loop while it is parsed."""
        runtime = runtime_of(request.scope)
        timeout = runtime.settings.server.body_timeout
        form = await read_within(request.scope, timeout, request.form())
        token = str(form.get("key", "")).strip()
        target = _safe_next(str(form.get("next", "")), links(request).base)
        try:
            if not token:
                raise Unauthorized("enter an API key")
            _, host, proxied = credentials(request)
            caller = await runtime.gatekeeper.caller(f"Bearer {token}", host, proxied)
        except Unauthorized as exc:
            unsent = form.get("unsent") == "1"  # still said after a mistyped key
            return page(
                request,
                "login.html",
                status_code=401,
                next=target,
                error=exc.message,
                unsent=unsent,
            )
        if caller.key_id is None:  # pragma: no cover - a Bearer token always names its key
            raise Unauthorized("the API key is not valid")
        hours = runtime.settings.ui.session_hours
        cookie = Cookie(
            key=COOKIE,
            value=await runtime.sessions.create(caller.key_id, hours),
            path=links(request).base or "/",
            max_age=max(60, int(hours * 3600)),
            httponly=True,
            samesite="lax",
            secure=_secure(request),
        )
        return Redirect(target, status_code=303, cookies=[cookie])

    @get("/logout")
    async def logout_page(self, request: Request[Any, Any, Any]) -> Redirect:
        """No page of its own (logging out is a POST): the overview."""
        return Redirect(links(request).ui("/"), status_code=303)

    @post("/logout", status_code=303, opt={"scope": "read"})
    async def logout(self, request: Request[Any, Any, Any]) -> Redirect:
        """End the session (here and in the database: the cookie stops working anywhere)."""
        await runtime_of(request.scope).sessions.end(cookie_of(request.headers))
        base = links(request).base
        gone = Cookie(
            key=COOKIE, value="", path=base or "/", max_age=0, httponly=True, samesite="lax"
        )
        return Redirect(base + "/login", status_code=303, cookies=[gone])


class KeyPages(Controller):
    """API keys: list, create (the token is shown once), revoke."""

    path = "/keys"
    opt = {"scope": "admin"}

    async def _page(
        self, request: Request[Any, Any, Any], status_code: int = 200, **context: Any
    ) -> Template:
        keys = await runtime_of(request.scope).keys.all()
        defaults = {
            "made": None,
            "token": None,
            "error": "",
            "scopes": SCOPES,
            "first_key": _opens(request, keys),
            "turns_on_auth": TURNS_ON_AUTH,
            "auth_now_on": False,
        }
        return page(
            request,
            "keys.html",
            status_code=status_code,
            section="keys",
            keys=keys,
            max_name=MAX_NAME,
            **{**defaults, **context},
        )

    @get("/", name="ui.keys")
    async def keys(self, request: Request[Any, Any, Any]) -> Template:
        """Every key, active and revoked (never their secrets)."""
        return await self._page(request)

    @post("/", status_code=200)
    async def create(self, request: Request[Any, Any, Any]) -> Template:
        """Make a key; its token is in this answer only."""
        form = await request.form()
        name, scope = str(form.get("name", "")).strip(), str(form.get("scope", ""))
        runtime = runtime_of(request.scope)
        first = _opens(request, await runtime.keys.all())
        try:
            if scope not in SCOPES:
                raise InvalidRequest("scope must be read, submit or admin")
            if first and form.get("confirm") != "auth-on":
                raise InvalidRequest(
                    "tick the box to confirm: the first key turns authentication on"
                )
            made, token = await runtime.keys.create(name, scope)
        except (InvalidRequest, ConflictError) as exc:
            return await self._page(request, status_code=422, error=exc.message)
        runtime.gatekeeper.forget()
        if first:
            # This page was the last one open access shows: say so, not "open access".
            return await self._page(
                request, made=made, token=token, auth_now_on=True, first_key=False, caller=None
            )
        return await self._page(request, made=made, token=token)

    @get("/{key_id:str}/revoke")
    async def revoke_page(self, request: Request[Any, Any, Any], key_id: FromPath[str]) -> Template:
        """Ask before revoking a key, naming it and what stops working."""
        keys = await runtime_of(request.scope).keys.all()
        key = next((k for k in keys if k.id == key_id), None)
        if key is None:
            raise NotFoundError(f"no API key with id {key_id!r}")
        caller = caller_of(request)
        return page(
            request,
            "revoke.html",
            section="keys",
            key=key,
            yours=caller is not None and caller.key_id == key.id,
        )

    @post("/{key_id:str}/revoke", status_code=303)
    async def revoke(self, request: Request[Any, Any, Any], key_id: FromPath[str]) -> Redirect:
        """Revoke a key: requests and dashboard sessions with it stop working."""
        runtime = runtime_of(request.scope)
        await runtime.keys.revoke(key_id, by_id=True)
        runtime.gatekeeper.forget(revoked=key_id)
        return Redirect(links(request).ui("/keys"), status_code=303)


def _opens(request: Request[Any, Any, Any], keys: list[Any]) -> bool:
    """Whether making a key now turns authentication on: the caller is in by open access (no
    key exists, on loopback) rather than a key or ``allow_anonymous``."""
    caller = caller_of(request)
    if caller is None or caller.key_id is not None:
        return False
    if runtime_of(request.scope).settings.auth.allow_anonymous:
        return False
    return not any(k.revoked_at is None for k in keys)
