"""Reading the API's ``text/event-stream`` answers into the server's event structs: a task's
own stream (:class:`~orchestra.wire.events.TaskEvent`) and the all-tasks feed
(:class:`~orchestra.wire.events.FeedEvent`)."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from orchestra.wire.events import FeedEvent, TaskEvent


class SseMessage(msgspec.Struct, frozen=True):
    """One event of a ``text/event-stream``."""

    id: str | None
    event: str | None
    data: str


class SseReader:
    """Reads a ``text/event-stream`` line by line, as a browser's EventSource does (the parts
    the API sends): an event ends at a blank line; comments and empty data are keep-alives."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._event: str | None = None
        self._data: list[str] = []

    def line(self, line: str) -> SseMessage | None:
        """Take one line (without its end); the event it completes, if any."""
        if not line:
            data = "\n".join(self._data)
            message = SseMessage(self._id, self._event, data) if data.strip() else None
            self._id, self._event, self._data = None, None, []
            return message
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None


def task_event(message: SseMessage) -> TaskEvent:
    """An event of a task's own stream (its data holds seq, time and type beside the rest)."""
    data: dict[str, Any] = json.loads(message.data)
    return TaskEvent(data.pop("seq"), data.pop("time"), data.pop("type"), data)


def feed_event(message: SseMessage) -> FeedEvent:
    """An event of the all-tasks feed."""
    data: dict[str, Any] = json.loads(message.data)
    return FeedEvent(
        id=data.pop("id"),
        task_id=data.pop("task_id"),
        template=data.pop("template"),
        seq=data.pop("seq"),
        time=data.pop("time"),
        type=data.pop("type"),
        data=data,
    )
