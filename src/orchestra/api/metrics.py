"""GET /metrics: Prometheus's text format (the series are defined in :mod:`orchestra.metrics`).

Served by every process, the workers-only ones (``--no-api``) too: those are what an operator
scrapes to watch the queue. It needs the read scope, as every GET does, unless ``[metrics]
public = true`` (:func:`open_paths`). Not in the OpenAPI document: it is Prometheus's format,
not the JSON API.
"""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

from litestar import Request, Response, get

from orchestra import metrics
from orchestra.api.auth import PROBE, PROBE_BEGAN
from orchestra.api.runtime import Runtime
from orchestra.api.scope import runtime_of
from orchestra.config import Settings
from orchestra.errors import StorageError
from orchestra.shared_read import DATABASE_ANSWER_SECONDS, Unanswered

PATH = "/metrics"


def open_paths(settings: Settings) -> tuple[str, ...]:
    """Path patterns the API's key check leaves out for /metrics (``[metrics] public``)."""
    return ("^/metrics$",) if settings.metrics.public else ()


@get(PATH, cache=False, include_in_schema=False, opt={PROBE: True})
async def scrape(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Every series: those this service recorded (every process's, with several) and those
    read now: tasks by status from the database's counters, whether its writes succeed,
    providers as last checked. While the database does not answer (within
    :data:`~orchestra.shared_read.DATABASE_ANSWER_SECONDS`), the tasks gauge is left out and
    the rest is served."""
    runtime: Runtime = runtime_of(request.scope)
    counts: dict[str, int] | None
    began = request.scope["state"].get(PROBE_BEGAN)
    # Within the scrape's own wait, the key check's included: two reads of a hung database
    # one after the other took twice as long.
    left = (
        None
        if began is None
        else DATABASE_ANSWER_SECONDS - (asyncio.get_running_loop().time() - began)
    )
    try:
        counts = await runtime.scraped_counts.read(None, runtime.dashboard.counts, within=left)
    except (StorageError, Unanswered) as exc:
        runtime.unscraped.failed(exc)
        counts = None
    else:
        runtime.unscraped.succeeded()
    providers = [(s.name, s.kind, s.available) for s in runtime.router.states()]
    # The writes' outcome /health reports: a read answers while every write is refused.
    writable = runtime.db.writes.failure is None and runtime.db.replaced() is None
    # Other processes' wake-ups (PostgreSQL's LISTEN); SQLite's need no connection.
    listening = runtime.db.listening if runtime.db.notifies else None
    body = metrics.exposition(counts, providers, writable, listening)
    if _accepts_gzip(request.headers.get("accept-encoding", "")):  # Prometheus asks for it
        packed = gzip.compress(body, compresslevel=6)
        headers = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        return Response(packed, media_type=metrics.CONTENT_TYPE, headers=headers)
    return Response(body, media_type=metrics.CONTENT_TYPE, headers={"Vary": "Accept-Encoding"})


def _accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding names gzip, and not with ``q=0``."""
    for part in accept_encoding.lower().split(","):
        coding, _, params = part.partition(";")
        if coding.strip() != "gzip":
            continue
        quality = params.strip()
        if not quality.startswith("q="):
            return True
        try:
            return float(quality[2:]) > 0
        except ValueError:
            return True
    return False
