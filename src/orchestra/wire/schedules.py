"""The answers of ``/api/v1/schedules``: a schedule with its next and latest ticks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from orchestra.schedules import CatchUp, Overlap, Schedule, Source

if TYPE_CHECKING:  # the server's types, for the constructors only
    from orchestra.db.schedules import Fire
    from orchestra.scheduler import ScheduleView


class FireOut(msgspec.Struct, frozen=True):
    """One tick of a schedule: ``submitted`` made ``task_id`` (``task_status`` is its status
    now; null once the task is deleted); ``skipped``: the previous task was unfinished
    (``error`` names it); ``failed``: no task could be made (``error`` says why)."""

    fire_at: str
    outcome: str
    task_id: int | None
    task_status: str | None
    error: str | None

    @classmethod
    def of(cls, fire: Fire) -> FireOut:
        return cls(fire.fire_at, fire.outcome, fire.task_id, fire.task_status, fire.error)


class ScheduleOut(msgspec.Struct, frozen=True, omit_defaults=True):
    """A schedule. ``next_fire_at`` is its next tick (null while paused); a single schedule's
    answer also has its next ticks and its latest ticks with their tasks, newest first
    (``next_fire_times`` and ``last_tasks``: left out of the other answers, which do not
    compute them). ``timing_error``, in a single schedule's answer only when there is one:
    why this host cannot compute its ticks (its time zone or cron expression); then
    ``next_fire_times`` is empty, and each tick fails and is tried again a minute later."""

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
    timing_error: str | None = None

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
            every=None if spec.every is None else str(spec.every),
            enabled=spec.enabled,
            overlap=spec.overlap,
            catch_up=spec.catch_up,
            source=s.source,
            next_fire_at=s.next_fire_at,
            created_at=s.created_at,
            updated_at=s.updated_at,
            next_fire_times=None if view is None else view.next_times,
            last_tasks=None if view is None else [FireOut.of(f) for f in view.fires],
            timing_error=None if view is None else view.timing_error,
        )


class ScheduleList(msgspec.Struct, frozen=True):
    """A page of schedules, by name; ``next_cursor`` (the last one's name) gives the next
    page (None: this is the last)."""

    items: list[ScheduleOut]
    next_cursor: str | None
