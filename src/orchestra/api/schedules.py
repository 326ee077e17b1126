"""/api/v1/schedules: create, list, read (next ticks, latest tasks), change, delete, run now.

A schedule is named in a path by its id or its name (names are words, never numbers).
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from orchestra.api.openapi import errors
from orchestra.api.runtime import Runtime
from orchestra.api.schemas import StrictBodyRequest
from orchestra.api.scope import location
from orchestra.auth import Caller
from orchestra.domain import first_page
from orchestra.scheduler import ScheduleService
from orchestra.schedules import NAME_PATTERN, ScheduleChanges, ScheduleSpec
from orchestra.wire.schedules import FireOut as FireOut
from orchestra.wire.schedules import ScheduleList as ScheduleList
from orchestra.wire.schedules import ScheduleOut as ScheduleOut
from orchestra.wire.schemas import TaskOut


def provide(runtime: NamedDependency[Runtime]) -> ScheduleService:
    """The ``schedules`` dependency of the handlers."""
    return runtime.schedules


class ScheduleController(Controller):
    """Schedules: a template submitted on a cron expression or every so often."""

    path = "/api/v1/schedules"
    tags = ["schedules"]

    @post(
        "/",
        opt={"scope": "submit"},
        status_code=201,
        summary="Create a schedule",
        request_class=StrictBodyRequest,
        responses=errors(400, 404, 409, 413, 422, 507),
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[ScheduleSpec],
        schedules: NamedDependency[ScheduleService],
    ) -> Response[ScheduleOut]:
        """Check the schedule (its timing; its template and parameters as a submit would be)
        and store it. 400 naming a bad cron, every or timezone; 404 for an unknown template;
        422 naming every bad parameter; 409 when the name is taken."""
        made = await schedules.create(data)
        return Response(
            ScheduleOut.of(made),
            status_code=201,
            headers={"Location": location(request, f"{self.path}/{made.id}")},
        )

    @get("/", summary="List schedules", responses=errors(400))
    async def list_schedules(
        self,
        schedules: NamedDependency[ScheduleService],
        limit: Annotated[int, QueryParameter(ge=1, le=500, description="Page size.")] = 100,
        cursor: Annotated[
            str | None,
            QueryParameter(pattern=NAME_PATTERN, description="next_cursor of the previous page."),
        ] = None,
    ) -> ScheduleList:
        """Schedules by name, with their next ticks, a page at a time."""
        page, last = first_page(await schedules.list(cursor, limit + 1), limit)
        return ScheduleList([ScheduleOut.of(s) for s in page], last.name if last else None)

    @get("/{ref:str}", summary="Get a schedule", responses=errors(404))
    async def get_schedule(
        self, ref: FromPath[str], schedules: NamedDependency[ScheduleService]
    ) -> ScheduleOut:
        """A schedule (by id or name) with its next 5 ticks and its latest 10 ticks, each
        with the task it made."""
        view = await schedules.view(ref)
        return ScheduleOut.of(view.schedule, view)

    @post(
        "/{ref:str}/run",
        opt={"scope": "submit"},
        status_code=201,
        summary="Run a schedule's task now",
        responses=errors(404, 422, 507),
    )
    async def run_now(
        self,
        request: Request[Caller, Any, Any],
        ref: FromPath[str],
        schedules: NamedDependency[ScheduleService],
    ) -> Response[TaskOut]:
        """Submit the task a tick would, now (paused or not): not a tick, so its ticks and
        its next tick stay as they are. 404 for an unknown schedule or a template gone since;
        422 naming each parameter that no longer fits."""
        task = await schedules.run_now(ref, key_id=request.user.key_id)
        return Response(
            TaskOut.of(task),
            status_code=201,
            headers={"Location": location(request, f"/api/v1/tasks/{task.id}")},
        )

    @patch(
        "/{ref:str}",
        opt={"scope": "submit"},
        summary="Change a schedule",
        request_class=StrictBodyRequest,
        responses=errors(400, 404, 409, 413, 422, 507),
    )
    async def change(
        self,
        ref: FromPath[str],
        data: JSONBody[ScheduleChanges],
        schedules: NamedDependency[ScheduleService],
    ) -> ScheduleOut:
        """Change the fields given (``{"enabled": false}`` pauses), checked as a new schedule
        is. Giving ``cron`` drops ``every`` and the other way round. A schedule declared in
        the settings can only be paused and resumed here (409); that stands across starts."""
        return ScheduleOut.of(await schedules.update(ref, data))

    @delete(
        "/{ref:str}",
        opt={"scope": "submit"},
        status_code=204,
        summary="Delete a schedule",
        responses=errors(404, 409, 507),
    )
    async def delete_schedule(
        self, ref: FromPath[str], schedules: NamedDependency[ScheduleService]
    ) -> None:
        """Delete a schedule; the tasks it made stay. 409 for one declared in
        orchestra.toml (remove it there)."""
        await schedules.delete(ref)
