"""Who may call the API: API keys checked by a middleware, scopes checked by a guard.

Every request but ``/health`` and ``/schema`` passes :class:`ApiKeyMiddleware`, which turns
the ``Authorization: Bearer`` header into a :class:`~orchestra.auth.Caller` (or answers
401) and compares the caller's scope with the one the route declares in its ``opt``
(:func:`check_scope`; default: ``read`` for GET, ``admin`` for anything else; 403 when it
falls short). Error bodies say only that a key is missing, wrong or not allowed.

``/health`` answers everyone (liveness checks send no key), but shows provider details only
to a caller with the ``read`` scope (:func:`public_caller`); others get its status alone.

An anonymous caller (no keys yet on loopback, or ``allow_anonymous``) is whoever can reach
the port, a web page in the user's browser included: such a page may send a form or a
``text/plain`` body to another site without asking first. So an anonymous write (any method
but GET, HEAD and OPTIONS) must not come from another site's page (:func:`same_origin`), as
the dashboard's writes must not; a key is never sent by a browser on its own.

Event streams outlive their request: :meth:`Gatekeeper.admits` checks the caller again as
they go, so a revoked key's stream ends (see :mod:`orchestra.api.events`).
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any
from urllib.parse import urlsplit

from litestar.connection import ASGIConnection
from litestar.datastructures import Headers
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.middleware.base import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig

from orchestra import logs
from orchestra.api.scope import runtime_of
from orchestra.auth import ApiKey, Caller, Scope, allows, is_loopback, key_id_of, matches
from orchestra.config import AuthSettings
from orchestra.db.keys import KeyStore
from orchestra.errors import Forbidden, StorageError, StorageUnreachable, Unauthorized
from orchestra.shared_read import DATABASE_ANSWER_SECONDS, SharedReads, Unanswered

#: Operations served to anyone: the liveness checks.
#: A route handler's ``opt`` key marking a read that must answer while the database hangs
#: (``/metrics``): its key check is bounded (:meth:`Gatekeeper.caller`).
PROBE = "probe"
#: The key in a probe's scope ``state`` of when its key check began (the loop's time).
PROBE_BEGAN = "orchestra.probe_began"
PUBLIC_PATHS = ("/health", "/api/v1/health")
#: Paths served to anyone (as patterns): those, and the API's own description.
PUBLIC = [*(f"^{re.escape(p)}$" for p in PUBLIC_PATHS), "^/schema"]
#: Seconds the service keeps the list of keys before reading it again (a key created or
#: revoked with the CLI takes effect within this time).
REFRESH_SECONDS = 2.0
#: Seconds the keys of the last good read stay in use while they cannot be read again (a
#: database outage); after that every request that needs them fails until a read succeeds.
#: Bounded: in a partial outage (this process cut off, another one reaching the database) a
#: key revoked meanwhile is not seen here.
KEEP_SECONDS = 300.0

log = logs.get("orchestra.auth")


class Gatekeeper:
    """Turns a request's Authorization header into a caller, from a cached copy of the keys."""

    def __init__(
        self,
        store: KeyStore,
        settings: AuthSettings,
        *,
        loopback: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.loopback = loopback
        self.clock = clock
        self._keys: dict[str, tuple[str, ApiKey]] = {}
        self._read_at = float("-inf")
        #: The read under way, which callers share and wait for a bounded time.
        self._reads = SharedReads(DATABASE_ANSWER_SECONDS)
        self._forgotten = 0  # how many times forget() was called
        self._good_at = float("-inf")  # when a read of the keys last succeeded
        #: Why the latest read failed while the copy is kept (None: the copy is current).
        self._outage: StorageError | None = None

    async def keys(self, bounded: bool = False) -> dict[str, tuple[str, ApiKey]]:
        """Active keys by id (digest, key), read again every :data:`REFRESH_SECONDS`.

        The requests that find the copy stale together wait for one read: under load, a
        read per request in flight would each cost a trip to the database. While the
        database cannot be read, the keys of the last good read stay in use for up to
        :data:`KEEP_SECONDS`, so what needs no database — ``/metrics``, ``/health`` — still
        answers the keys it answered; before the first read, or after that time, the
        outage's error reaches the caller. ``bounded`` (a probe's, a scrape's): a read that
        has not answered within :data:`~orchestra.shared_read.DATABASE_ANSWER_SECONDS` (a
        database that hangs) is such an outage for it (the read goes on; a liveness probe
        waited for the pool's minute). Other callers wait for the read: they need the
        database anyway.
        """
        if self.clock() - self._read_at > REFRESH_SECONDS:
            try:
                await self._reads.read(None, self._read, bounded=bounded)
            except Unanswered as exc:
                self._unread(StorageUnreachable(f"the API keys could not be read: {exc}"))
        return self._keys

    async def _read(self) -> None:
        forgotten = self._forgotten
        try:
            self._keys = await self.store.active_digests()
            self._good_at = self.clock()
            if self._outage is not None:
                log.info("auth.keys_read_again", keys=len(self._keys))
                self._outage = None
        except StorageError as exc:
            self._unread(exc)
        if forgotten == self._forgotten:  # else it may predate the change: read again
            self._read_at = self.clock()

    def _unread(self, exc: StorageError) -> None:
        """The keys could not be read: the copy stays in use if recent enough, else raise."""
        if self.clock() - self._good_at > KEEP_SECONDS:  # never read, or too long ago
            raise exc
        if self._outage is None:  # once an outage, not at every refresh
            log.warning("auth.keys_kept", error=exc.message, keys=len(self._keys))
        self._outage = exc

    def forget(self, revoked: str | None = None) -> None:
        """Read the keys again on the next request (a key was just made or revoked here),
        even when a read under way began before; a key ``revoked`` (its id) is out of the
        copy at once (a read that does not answer in time keeps the copy)."""
        self._forgotten += 1
        self._read_at = float("-inf")
        if revoked is not None:
            self._keys = {k: v for k, v in self._keys.items() if k != revoked}

    def holds(self, caller: Caller) -> bool | None:
        """Whether ``caller`` may still call, by the keys read at most
        :data:`REFRESH_SECONDS` ago; None when the copy is older (then :meth:`admits`)."""
        if self.clock() - self._read_at > REFRESH_SECONDS:
            return None
        return self._admitted(caller, self._keys)

    async def admits(self, caller: Caller) -> bool:
        """Whether ``caller`` (of a request that began earlier: an event stream) may still
        call: its key is not revoked; an anonymous one, that anonymous callers still may (no
        key was made since, or ``allow_anonymous``). While the keys cannot be read, the
        caller keeps what it had."""
        try:
            keys = await self.keys()
        except StorageError:
            return True
        return self._admitted(caller, keys)

    def _unsure(self) -> None:
        """Raise the outage's error while the copy of the keys is one kept through it."""
        if self._outage is not None:
            raise type(self._outage)(self._outage.message)

    def _admitted(self, caller: Caller, keys: dict[str, tuple[str, ApiKey]]) -> bool:
        if caller.key_id is not None:
            return caller.key_id in keys
        return self.settings.allow_anonymous or not keys

    def verified(self, authorization: str) -> str | None:
        """The id of the key an Authorization header holds, when it is an active key by the
        keys last read (for the rate limit, counted before the request is authenticated);
        None otherwise."""
        token, key_id = _presented(authorization)
        entry = self._keys.get(key_id) if key_id else None
        return key_id if entry is not None and matches(token, entry[0]) else None

    async def by_id(self, key_id: str) -> Caller | None:
        """The caller an active key stands for (a dashboard session), or None."""
        entry = (await self.keys()).get(key_id)
        if entry is None:
            return None
        key = entry[1]
        return Caller(key.name, key.scope, key.id)

    async def caller(
        self,
        authorization: str | None,
        host: str | None,
        proxied: bool,
        bounded: bool = False,
        reading: bool = False,
    ) -> Caller:
        """Who is calling; ``host`` is the request's Host header, ``proxied`` whether it
        carries a proxy's forwarding header (:func:`forwarded`): a proxy on this machine
        forwards others' requests, who are not this machine's own users. ``bounded``: see
        :meth:`keys`. ``reading`` (a scrape, a probe): while the keys cannot be read, a
        keyless caller on loopback is let through by the copy kept (no keys then) to read,
        rather than refused as unsure (a key may have been made since): what it reads is
        what tells an operator the database is down.

        Raises:
            Unauthorized: a key is given but is not a valid one, or none is given where one
                is needed.
            StorageError: the keys cannot be read, and the copy kept meanwhile cannot tell:
                a key it lacks may have been made since, the first one too.
        """
        keys = await self.keys(bounded)
        if authorization:
            token, key_id = _presented(authorization)
            entry = keys.get(key_id) if key_id else None
            if entry is None or not matches(token, entry[0]):
                if key_id is not None and entry is None:
                    self._unsure()  # a key made since the copy: the outage's 503, not a 401
                raise Unauthorized("the API key is not valid")
            key = entry[1]
            return Caller(key.name, key.scope, key.id)
        if self.settings.allow_anonymous:
            return Caller("anonymous", self.settings.anonymous_scope)
        if not keys and self.loopback and not proxied and _names_loopback(host):
            # No keys yet, on a loopback address: the machine's own users, as before keys.
            if reading:
                return Caller("anonymous", "read")
            self._unsure()  # the first key may have been made since: nothing is left open
            return Caller("anonymous", "admin")
        if not keys and self.loopback and proxied:
            raise Unauthorized(
                "an API key is required: this request came through a proxy (it carries "
                "Forwarded or X-Forwarded-For), and only this machine's own requests go "
                "without one; make a key with `orchestra keys create`"
            )
        raise Unauthorized("an API key is required: send it as 'Authorization: Bearer <key>'")


class StreamGate:
    """An event stream's caller, checked again while the stream lasts (it outlives its
    request): by the keys read lately, for the events written straight to the connection
    (:meth:`now`), and by the keys read again if need be, for those that go through the
    stream's own loop, heartbeats included (:meth:`still`)."""

    def __init__(self, gatekeeper: Gatekeeper, caller: Caller) -> None:
        self.gatekeeper = gatekeeper
        self.caller = caller

    def now(self) -> bool:
        """Admitted by the keys read lately (False too when the copy is old: the events
        then go the stream's own way, through :meth:`still`)."""
        return self.gatekeeper.holds(self.caller) is True

    async def still(self) -> bool:
        """Admitted still (the keys read again when old); False: end the stream."""
        if await self.gatekeeper.admits(self.caller):
            return True
        log.info("auth.stream_ended", key_id=self.caller.key_id, reason="key revoked")
        return False


#: Headers a proxy adds naming the client it forwards for.
FORWARDING = (b"forwarded", b"x-forwarded-for", b"x-real-ip")


def forwarded(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request carries a proxy's forwarding header: it came from elsewhere, whatever
    its peer address and Host (a proxy on this machine, as in the README's nginx example,
    connects from 127.0.0.1 and may pass Host on unchanged)."""
    return any(name in FORWARDING for name, _ in headers)


def credentials(
    connection: ASGIConnection[Any, Any, Any, Any],
) -> tuple[str | None, str | None, bool]:
    """The request's Authorization and Host headers (the first of each), and whether it was
    forwarded by a proxy; read straight from the scope: Litestar's ``Headers`` would decode
    every header first."""
    authorization = host = None
    proxied = False
    for name, value in connection.scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"host" and host is None:
            host = value.decode("latin-1")
        elif name in FORWARDING:
            proxied = True
    return authorization, host, proxied


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Sets ``request.user`` to the caller."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> Any:
        runtime = runtime_of(connection.scope)
        gatekeeper: Gatekeeper = runtime.gatekeeper
        handler = connection.scope["route_handler"]
        # A scrape must answer while the database hangs: its key check waits for the keys'
        # read a bounded time, and keeps the copy (what /metrics is for is to say "down").
        probe = bool(handler.opt.get(PROBE))
        if probe:  # the wait the key check takes counts against the probe's own
            connection.scope["state"][PROBE_BEGAN] = asyncio.get_running_loop().time()
        caller = await gatekeeper.caller(*credentials(connection), bounded=probe, reading=probe)
        method = str(connection.scope.get("method", "GET"))
        if (
            caller.key_id is None
            and method not in SAFE_METHODS
            and not same_origin(connection.headers, runtime.settings.cors.allow_origins)
        ):
            raise Forbidden(
                "a request from another site's web page may not act without an API key; "
                "send the request with a key ('Authorization: Bearer <key>')"
            )
        check_scope(caller, handler, method)
        return AuthenticationResult(user=caller, auth=None)


#: Methods that change nothing: a web page on another site may send them.
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def same_origin(headers: Headers, allowed: Collection[str] = ()) -> bool:
    """Whether a write request comes from this site's own pages, from a site ``allowed``
    (``[cors] allow_origins``: ``*`` for any), or from no web page at all (a program: curl,
    the client); not from another site's page in a browser."""
    origin = headers.get("origin")
    if origin is not None and (origin in allowed or "*" in allowed):
        return True
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")  # none: typed or bookmarked by the user
    if origin is None:
        return True  # not a browser's cross-site request: browsers send one of the two
    host = headers.get("x-forwarded-host") or headers.get("host")
    return origin != "null" and urlsplit(origin).netloc == host


def middleware(settings: AuthSettings, own_auth: tuple[str, ...] = ()) -> list[DefineMiddleware]:
    """Rate limiting (when set; outermost, so it also counts requests without a valid key),
    then authentication, both leaving out the public paths. Paths matching ``own_auth``
    (patterns: the dashboard's) authenticate their own way."""
    stack = [DefineMiddleware(ApiKeyMiddleware, exclude=[*PUBLIC, *own_auth])]
    limits = rate_limit(settings)
    if limits is not None:
        stack.insert(0, limits.middleware)
    return stack


async def public_caller(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller | None:
    """Who calls a public path (the middleware leaves those out): the caller the request's
    key, or its lack, makes, as on any other path; None where another path would answer 401
    (no key where one is needed, or a key that is not valid), or where the keys cannot be
    read now (a liveness check must still get its answer while the database is down)."""
    gatekeeper: Gatekeeper = runtime_of(connection.scope).gatekeeper
    try:
        return await gatekeeper.caller(*credentials(connection), bounded=True)
    except (Unauthorized, StorageError):
        return None


def check_scope(caller: Caller, handler: BaseRouteHandler, method: str) -> None:
    """Refuse (403) a caller whose scope is below what the route needs: its ``opt`` scope,
    else ``read`` for GET and HEAD, ``admin`` for anything else.

    The API's middleware checks it as it authenticates; the dashboard's routes, which
    authenticate their own way, through :func:`scope_guard`. (Not a guard for the API: Litestar
    copies the route handler for each guard of each request.)"""
    need: Scope = handler.opt.get("scope") or ("read" if method in ("GET", "HEAD") else "admin")
    if not allows(caller.scope, need):
        if caller.key_id is None:
            raise Forbidden(
                f"a request without an API key may only {caller.scope} here ([auth] "
                f"anonymous_scope); this one needs the {need} scope: send a key that has it"
            )
        raise Forbidden(f"this API key may not do this (it needs the {need} scope)")


async def scope_guard(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    """:func:`check_scope` for the caller a session made. (Async so Litestar calls it on the
    loop: a sync guard is run on a thread, a hop per request.)"""
    caller = connection.scope.get("user")
    if caller is None:  # an open page: the gate left it out
        return
    check_scope(caller, handler, str(connection.scope.get("method", "GET")))


@functools.lru_cache(maxsize=256)  # a service hears few Host names: parse each once
def _names_loopback(host: str | None) -> bool:
    """Whether a Host header names this machine (or is absent, as in HTTP/1.0).

    A web page on another site can make the browser send requests to 127.0.0.1 under its own
    name (DNS rebinding); such requests carry that name as Host, and must not be treated as
    the machine's own users.
    """
    if not host:
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return is_loopback(name)


def _presented(authorization: str) -> tuple[str, str | None]:
    """The token in an Authorization header, and its key id when it is a Bearer token
    shaped like ours."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token, key_id_of(token) if scheme.lower() == "bearer" else None


def _identify(request: Any) -> str:
    """Rate limits count per key; without a valid one, per client address (a made-up token
    naming a key's id must not spend that key's budget, nor get a budget of its own)."""
    authorization = request.headers.get("authorization")
    if authorization:
        key_id = runtime_of(request.scope).gatekeeper.verified(authorization)
        if key_id is not None:
            return f"key:{key_id}"
    client = request.client
    return f"addr:{client.host if client else 'unknown'}"


def rate_limit(settings: AuthSettings) -> RateLimitConfig | None:
    """Litestar's rate limiting, per key, when ``rate_limit_per_minute`` is set."""
    if not settings.rate_limit_per_minute:
        return None
    return RateLimitConfig(
        rate_limit=("minute", settings.rate_limit_per_minute),
        identifier_for_request=_identify,
        exclude=PUBLIC,
    )
