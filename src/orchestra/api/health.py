"""/health and /api/v1/models: the service's state and the models it can reach."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec

from orchestra import __version__, logs
from orchestra.api.openapi import errors
from orchestra.api.runtime import Runtime
from orchestra.api.schemas import HealthOut, ModelOut, ModelsOut, ProviderOut

log = logs.get("orchestra.api")


@get(
    ["/health", "/api/v1/health"],
    tags=["health"],
    summary="Health",
    cache=False,
    responses={
        503: ResponseSpec(
            HealthOut, description="The database does not answer", generate_examples=False
        )
    },
)
async def health(runtime: NamedDependency[Runtime]) -> Response[HealthOut]:
    """The database's and each provider's state (checked now), and the version.

    200 while the database answers ("degraded" when no provider is available), 503 when it
    does not.
    """
    try:
        await runtime.db.ping()
        database = "ok"
    except Exception as exc:
        log.warning("health.database_failed", error=str(exc))
        database = f"error: {type(exc).__name__}"
    states = await runtime.router.refresh()
    ok = database == "ok"
    body = HealthOut(
        status=("ok" if any(s.available for s in states) else "degraded") if ok else "down",
        database=database,
        providers={s.name: ProviderOut.of(s) for s in states},
        version=__version__,
    )
    return Response(body, status_code=200 if ok else 503)


@get(
    "/api/v1/models",
    tags=["models"],
    summary="Models and providers",
    cache=False,
    responses=errors(),
)
async def models(runtime: NamedDependency[Runtime]) -> ModelsOut:
    """Every logical model name with its fallback chain and the entry that would serve it now,
    and every provider with its availability and the models it reports (checked now)."""
    router = runtime.router
    states = await router.refresh()
    out = []
    for name, chain in router.chains().items():
        serving = [str(r) for r in router.routes(name) if router.available(r)] if chain else []
        out.append(ModelOut(name=name, chain=chain, serves=serving[0] if serving else None))
    return ModelsOut(models=out, providers=[ProviderOut.of(s) for s in states])
