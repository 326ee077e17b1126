"""Schedules: the list (each with its next tick and its latest one), one schedule (its next
ticks and the tasks its latest ticks made), pausing and resuming, running its task now."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from litestar import Controller, Request, get, post
from litestar.params import FromPath
from litestar.response import Redirect, Template

from orchestra.api.scope import runtime_of
from orchestra.domain import now
from orchestra.errors import InvalidRequest, NotFoundError
from orchestra.scheduler import told
from orchestra.schedules import Schedule, ScheduleChanges
from orchestra.web.render import caller_of, links, page
from orchestra.web.views import until

#: How many of a schedule's latest ticks its page shows.
FIRES_SHOWN = 20


def timing(schedule: Schedule) -> str:
    """When a schedule fires, in words: ``cron 0 9 * * 1-5 (Europe/Paris)`` or ``every 5m``."""
    spec = schedule.spec
    if spec.cron is not None:
        return f"cron {spec.cron} ({spec.timezone})"
    return f"every {spec.every}"


class SchedulePages(Controller):
    """The schedules, read by anyone who may read; paused and resumed with the submit scope
    (as the API's ``PATCH {"enabled": …}``)."""

    path = "/schedules"

    @get("/", name="ui.schedules")
    async def schedules(self, request: Request[Any, Any, Any]) -> Template:
        """Every schedule, by name, with its next tick and its latest."""
        service = runtime_of(request.scope).schedules
        items = await service.list()
        latest = await service.latest_fires()
        moment = now()
        return page(
            request,
            "schedules.html",
            section="schedules",
            rows=[
                {
                    "s": s,
                    "timing": timing(s),
                    "next_in": until(s.next_fire_at, moment),
                    "last": latest.get(s.id),
                }
                for s in items
            ],
        )

    @get("/{ref:str}", name="ui.schedule")
    async def schedule(self, request: Request[Any, Any, Any], ref: FromPath[str]) -> Template:
        """One schedule: what it submits and when, its next ticks, its latest ticks' tasks."""
        return await _page(request, ref)

    @get("/{ref:str}/body")
    async def body(self, request: Request[Any, Any, Any], ref: FromPath[str]) -> Template:
        """A schedule's page without its frame (what the live page swaps in)."""
        return await _page(request, ref, page_name="_schedule_body.html")

    @get(["/{ref:str}/pause", "/{ref:str}/resume", "/{ref:str}/run"])
    async def form_page(self, request: Request[Any, Any, Any], ref: FromPath[str]) -> Redirect:
        """No page of their own (the forms POST): the schedule's page."""
        return Redirect(links(request).ui(f"/schedules/{quote(ref, safe='')}"), status_code=303)

    @post("/{ref:str}/run", opt={"scope": "submit"}, status_code=303)
    async def run_now(
        self, request: Request[Any, Any, Any], ref: FromPath[str]
    ) -> Redirect | Template:
        """Submit the schedule's task now (not a tick) and show it; a template that no longer
        allows it is said on the schedule's page."""
        service = runtime_of(request.scope).schedules
        schedule = await service.get(ref)
        caller = caller_of(request)
        try:
            task = await service.run_now(str(schedule.id), key_id=caller.key_id if caller else None)
        except (InvalidRequest, NotFoundError) as exc:
            return await _page(
                request, str(schedule.id), status_code=422, error=f"Not run: {told(exc)}"
            )
        return Redirect(links(request).ui(f"/tasks/{task.id}"), status_code=303)

    @post("/{ref:str}/pause", opt={"scope": "submit"}, status_code=303)
    async def pause(
        self, request: Request[Any, Any, Any], ref: FromPath[str]
    ) -> Redirect | Template:
        """Pause a schedule: no tick fires until it is resumed."""
        return await _enable(request, ref, False)

    @post("/{ref:str}/resume", opt={"scope": "submit"}, status_code=303)
    async def resume(
        self, request: Request[Any, Any, Any], ref: FromPath[str]
    ) -> Redirect | Template:
        """Resume a schedule: checked as the API checks it (its template may have changed),
        its next tick counted from now."""
        return await _enable(request, ref, True)


async def _page(
    request: Request[Any, Any, Any],
    ref: str,
    *,
    status_code: int = 200,
    error: str = "",
    page_name: str = "schedule.html",
) -> Template:
    """A schedule's page; ``error``: why a change asked for from it was refused."""
    view = await runtime_of(request.scope).schedules.view(ref, fires=FIRES_SHOWN)
    s = view.schedule
    return page(
        request,
        page_name,
        status_code=status_code,
        section="schedules",
        s=s,
        timing=timing(s),
        next_in=until(s.next_fire_at, now()),
        next_times=view.next_times,
        timing_error=view.timing_error,
        fires=view.fires,
        error=error,
    )


async def _enable(request: Request[Any, Any, Any], ref: str, enabled: bool) -> Redirect | Template:
    """Pause or resume; a resume the schedule's template no longer allows (it was deleted, or
    the parameters no longer fit) is said on the schedule's page."""
    service = runtime_of(request.scope).schedules
    schedule = await service.get(ref)  # a 404 for the schedule itself is the error page
    try:
        changed = await service.update(str(schedule.id), ScheduleChanges(enabled=enabled))
    except (InvalidRequest, NotFoundError) as exc:
        said = "Not resumed" if enabled else "Not paused"
        return await _page(request, str(schedule.id), status_code=422, error=f"{said}: {told(exc)}")
    return Redirect(links(request).ui(f"/schedules/{changed.id}"), status_code=303)
