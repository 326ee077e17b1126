"""Server-Sent Events answers: how both event streams frame an event, and the response that
writes the frames.

One event reaches every follower of it at once (the feed wakes them all together), so the
costs that matter are per delivery:

- **A frame is encoded once**, whoever sends it: :class:`Frames` keeps the recent frames by
  their key, and a thousand followers of one event share one encoding.
- **Deliveries first.** After each chunk the stream steps aside (one turn of the loop) before
  anything else it has to do, so the followers woken with it write their chunks before any of
  them does a slower follow-up, such as closing the stream after a task's last event.
- **No task group per stream.** Litestar's streaming answer starts an anyio task group for
  each stream to notice a disconnect; :class:`EventStream` runs the stream in the request's
  own task and listens with one plain asyncio task.
- **The reader writes.** A follower that is caught up does not wake at all: the feed's
  reader writes its chunk itself, through the stream's :class:`DirectWrites` (the ASGI
  ``send``, run by hand: a send that does not wait finishes in one step). Waking a thousand
  tasks and running each through its generators and Litestar's layers cost 55–80 µs a
  delivery; a write costs a fraction of that. A send that must wait (the client reads
  slowly) is finished by a task of its own, and until it has, the follower's events go
  through its buffer and its own task again, in order.
"""

from __future__ import annotations

import asyncio
import types
from collections import OrderedDict
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Hashable,
    Iterable,
)
from typing import TYPE_CHECKING, Any

import msgspec
from litestar.enums import MediaType
from litestar.response import Stream
from litestar.response.streaming import ASGIStreamingResponse

if TYPE_CHECKING:
    from litestar import Litestar, Request
    from litestar.background_tasks import BackgroundTask, BackgroundTasks
    from litestar.datastructures import Cookie
    from litestar.response.base import ASGIResponse
    from litestar.types import HTTPResponseBodyEvent, Receive, Scope, Send, TypeEncodersMap

_encode = msgspec.json.Encoder().encode

#: How many frames :class:`Frames` keeps (a frame is a few hundred bytes).
FRAMES_KEPT = 4096


#: What a stream ended by a stopping process sends last: "come back" (SSE's reconnection time,
#: 1 s), so that a client tells it from the end of a task's stream.
RECONNECT = b"retry: 1000\r\n\r\n"


def frame(event_id: int, name: str, data: dict[str, Any]) -> bytes:
    """One event: ``id``, ``event`` (its name) and ``data`` (JSON, which never spans lines)."""
    return b"id: %d\r\nevent: %s\r\ndata: %s\r\n\r\n" % (event_id, name.encode(), _encode(data))


class Frames:
    """The frames of recent events, each encoded once for all its followers (one per app: a
    key names an event of its database)."""

    def __init__(self, kept: int = FRAMES_KEPT) -> None:
        self._kept = kept
        self._frames: OrderedDict[Hashable, bytes] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], bytes]) -> bytes:
        """The frame under ``key``, made by ``make`` the first time (the oldest is forgotten
        past :data:`FRAMES_KEPT`)."""
        found = self._frames.get(key)
        if found is None:
            found = self._frames[key] = make()
            if len(self._frames) > self._kept:
                self._frames.popitem(last=False)
        return found


class DirectWrites:
    """A stream's ASGI ``send``, for the feed's reader to write a caught-up follower's chunks
    itself (see the module's docstring). The stream attaches its ``send`` once its headers
    are sent, waits for :meth:`flush` before each chunk of its own, and detaches at its end.
    """

    def __init__(self) -> None:
        self._send: Send | None = None
        self._pending: asyncio.Future[None] | None = None
        #: How many writes had to wait for the client (for tests).
        self.waited = 0

    def attach(self, send: Send) -> None:
        """Take ``send``: the answer's headers are sent, chunks may follow."""
        self._send = send

    def detach(self) -> None:
        """Write nothing more (the stream ends); a write still waiting is given up."""
        self._send = None
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if not pending.done():
            pending.cancel()
        elif not pending.cancelled():
            pending.exception()  # retrieved: the stream ends anyway

    @property
    def ready(self) -> bool:
        """Whether :meth:`write` would send now (so a chunk is not encoded for nothing)."""
        return self._send is not None and self._pending is None

    def write(self, chunk: bytes) -> bool:
        """Send ``chunk`` now, without waiting; False (nothing sent) while nothing is attached
        or an earlier write still waits. A send that has to wait for the client goes on in a
        task of its own, which :meth:`flush` waits for."""
        if self._send is None or self._pending is not None:
            return False
        message: HTTPResponseBodyEvent = {
            "type": "http.response.body",
            "body": chunk,
            "more_body": True,
        }
        sending = self._send(message).__await__()
        try:
            waiting = sending.send(None)
        except StopIteration:
            return True
        except (Exception, asyncio.CancelledError) as exc:  # raised by its task's next flush
            failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            self._pending = failed
            return True
        self.waited += 1
        pending = self._pending = asyncio.ensure_future(_finish(sending, waiting))
        pending.add_done_callback(self._sent)
        return True

    def _sent(self, pending: asyncio.Future[None]) -> None:
        """A write that had to wait is done: if it went well, the next may go at once (one
        that failed stays, for :meth:`flush` to raise in the stream's own task)."""
        if pending is self._pending and not pending.cancelled() and pending.exception() is None:
            self._pending = None

    async def flush(self) -> None:
        """Wait for a write that had to wait (its error, if it failed, is raised here)."""
        if self._pending is not None:
            try:
                await self._pending
            finally:
                self._pending = None


@types.coroutine
def _resume(coro: Generator[Any, Any, None], waiting: Any) -> Generator[Any, Any, None]:
    """The rest of ``coro`` (an awaitable's steps), whose first step ran by hand and yielded
    ``waiting``: what ``await`` would have done from there (``yield from``, started)."""
    while True:
        try:
            sent = yield waiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting = coro.send(sent)
            except StopIteration:
                return


async def _finish(coro: Generator[Any, Any, None], waiting: Any) -> None:
    await _resume(coro, waiting)


class _LeanStream(ASGIStreamingResponse):
    """Litestar's streaming answer without its task group (see the module's docstring)."""

    def __init__(
        self,
        *,
        writes: DirectWrites | None,
        on_close: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.writes = writes or DirectWrites()
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # however it ended: its client gone, its events over, the service stopping
            if self.on_close is not None:
                self.on_close()

    async def send_body(self, send: Send, receive: Receive) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            streaming.cancel()

        listener = asyncio.create_task(listen(), name="sse-disconnect")
        writes = self.writes
        writes.attach(send)
        try:
            async for chunk in self.iterator:
                body = chunk if isinstance(chunk, bytes) else chunk.encode(self.encoding)
                await writes.flush()  # what the reader wrote comes first
                await send({"type": "http.response.body", "body": body, "more_body": True})
                await asyncio.sleep(0)  # deliveries first
            await writes.flush()
            writes.detach()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not listener.done() or listener.cancelled():
                raise  # cancelled from outside (shutdown), not by the client leaving
            streaming.uncancel()
        finally:
            writes.detach()
            listener.cancel()
            close = getattr(self.iterator, "aclose", None)
            if close is not None:
                await close()


class EventStream(Stream):
    """``text/event-stream``: each chunk of ``chunks`` is written as it comes (a chunk is one
    read's events, or a heartbeat), with the headers that keep proxies from buffering it.
    ``writes``: where the feed's reader may write chunks itself (see :class:`DirectWrites`).
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        writes: DirectWrites | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.writes = writes
        #: Called once the answer is over, however it ended (a stream's place given back).
        self.on_close = on_close
        super().__init__(
            chunks,
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-cache",
                "Connection": "keep-alive",
                "X-Accel-Buffering": "no",
            },
        )

    def to_asgi_response(  # noqa: PLR0913  (Litestar's signature)
        self,
        app: Litestar | None,
        request: Request[Any, Any, Any],
        *,
        background: BackgroundTask | BackgroundTasks | None = None,
        cookies: Iterable[Cookie] | None = None,
        encoded_headers: Iterable[tuple[bytes, bytes]] | None = None,
        headers: dict[str, str] | None = None,
        is_head_response: bool = False,
        media_type: MediaType | str | None = None,
        status_code: int | None = None,
        type_encoders: TypeEncodersMap | None = None,
    ) -> ASGIResponse:
        """The lean streaming answer, with what Litestar's own would carry."""
        iterator = self.iterator
        assert isinstance(iterator, AsyncIterable)
        return _LeanStream(
            writes=self.writes,
            on_close=self.on_close,
            background=self.background or background,
            content_length=0,
            cookies=[*self.cookies, *(cookies or ())],
            encoded_headers=encoded_headers,
            encoding=self.encoding,
            headers={**(headers or {}), **self.headers},
            is_head_response=is_head_response,
            iterator=iterator,
            media_type=str(self.media_type or media_type or MediaType.TEXT),
            status_code=self.status_code or status_code,
        )
