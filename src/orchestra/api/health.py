"""/health: 200 while the database answers, even when the model server does not."""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency

from orchestra import __version__, logs
from orchestra.api.runtime import Runtime
from orchestra.api.schemas import HealthOut

log = logs.get("orchestra.api")


@get(["/health", "/api/v1/health"], tags=["health"], summary="Health", cache=False)
async def health(runtime: NamedDependency[Runtime]) -> Response[HealthOut]:
    """The database's and the model server's state, and the version."""
    try:
        await runtime.db.ping()
        database = "ok"
    except Exception as exc:
        log.warning("health.database_failed", error=str(exc))
        database = f"error: {type(exc).__name__}"
    model = await runtime.provider.health()
    ok = database == "ok"
    body = HealthOut(
        status=("ok" if model.ok else "degraded") if ok else "down",
        database=database,
        ollama=model.detail,
        version=__version__,
    )
    return Response(body, status_code=200 if ok else 503)
