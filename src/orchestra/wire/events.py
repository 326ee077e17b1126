"""Task events as the API streams them: one task's (:class:`TaskEvent`) and the all-tasks
feed's (:class:`FeedEvent`). Storage (``orchestra.db.events``, ``orchestra.db.feed``) reads
rows into them; the client decodes server-sent events into them."""

from __future__ import annotations

from typing import Any

import msgspec


class TaskEvent(msgspec.Struct, frozen=True):
    """One thing that happened to a task, as read back: ``type`` is an :class:`EventType`'s
    word and ``data`` its payload's JSON object."""

    seq: int
    time: str
    type: str
    data: dict[str, Any]


class FeedEvent(msgspec.Struct, frozen=True):
    """One event of the all-tasks feed: ``id`` orders every task's events, ``seq`` one task's;
    ``template`` is the task's template (what the feed filters on)."""

    id: int
    task_id: int
    template: str
    seq: int
    time: str
    type: str
    data: dict[str, Any]

    def as_task_event(self) -> TaskEvent:
        """The event as a task's own stream shows it (its sequence number is its id there)."""
        return TaskEvent(self.seq, self.time, self.type, self.data)
