"""/health and /api/v1/models: the service's state and the models it can reach.

Provider URLs appear here only redacted (the providers' own details name them so; see
:mod:`orchestra.redact`), and /health shows providers, their models and the version only to
a caller with the read scope: anyone else (no key, once keys exist) sees the status and the
database's state, which is all a liveness check needs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import Parameter

from orchestra import __version__
from orchestra.api.auth import public_caller
from orchestra.api.openapi import error, errors
from orchestra.api.runtime import Runtime
from orchestra.api.schemas import HealthOut, ModelOut, ModelsOut, ProviderOut
from orchestra.auth import allows
from orchestra.llm.router import ProviderState

CheckNow = Annotated[
    Literal["now"] | None,
    Parameter(
        description="now: check every provider before answering (else the background "
        "checks' last results, made every [fallback] health_interval seconds)."
    ),
]


async def _states(runtime: Runtime, check: str | None) -> list[ProviderState]:
    """Providers as last checked, or checked now."""
    if check == "now":
        return await runtime.router.refresh()
    return runtime.router.states()


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
    request: Request[Any, Any, Any], runtime: NamedDependency[Runtime], check: CheckNow = None
) -> Response[HealthOut]:
    """The database's state (reads checked now; writes as the latest one went; free space),
    each provider's as the background checks last saw it (``checked_at``; ``?check=now``
    checks them first), and the version.

    200 while the database answers reads: "degraded" while writes fail, its disk is low or no
    provider is available; 503 ("down") when it does not answer.

    Open to all, but ``providers`` and ``version`` are shown only to a caller with the read
    scope (as every other GET needs); without it (no key, or a wrong one, once keys exist)
    the answer is ``status`` and ``database`` alone, and ``?check=now`` is not honoured.
    """
    caller = await public_caller(request)
    detailed = caller is not None and allows(caller.scope, "read")
    database = await runtime.db.state(runtime.settings.database.min_free_mb)
    states = await _states(runtime, check if detailed else None)
    if not database.readable:
        status = "down"
    elif database.ok and any(s.available for s in states):
        status = "ok"
    else:
        status = "degraded"
    body = HealthOut(
        status=status,
        database=database.detail,
        providers={s.name: ProviderOut.of(s) for s in states} if detailed else None,
        version=__version__ if detailed else None,
    )
    return Response(body, status_code=200 if database.readable else 503)


@get(
    "/api/v1/models",
    tags=["models"],
    summary="Models and providers",
    cache=False,
    responses=errors(400),
)
async def models(runtime: NamedDependency[Runtime], check: CheckNow = None) -> ModelsOut:
    """Every logical model name with its fallback chain and the entry that would serve it now,
    and every provider with its availability and the models it reports, as the background
    checks last saw them (``?check=now`` checks first)."""
    router = runtime.router
    states = await _states(runtime, check)
    out = []
    for name, chain in router.chains().items():
        serving = [str(r) for r in router.routes(name) if router.available(r)] if chain else []
        out.append(ModelOut(name=name, chain=chain, serves=serving[0] if serving else None))
    return ModelsOut(models=out, providers=[ProviderOut.of(s) for s in states])
