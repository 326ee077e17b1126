"""/health and /api/v1/models: the service's state and the models it can reach.

Provider URLs appear here only redacted (the providers' own details name them so; see
:mod:`orchestra.redact`), and /health shows providers, their models and the version only to
a caller with the read scope: anyone else (no key, once keys exist) sees the status and the
database's state, which is all a liveness check needs.

/health does no I/O of its own on most requests: providers are as the background watcher last
saw them, and the database's read check and free space as :class:`DatabaseCheck` last found
them, at most :data:`DATABASE_CHECK_SECONDS` ago (a load balancer probing many times a second
costs one ping a second). Writes are as the latest one went, always.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Annotated, Any, Literal, cast

from litestar import Request, Response, get, head
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import QueryParameter

from orchestra import __version__
from orchestra.api.auth import public_caller
from orchestra.api.openapi import error, errors
from orchestra.api.runtime import Runtime
from orchestra.api.schemas import HealthOut, ModelOut, ModelsOut, ProviderOut
from orchestra.api.scope import runtime_of
from orchestra.auth import allows
from orchestra.db import Database, schema
from orchestra.db.failures import DatabaseState, WriteFailure
from orchestra.errors import StorageError
from orchestra.llm.router import ProviderState
from orchestra.shared_read import DATABASE_ANSWER_SECONDS, SharedReads, Unanswered

#: Seconds /health reuses the database's read check and free space before checking again.
DATABASE_CHECK_SECONDS = 1.0

CheckNow = Annotated[
    Literal["now"] | None,
    QueryParameter(
        description="now: check every provider and the database before answering (else "
        "the last checks' results: the providers' made every [fallback] health_interval "
        "seconds, the database's at most a second old)."
    ),
]

ProvidersNow = Annotated[
    Literal["now"] | None,
    QueryParameter(
        description="now: check every provider before answering (else the last checks' "
        "results, made every [fallback] health_interval seconds)."
    ),
]


class DatabaseCheck:
    """The database's state for /health, checked again only when the last check is older than
    ``max_age`` seconds, or when the writes' outcome changed since (a write failing, or working
    again, shows at once). Requests that find the check stale together share one check."""

    def __init__(
        self,
        db: Database,
        min_free_mb: float,
        max_age: float = DATABASE_CHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wait: float = DATABASE_ANSWER_SECONDS,
    ) -> None:
        self._db = db
        self._min_free_mb = min_free_mb
        self._max_age = max_age
        self._clock = clock
        self._state: DatabaseState | None = None
        self._checked_at = float("-inf")
        #: The writes' failure as it was when the state was checked (None: writes worked).
        self._failure: WriteFailure | None = None
        self._checks = SharedReads(wait)

    async def state(self, now: bool = False) -> DatabaseState:
        """The database's state, as last checked if that is recent enough (``now``: no matter
        how recent), else checked now; "not answering" when the check has not ended within
        :data:`DATABASE_ANSWER_SECONDS` of its start (it goes on)."""
        if (
            not now
            and self._state is not None
            and self._db.writes.failure is self._failure
            and self._clock() - self._checked_at < self._max_age
        ):
            return self._state
        try:
            return await self._checks.read(None, self._check)
        except Unanswered as exc:
            self._db.unanswered.failed(exc)
            return DatabaseState(readable=False, ok=False, detail=f"error: {exc}")

    async def _check(self) -> DatabaseState:
        failure = self._db.writes.failure
        state = await self._db.state(self._min_free_mb)
        if state.readable:
            state = await self._same_schema(state)
        self._state, self._failure, self._checked_at = state, failure, self._clock()
        return state

    async def _same_schema(self, state: DatabaseState) -> DatabaseState:
        """``state``, unless a newer Orchestra upgraded the schema under this process: then
        degraded, saying so (its writes may no longer fit the tables)."""
        try:
            newer = await schema.newer_than_known(self._db)
        except StorageError:  # answered the ping a moment ago: the next check tells
            return state
        if newer is None:
            return state
        return DatabaseState(
            readable=True,
            ok=False,
            detail=f"error: schema version {newer} was written by a newer Orchestra; this "
            f"process knows {schema.LATEST}: upgrade it (or stop it)",
        )


#: One check per database (an app's database is opened anew each time its lifespan starts).
_checks: weakref.WeakKeyDictionary[Database, DatabaseCheck] = weakref.WeakKeyDictionary()


def _database_check(runtime: Runtime) -> DatabaseCheck:
    db = runtime.db
    check = _checks.get(db)
    if check is None:
        check = _checks[db] = DatabaseCheck(db, runtime.settings.database.min_free_mb)
    return check


async def _states(runtime: Runtime, check: str | None) -> list[ProviderState]:
    """Providers as last checked, or checked now."""
    if check == "now":
        return await runtime.router.refresh(asked=True)
    return runtime.router.states()


Probe = Annotated[
    Literal["live"] | None,
    QueryParameter(
        description="live: 200 as long as this process answers, whatever the database's state "
        "(a liveness probe's question; the body still says the state)."
    ),
]


@get(
    ["/health", "/api/v1/health"],
    tags=["health"],
    summary="Health",
    cache=False,
    responses={
        400: error(400),
        503: ResponseSpec(
            HealthOut, description="The database does not answer", generate_examples=False
        ),
    },
)
async def health(
    request: Request[Any, Any, Any], check: CheckNow = None, probe: Probe = None
) -> Response[HealthOut]:
    """The database's state (reads and free space as checked at most a second ago; writes as
    the latest one went), each provider's as the background checks last saw it
    (``checked_at``), and the version. ``?check=now`` checks the providers and the database
    first.

    200 while the database answers reads: "degraded" while writes fail, its disk is low or no
    provider is available; 503 ("down") when it does not answer. ``?probe=live`` answers 200
    whatever the database's state (the body says it): a liveness probe asks whether this
    process answers, and a restart would not cure a database outage.

    Open to all, but ``providers`` and ``version`` are shown only to a caller with the read
    scope (as every other GET needs); without it (no key, or a wrong one, once keys exist)
    the answer is ``status`` and ``database`` alone, and ``?check=now`` is not honoured.
    """
    return await _answer(request, check, probe)


async def _answer(
    request: Request[Any, Any, Any], check: CheckNow, probe: Probe
) -> Response[HealthOut]:
    """GET /health's answer (HEAD's too, whose body the server leaves out)."""
    # The runtime read from the scope, not as a dependency: resolving one took a quarter of
    # this handler's CPU, and load balancers ask many times a second.
    runtime: Runtime = runtime_of(request.scope)
    caller = await public_caller(request)
    detailed = caller is not None and allows(caller.scope, "read")
    check_now = detailed and check == "now"
    database = await _database_check(runtime).state(now=check_now)
    states = await _states(runtime, check if detailed else None)
    # Built without workers too (cancels go through it), but then it claims nothing.
    pool = runtime.pool if runtime.settings.server.workers else None
    claims_ok = pool is None or pool.health.ok
    if not database.readable:
        status = "down"
    elif database.ok and claims_ok and any(s.available for s in states):
        status = "ok"
    else:
        status = "degraded"
    body = HealthOut(
        status=status,
        database=database.detail if detailed else _in_short(database.detail),
        workers=pool.health.detail if pool is not None and detailed else None,
        providers={s.name: ProviderOut.of(s) for s in states} if detailed else None,
        version=__version__ if detailed else None,
    )
    return Response(body, status_code=_status_code(database, probe))


@head(
    ["/health", "/api/v1/health"],
    tags=["health"],
    summary="Health, headers only",
    responses={
        400: error(400),
        503: ResponseSpec(None, description="The database does not answer"),
    },
)
async def health_head(request: Request[Any, Any, Any], probe: Probe = None) -> Response[None]:
    """``GET /health``'s status code and headers (its ``Content-Length`` included) without
    its body, for uptime monitors that ask with HEAD: 200 while the database answers reads
    (or ``?probe=live``), else 503."""
    # GET's answer itself: HTTP's HEAD sends GET's headers, and the server (uvicorn) leaves
    # out the body of an answer to HEAD. Litestar wants a HEAD handler to say it has none.
    answer: Any = await _answer(request, None, probe)
    return cast("Response[None]", answer)


def _status_code(database: DatabaseState, probe: Probe) -> int:
    """200 while the database answers reads, or for a liveness probe whatever its state
    (a restart does not cure a database outage); else 503."""
    return 200 if database.readable or probe == "live" else 503


@get(
    "/api/v1/models",
    tags=["models"],
    summary="Models and providers",
    cache=False,
    responses=errors(400),
)
async def models(runtime: NamedDependency[Runtime], check: ProvidersNow = None) -> ModelsOut:
    """Every logical model name with its fallback chain and the entry that would serve it now,
    and every provider with its availability and the models it reports, as the background
    checks last saw them (``?check=now`` checks first)."""
    router = runtime.router
    states = await _states(runtime, check)
    out = []
    for name, chain in router.chains().items():
        serves, unavailable = router.serving(name)
        out.append(ModelOut(name=name, chain=chain, serves=serves, unavailable=unavailable))
    return ModelsOut(models=out, providers=[ProviderOut.of(s) for s in states])


def _in_short(detail: str) -> str:
    """The database's state for a caller without the read scope: ``ok``, ``low disk`` or
    ``error``, never the message behind it (it names the file, or the server's host, port
    and database)."""
    if detail == "ok":
        return "ok"
    return "low disk" if detail.startswith("low disk") else "error"
