"""/api/v1/schedules: create, list, read (next ticks, latest tasks), change, delete.

A schedule is named in a path by its id or its name (names are words, never numbers).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Response, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from orchestra.api.openapi import errors
from orchestra.api.runtime import Runtime
from orchestra.db.schedules import Fire
from orchestra.scheduler import ScheduleService, ScheduleView
from orchestra.schedules import CatchUp, Overlap, Schedule, ScheduleChanges, ScheduleSpec, Source


class FireOut(msgspec.Struct, frozen=True):
    """One tick of a schedule: ``submitted`` made ``task_id`` (``task_status`` is its status
    now; null once the task is deleted); ``skipped``: the previous task was unfinished;
    ``failed``: no task could be made (``error`` says why)."""

    fire_at: str
    outcome: str
    task_id: int | None
    task_status: str | None
    error: str | None

    @classmethod
    def of(cls, fire: Fire) -> FireOut:
        return cls(fire.fire_at, fire.outcome, fire.task_id, fire.task_status, fire.error)


class ScheduleOut(msgspec.Struct, frozen=True):
    """A schedule. ``next_fire_at`` is its next tick (null while paused); a single schedule's
    answer also has its next ticks and its latest ticks with their tasks, newest first."""

    id: int
    name: str
    template: str
    params: dict[str, Any]
    model: str | None
    priority: int
    options: dict[str, Any]
    cron: str | None
    timezone: str
    every: str | None
    enabled: bool
    overlap: Overlap
    catch_up: CatchUp
    source: Source
    next_fire_at: str | None
    created_at: str
    updated_at: str
    next_fire_times: list[str] | None = None
    last_tasks: list[FireOut] | None = None

    @classmethod
    def of(cls, s: Schedule, view: ScheduleView | None = None) -> ScheduleOut:
        spec = s.spec
        return cls(
            id=s.id,
            name=spec.name,
            template=spec.template,
            params=spec.params,
            model=spec.model,
            priority=spec.priority,
            options=msgspec.structs.asdict(spec.options),
            cron=spec.cron,
            timezone=spec.timezone,
            every=spec.every,
            enabled=spec.enabled,
            overlap=spec.overlap,
            catch_up=spec.catch_up,
            source=s.source,
            next_fire_at=s.next_fire_at,
            created_at=s.created_at,
            updated_at=s.updated_at,
            next_fire_times=None if view is None else view.next_times,
            last_tasks=None if view is None else [FireOut.of(f) for f in view.fires],
        )


class ScheduleList(msgspec.Struct, frozen=True):
    """Every schedule, by name."""

    items: list[ScheduleOut]


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
        responses=errors(400, 404, 409, 413, 422, 507),
    )
    async def create(
        self, data: JSONBody[ScheduleSpec], schedules: NamedDependency[ScheduleService]
    ) -> Response[ScheduleOut]:
        """Check the schedule (its timing; its template and parameters as a submit would be)
        and store it. 400 naming a bad cron, every or timezone; 404 for an unknown template;
        422 naming every bad parameter; 409 when the name is taken."""
        made = await schedules.create(data)
        return Response(
            ScheduleOut.of(made), status_code=201, headers={"Location": f"{self.path}/{made.id}"}
        )

    @get("/", summary="List schedules", responses=errors())
    async def list_schedules(self, schedules: NamedDependency[ScheduleService]) -> ScheduleList:
        """Every schedule, by name, with its next tick."""
        return ScheduleList(items=[ScheduleOut.of(s) for s in await schedules.list()])

    @get("/{ref:str}", summary="Get a schedule", responses=errors(404))
    async def get_schedule(
        self, ref: FromPath[str], schedules: NamedDependency[ScheduleService]
    ) -> ScheduleOut:
        """A schedule (by id or name) with its next 5 ticks and its latest 10 ticks, each
        with the task it made."""
        view = await schedules.view(ref)
        return ScheduleOut.of(view.schedule, view)

    @patch(
        "/{ref:str}",
        opt={"scope": "submit"},
        summary="Change a schedule",
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
        orchestra.toml can only be paused and resumed here (409), until the next start."""
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
