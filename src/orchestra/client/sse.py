"""Reading the API's ``text/event-stream`` answers into the server's event structs: a task's
own stream (:class:`~orchestra.wire.events.TaskEvent`) and the all-tasks feed
(:class:`~orchestra.wire.events.FeedEvent`)."""

from __future__ import annotations

import json
from typing import TypeVar

import msgspec

from orchestra.client.errors import ApiError
from orchestra.wire.events import FeedEvent, TaskEvent

E = TypeVar("E", TaskEvent, FeedEvent)


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


#: The fields of an event's data that are the event's own, not its payload's.
_TASK_FIELDS = ("seq", "time", "type")
_FEED_FIELDS = ("id", "task_id", "template", *_TASK_FIELDS)


def task_event(message: SseMessage) -> TaskEvent:
    """An event of a task's own stream (its data holds seq, time and type beside the rest).

    Raises:
        ApiError: its data is not such an event (a server of another version).
    """
    return _event(message, TaskEvent, _TASK_FIELDS)


def feed_event(message: SseMessage) -> FeedEvent:
    """An event of the all-tasks feed.

    Raises:
        ApiError: its data is not such an event (a server of another version).
    """
    return _event(message, FeedEvent, _FEED_FIELDS)


def _event(message: SseMessage, kind: type[E], fields: tuple[str, ...]) -> E:
    """``message``'s data as a ``kind``: its ``fields``, and the rest as its ``data``. A
    missing field or one of another type was a KeyError or a TypeError, past every ``except
    ClientError``."""
    try:
        data = json.loads(message.data)
        own = {name: data.pop(name) for name in fields}
        return msgspec.convert({**own, "data": data}, kind)
    except (ValueError, KeyError, TypeError, AttributeError, msgspec.ValidationError) as exc:
        said = f"{type(exc).__name__}: {exc}"
        raise ApiError(
            200,
            "http_error",
            f"an event this client cannot read ({said}): a service of another version?",
        ) from None
