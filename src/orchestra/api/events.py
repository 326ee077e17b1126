"""/api/v1/events: every task's events over one connection (Server-Sent Events)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.params import HeaderParameter, QueryParameter

from orchestra.api.auth import StreamGate
from orchestra.api.openapi import errors
from orchestra.api.runtime import Runtime
from orchestra.api.schemas import NUMBER
from orchestra.api.sse import RECONNECT, DirectWrites, EventStream, Frames, frame
from orchestra.auth import Caller
from orchestra.db.feed import FeedEvent, FeedFilter
from orchestra.errors import FieldProblem, InvalidRequest
from orchestra.event_types import EventType

#: What the feed sends while nothing happens: an SSE comment, so that proxies keep it open.
HEARTBEAT = b": heartbeat\r\n\r\n"
_TYPES = frozenset(t.value for t in EventType)
#: A resume from an id this database never gave: without the 400 the stream would show
#: nothing until new events passed it.
_PAST = (
    "is past the highest event id this database ever gave ({given}): is it another "
    "database's, or this one's restored from an older copy? Leave it out to start with the "
    "next event, or send 0 to replay every event kept"
)


def sse(events: list[FeedEvent], frames: Frames) -> bytes:
    """Events as Server-Sent Events: the global id is the SSE id, the type its name, and the
    data the event's fields with its id, task, template, seq, time and type; each event is
    encoded once for all its followers."""
    if not events:
        return HEARTBEAT
    return b"".join(
        frames.get(("feed", e.id, e.time), functools.partial(_frame, e)) for e in events
    )


def _frame(e: FeedEvent) -> bytes:
    data = {
        "id": e.id,
        "task_id": e.task_id,
        "template": e.template,
        "seq": e.seq,
        "time": e.time,
        "type": e.type,
        **e.data,
    }
    return frame(e.id, e.type, data)


def wanted_types(values: list[str] | None) -> frozenset[str] | None:
    """The event types asked for (``type`` repeated, or words separated by commas); None: all.

    Raises:
        InvalidRequest: a word is not an event type, or none is given (``type=``: it was taken
            for no filter).
    """
    if not values:
        return None
    words = {w.strip() for value in values for w in value.split(",") if w.strip()}
    if not words:
        reason = "must name an event type (leave it out for all)"
        raise InvalidRequest(f"type: {reason}", [FieldProblem("type", reason)])
    unknown = sorted(words - _TYPES)
    if unknown:
        named = ", ".join(map(repr, unknown))
        reason = f"unknown event type {named}; known: {', '.join(sorted(_TYPES))}"
        raise InvalidRequest(f"type: {reason}", [FieldProblem("type", reason)])
    return frozenset(words)


class EventController(Controller):
    """Every task's events, as they happen."""

    path = "/api/v1/events"
    tags = ["events"]

    @get(
        "/",
        summary="Follow every task's events (Server-Sent Events)",
        media_type="text/event-stream",
        responses=errors(400, 404, 429),
    )
    async def events(
        self,
        request: Request[Caller, Any, Any],
        runtime: NamedDependency[Runtime],
        template: Annotated[
            str | None, QueryParameter(min_length=1, description="Only tasks of this template.")
        ] = None,
        types: Annotated[
            list[str] | None,
            QueryParameter(
                name="type",
                description="Only events of these types (repeat it, or separate by commas).",
            ),
        ] = None,
        last_event_id: Annotated[
            str | None,
            HeaderParameter(
                name="Last-Event-ID", pattern=NUMBER, description="Resume after this event id."
            ),
        ] = None,
        after: Annotated[
            int | None,
            QueryParameter(
                ge=0,
                le=2**53 - 1,
                description="Resume after this event id (as the header); 0 replays every "
                "event kept. Without either, the feed starts with the next event.",
            ),
        ] = None,
    ) -> EventStream:
        """Every task's events as ``text/event-stream``, in the order they were recorded, without
        end. Each event's ``id`` is its global id (``seq`` is its number within its task);
        reconnecting with ``Last-Event-ID`` continues without gaps or repeats, across restarts
        too. A comment is sent every 15 s while nothing happens. A stream whose key is revoked
        ends at its next event or comment. 404 (``template_not_found``)
        before the stream starts when ``template`` names no template, nor any task kept."""
        feed = runtime.feed
        wanted = FeedFilter(template=template, types=wanted_types(types))
        if template is not None:  # 404 now, as a webhook filtered by it answers
            await runtime.tasks.named(template)
        named = "after"
        if last_event_id is not None:
            after, named = int(last_event_id), "Last-Event-ID"
        given = None if after is None else await feed.highest_given()
        if after is not None and given is not None and after > given:
            past = _PAST.format(given=given)
            raise InvalidRequest(f"{named}: {past}", [FieldProblem(named, past)])
        # Fixed now, before the answer starts: what happens once it has started is sent.
        start = await feed.newest() if after is None else after

        frames, writes = runtime.frames, DirectWrites()
        gate = StreamGate(runtime.gatekeeper, request.user)

        def write(events: list[FeedEvent]) -> bool:
            return writes.ready and gate.now() and writes.write(sse(events, frames))

        async def stream() -> AsyncIterator[bytes]:
            async for events in feed.follow(wanted, start, write):
                if not await gate.still():  # its key was revoked
                    return
                yield sse(events, frames)
            if feed.closing:
                yield RECONNECT

        # Last, once nothing can refuse the request: the answer gives the place back.
        release = runtime.streams.take(request.user.key_id)
        return EventStream(stream(), writes, on_close=release)
