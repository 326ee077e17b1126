"""The schedule operations' calls (:class:`~orchestra.client.core.Call`, as every
operation's): make, list, read, change, delete and run a schedule."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypedDict, cast

from orchestra.client.core import _JSON, Call, _as, _given, _nothing, _segment, page_size
from orchestra.client.json_body import encode as _encode
from orchestra.schedules import CatchUp, Overlap, ScheduleChanges, ScheduleSpec, TaskOptions
from orchestra.wire.schedules import ScheduleList, ScheduleOut
from orchestra.wire.schemas import TaskOut


class ScheduleFields(TypedDict, total=False):
    """A schedule's fields, as keywords of ``create_schedule`` (``name`` and ``template``
    are needed; :class:`~orchestra.schedules.ScheduleSpec` says what each means) and, any of
    them, of ``update_schedule`` (where None clears ``cron``, ``every`` and ``model``)."""

    name: str
    template: str
    params: dict[str, Any]
    model: str | None
    priority: int
    options: TaskOptions
    cron: str | None
    timezone: str
    every: str | float | timedelta | None
    enabled: bool
    overlap: Overlap
    catch_up: CatchUp


def spec_of(fields: ScheduleFields) -> ScheduleSpec:
    """The schedule ``create_schedule``'s keywords describe (a ``timedelta`` for ``every``
    is taken: the struct turns it into its duration text)."""
    return ScheduleSpec(**cast(Any, fields))


def changes_of(fields: ScheduleFields) -> ScheduleChanges:
    """The changes ``update_schedule``'s keywords describe."""
    return ScheduleChanges(**cast(Any, fields))


def create_schedule(spec: ScheduleSpec) -> Call[ScheduleOut]:
    return Call(
        "POST",
        "/api/v1/schedules",
        _as(ScheduleOut),
        content=_encode(spec),
        headers=_JSON,
        ok=frozenset({201}),
    )


def schedules_page(limit: int, cursor: str | None) -> Call[ScheduleList]:
    params = _given({"limit": page_size(limit), "cursor": cursor})
    return Call("GET", "/api/v1/schedules", _as(ScheduleList), params=params)


def get_schedule(ref: str | int) -> Call[ScheduleOut]:
    return Call("GET", f"/api/v1/schedules/{_segment(ref)}", _as(ScheduleOut))


def update_schedule(ref: str | int, changes: ScheduleChanges) -> Call[ScheduleOut]:
    """PATCH: only the fields ``changes`` gives are sent (msgspec leaves UNSET ones out)."""
    return Call(
        "PATCH",
        f"/api/v1/schedules/{_segment(ref)}",
        _as(ScheduleOut),
        content=_encode(changes),
        headers=_JSON,
    )


def delete_schedule(ref: str | int) -> Call[None]:
    return Call("DELETE", f"/api/v1/schedules/{_segment(ref)}", _nothing, ok=frozenset({204}))


def run_schedule(ref: str | int) -> Call[TaskOut]:
    """POST …/run: the task a tick would submit, now."""
    return Call("POST", f"/api/v1/schedules/{_segment(ref)}/run", _as(TaskOut), ok=frozenset({201}))
