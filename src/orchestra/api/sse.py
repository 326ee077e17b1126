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
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Hashable, Iterable
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
    from litestar.types import Receive, Send, TypeEncodersMap

_encode = msgspec.json.Encoder().encode

#: How many frames :class:`Frames` keeps (a frame is a few hundred bytes).
FRAMES_KEPT = 4096


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


class _LeanStream(ASGIStreamingResponse):
    """Litestar's streaming answer without its task group (see the module's docstring)."""

    async def send_body(self, send: Send, receive: Receive) -> None:
        streaming = asyncio.current_task()
        assert streaming is not None

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            streaming.cancel()

        listener = asyncio.create_task(listen(), name="sse-disconnect")
        try:
            async for chunk in self.iterator:
                body = chunk if isinstance(chunk, bytes) else chunk.encode(self.encoding)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                await asyncio.sleep(0)  # deliveries first
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not listener.done() or listener.cancelled():
                raise  # cancelled from outside (shutdown), not by the client leaving
            streaming.uncancel()
        finally:
            listener.cancel()
            close = getattr(self.iterator, "aclose", None)
            if close is not None:
                await close()


class EventStream(Stream):
    """``text/event-stream``: each chunk of ``chunks`` is written as it comes (a chunk is one
    read's events, or a heartbeat), with the headers that keep proxies from buffering it."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
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
