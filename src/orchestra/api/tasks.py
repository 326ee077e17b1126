"""/api/v1/tasks: submit, read (optionally waiting), list."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from orchestra.api import idempotency
from orchestra.api.auth import StreamGate
from orchestra.api.openapi import errors
from orchestra.api.runtime import Runtime
from orchestra.api.schemas import (
    NUMBER,
    StrictBodyRequest,
    TaskList,
    TaskOut,
    TaskSummaryOut,
)
from orchestra.api.scope import location
from orchestra.api.sse import RECONNECT, DirectWrites, EventStream, Frames, frame
from orchestra.auth import Caller
from orchestra.db.events import TaskEvent
from orchestra.domain import TaskStatus
from orchestra.tasks import SubmitTask, TaskService

MAX_WAIT = 60.0
_encode = msgspec.json.Encoder().encode


def _json(body: msgspec.Struct) -> Response[bytes]:
    """``body`` as a 200 answer, encoded here by msgspec: the handler's ``responses`` names
    its schema for the OpenAPI document, and Litestar sends the bytes as they are."""
    return Response(_encode(body), media_type=MediaType.JSON)


#: What a stream sends while nothing happens, so that proxies keep it open: a comment
#: alone (an empty `data:` line is an event to readers that do not skip empty ones).
_KEEPALIVE = b": keep-alive\r\n\r\n"


def _sse(task_id: int, events: list[TaskEvent], frames: Frames) -> bytes:
    """Events as Server-Sent Events: the sequence number is the id, the type the event name,
    and the data the event's fields with its seq, time and type; each event is encoded once
    for all its followers."""
    if not events:
        return _KEEPALIVE
    return b"".join(
        frames.get((task_id, e.seq, e.time), functools.partial(_frame, e)) for e in events
    )


def _frame(e: TaskEvent) -> bytes:
    return frame(e.seq, e.type, {"seq": e.seq, "time": e.time, "type": e.type, **e.data})


def _ok(body: type[msgspec.Struct]) -> ResponseSpec:
    """The OpenAPI entry of a 200 answer :func:`_json` encodes."""
    return ResponseSpec(
        body, description="Request fulfilled, document follows", generate_examples=False
    )


class TaskController(Controller):
    """Tasks: one submitted run of a template each."""

    path = "/api/v1/tasks"
    tags = ["tasks"]

    @post(
        "/",
        opt={"scope": "submit"},
        status_code=201,
        summary="Submit a task",
        request_class=StrictBodyRequest,
        responses={
            200: ResponseSpec(
                TaskOut,
                description="An idempotent replay: the task this key already created",
                generate_examples=False,
            ),
            **errors(400, 404, 409, 413, 422, 507),
        },
    )
    async def submit(
        self,
        request: Request[Caller, Any, Any],
        data: JSONBody[SubmitTask],
        tasks: NamedDependency[TaskService],
        idempotency_header: Annotated[
            str | None,
            HeaderParameter(
                name=idempotency.HEADER,
                description="Same as idempotency_key in the body: "
                + idempotency.HEADER_DESCRIPTION,
            ),
        ] = None,
    ) -> Response[TaskOut]:
        """Validate the parameters against the template and queue the task.

        201 with the new task; 200 with the existing task when the idempotency key was used
        before with the same request (409 when with a different one); 404 when the template
        does not exist; 422 naming every bad parameter; 400 naming a field of the body that
        does not fit, a value of the wrong JSON type too (``"1"`` for ``template_version``:
        text is not converted; a whole float, ``1.0``, is taken as the integer:
        :class:`~orchestra.api.schemas.StrictBodyRequest`). Idempotency
        keys are per API key: the same key sent with another API key is another task.
        """
        idempotency.sent_once(request.headers)
        key = idempotency.request_key(data.idempotency_key, idempotency_header)
        if key != data.idempotency_key:
            data = msgspec.structs.replace(data, idempotency_key=key)
        submitted = await tasks.submit(data, key_id=request.user.key_id)
        task = submitted.task
        return Response(
            TaskOut.of(task),
            status_code=201 if submitted.created else 200,
            headers={"Location": location(request, f"{self.path}/{task.id}")},
        )

    @get(
        "/{task_id:int}/events",
        summary="Follow a task's events (Server-Sent Events)",
        media_type="text/event-stream",
        responses=errors(400, 404, 429),
    )
    async def events(
        self,
        request: Request[Caller, Any, Any],
        task_id: FromPath[int],
        tasks: NamedDependency[TaskService],
        runtime: NamedDependency[Runtime],
        last_event_id: Annotated[
            str | None,
            HeaderParameter(
                name="Last-Event-ID", pattern=NUMBER, description="Resume after this event id."
            ),
        ] = None,
        after: Annotated[
            int,
            # Past 2**63 - 1 the stream's first query overflowed SQLite's INTEGER after the 200
            # was sent, cutting the answer short. The bound is one a JSON number (a double, as
            # the OpenAPI document publishes it) carries exactly.
            QueryParameter(
                ge=0, le=2**53 - 1, description="Resume after this event id (as the header)."
            ),
        ] = 0,
    ) -> EventStream:
        """The task's events as ``text/event-stream``: every past event, then new ones as they
        happen, ending after ``task.finished``. Each event's ``id`` is its sequence number;
        reconnecting with ``Last-Event-ID`` continues without gaps or repeats. A stream whose
        key is revoked ends at its next event or comment."""
        if last_event_id is not None:
            after = int(last_event_id)
        await tasks.get(task_id)  # 404 now, before the stream starts

        frames, writes = runtime.frames, DirectWrites()
        gate = StreamGate(runtime.gatekeeper, request.user)

        def write(events: list[TaskEvent]) -> bool:
            return writes.ready and gate.now() and writes.write(_sse(task_id, events, frames))

        async def stream() -> AsyncIterator[bytes]:
            async for events in tasks.follow_batches(task_id, after, write):
                if not await gate.still():  # its key was revoked
                    return
                yield _sse(task_id, events, frames)
            if runtime.feed.closing:  # ended by the stop, not by the task's end
                yield RECONNECT

        # Last, once nothing can refuse the request: the answer gives the place back.
        release = runtime.streams.take(request.user.key_id)
        return EventStream(stream(), writes, on_close=release)

    @post(
        "/{task_id:int}/cancel",
        status_code=200,
        summary="Cancel a task",
        opt={"scope": "submit"},
        responses=errors(400, 404, 409, 507),
    )
    async def cancel(self, task_id: FromPath[int], tasks: NamedDependency[TaskService]) -> TaskOut:
        """A queued task is cancelled at once; a running one is stopped (its model call is
        closed) and the answer comes once it has. 409 with ``task_status`` when it had already
        finished."""
        return TaskOut.of(await tasks.cancel(task_id))

    @post(
        "/{task_id:int}/retry",
        status_code=200,
        summary="Retry a task",
        opt={"scope": "submit"},
        responses=errors(400, 404, 409, 507),
    )
    async def retry(self, task_id: FromPath[int], tasks: NamedDependency[TaskService]) -> TaskOut:
        """Queue a failed or cancelled task again as a new attempt. 409 with ``task_status``
        for any other status."""
        return TaskOut.of(await tasks.retry(task_id))

    @get("/{task_id:int}", summary="Get a task", responses={200: _ok(TaskOut), **errors(400, 404)})
    async def get_task(
        self,
        task_id: FromPath[int],
        tasks: NamedDependency[TaskService],
        wait: Annotated[
            float,
            QueryParameter(
                ge=0, le=MAX_WAIT, description="Seconds to wait for the task to finish."
            ),
        ] = 0.0,
    ) -> Response[bytes]:
        """The task with its steps; with ``wait``, answers as soon as it is finished."""
        return _json(TaskOut.of(await tasks.get(task_id, wait=wait)))

    @get("/", summary="List tasks", responses={200: _ok(TaskList), **errors(400)})
    async def list_tasks(
        self,
        tasks: NamedDependency[TaskService],
        status: Annotated[
            TaskStatus | None, QueryParameter(description="Only tasks with this status.")
        ] = None,
        template: Annotated[
            str | None, QueryParameter(description="Only tasks of this template.")
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=500, description="Page size.")] = 50,
        cursor: Annotated[
            str | None,
            QueryParameter(pattern=NUMBER, description="next_cursor of the previous page."),
        ] = None,
    ) -> Response[bytes]:
        """Task summaries, newest first, filtered by status and template; keyset-paginated.

        A summary has no ``params``, ``result``, steps or attempts: ``GET /api/v1/tasks/{id}``
        gives those, one task at a time."""
        page = await tasks.list(
            status=status,
            template=template,
            limit=limit,
            before=None if cursor is None else int(cursor),
        )
        return _json(
            TaskList(
                items=[TaskSummaryOut.of(t) for t in page.items],
                next_cursor=None if page.next_cursor is None else str(page.next_cursor),
            )
        )
