"""The overview page, the live signal every page listens to, and the providers page."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.params import QueryParameter
from litestar.response import Redirect, ServerSentEvent, ServerSentEventMessage, Template

from orchestra import metrics
from orchestra.api.scope import runtime_of
from orchestra.db.overview import Changes
from orchestra.domain import now
from orchestra.web import views
from orchestra.web.access import live_stream
from orchestra.web.render import links, page

#: A live page is told at most this often that tasks changed.
CHANGED_EVERY = 1.0
#: Without a change in this process, the counts and newest event are compared this often
#: (other processes' work).
LOOK_EVERY = 5.0


def seen_of(changes: Changes) -> str:
    """The tasks' counts by status and the newest event's id, as a page names what it shows
    to its live stream."""
    counts = changes.counts
    told = ".".join(f"{status}-{counts[status]}" for status in sorted(counts))
    return f"{told}.event-{changes.newest_event}"


async def _overview(request: Request[Any, Any, Any]) -> dict[str, Any]:
    runtime = runtime_of(request.scope)
    at = now()
    data = await runtime.dashboard.overview(at)
    pool = runtime.pool
    return {
        "data": data,
        "chart": views.chart(data.per_minute),
        "queued_for": views.age(data.oldest_queued_at, at),
        # Queued and due: what waits for a worker now (the rest wait for their time).
        "ready": max(0, data.counts.get("queued", 0) - data.scheduled),
        # Every process's and host's, from the database's counters.
        "running": data.counts.get("running", 0),
        "slots": _slots(
            runtime.settings.workers.concurrency if runtime.settings.server.workers else 0, pool
        ),
        "providers": runtime.router.states(),
        "seen": seen_of(Changes(counts=data.counts, newest_event=data.newest_event)),
    }


def _slots(concurrency: int, pool: Any) -> dict[str, Any]:
    """The worker slots this page can see: of every process of this host (several processes
    share a metrics folder), else of this process; ``where`` says which."""
    here = metrics.host_slots()
    if here is not None:
        where = f"this host's {here.processes} worker processes" if here.processes else None
        return {"busy": here.busy, "total": here.total, "where": where}
    busy = pool.running if pool is not None else 0
    return {"busy": busy, "total": concurrency, "where": "this process" if concurrency else None}


async def _providers(request: Request[Any, Any, Any], states: list[Any]) -> Template:
    """The providers page, showing ``states``."""
    router = runtime_of(request.scope).router
    chains = []
    for name, chain in router.chains().items():
        serves, unavailable = router.serving(name)
        chains.append({"name": name, "chain": chain, "serves": serves, "why": unavailable})
    return page(request, "providers.html", section="providers", chains=chains, providers=states)


class OverviewPages(Controller):
    """Overview, providers, and the live signal."""

    @get("/", name="ui.overview")
    async def overview(self, request: Request[Any, Any, Any]) -> Template:
        """Counts, throughput, queue, workers, providers and recent failures."""
        return page(request, "overview.html", section="overview", **await _overview(request))

    @get("/overview/body")
    async def overview_body(self, request: Request[Any, Any, Any]) -> Template:
        """The overview's content alone (what the live view swaps in)."""
        return page(request, "_overview_body.html", **await _overview(request))

    @get("/providers")
    async def providers(self, request: Request[Any, Any, Any]) -> Template:
        """Model chains, the entry serving each now, and every provider's last check."""
        router = runtime_of(request.scope).router
        return await _providers(request, router.states())

    @get("/providers/check")
    async def check_page(self, request: Request[Any, Any, Any]) -> Redirect:
        """No page of its own: the providers."""
        return Redirect(links(request).ui("/providers"), status_code=303)

    @post("/providers/check", status_code=200, opt={"scope": "read"})
    async def check_providers(self, request: Request[Any, Any, Any]) -> Template:
        """Check every provider now, then show them (a POST: it has effects, e.g. clearing a
        provider's "down" mark, so no link or image on another site can trigger it)."""
        router = runtime_of(request.scope).router
        return await _providers(request, await router.refresh(asked=True))

    @get("/live", name="ui.live")
    async def live(
        self,
        request: Request[Any, Any, Any],
        seen: Annotated[str | None, QueryParameter(max_length=200)] = None,
    ) -> ServerSentEvent:
        """``changed`` events when tasks change (at most every second): live parts of a page
        fetch themselves again on it. Ends after a while; the browser reconnects. ``seen``:
        the counts and newest event the page shows (:func:`seen_of`); others when the stream
        starts (a change between the page and its stream) are a change at once. Each event's
        id is what it tells of: a stream the browser reconnects (Last-Event-ID), or a hidden
        tab opens again (``seen``), is told of a change only if there was one since."""
        runtime = runtime_of(request.scope)
        signals = runtime.tasks.signals
        told = request.headers.get("last-event-id")
        if told and len(told) <= 200:
            seen = told

        def told_of(changes: Changes) -> ServerSentEventMessage:
            return ServerSentEventMessage(
                event="changed", data=str(sum(changes.counts.values())), id=seen_of(changes)
            )

        async def stream() -> AsyncIterator[ServerSentEventMessage]:
            loop = asyncio.get_running_loop()
            last = await runtime.dashboard.changes()
            if seen is not None and seen != seen_of(last):
                yield told_of(last)
            with signals.watch_all() as changed:
                while True:
                    try:
                        async with asyncio.timeout(LOOK_EVERY):
                            await changed.wait()
                    except TimeoutError:
                        if await runtime.dashboard.changes() == last:
                            # A comment alone (Litestar adds an empty `data:` line,
                            # which the browser would dispatch as a message, unless None).
                            yield ServerSentEventMessage(comment="keep-alive", data=None)
                            continue
                    if signals.stopping:  # it woke us: the page reconnects elsewhere
                        return
                    started = loop.time()
                    last = await runtime.dashboard.changes()
                    yield told_of(last)
                    changed.clear()
                    await asyncio.sleep(max(0.0, CHANGED_EVERY - (loop.time() - started)))

        return live_stream(request, stream())
