"""A request body that stops arriving: answered 408, and its connection closed.

uvicorn waits for a request's next body bytes as long as the client likes, so a client
sending a body a byte now and then held its connection (and one of ``[server]
max_connections``) for good. :class:`BodyClock` is a request's ``receive`` and ``send``
while the app reads its body: a wait of ``[server] body_timeout`` seconds for the next bytes
raises :class:`~orchestra.errors.BodyTimeout` in the reader, which the app's error handlers
answer (408: the API's JSON, the dashboard's page), and that answer closes the connection.
A small body read whole (the login form) is instead given the timeout for all of it
(:func:`read_within`). The rest of a body the app did not read is the server's to bound
(api/server.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from orchestra import logs
from orchestra.errors import BodyTimeout

log = logs.get("orchestra.http")

_CLOSE = (b"connection", b"close")
_T = TypeVar("_T")


def _stalled(scope: Any, seconds: float, message: str) -> BodyTimeout:
    """Log a body that stopped arriving; the error that answers it, saying ``message``."""
    host, port = scope.get("client") or ("", 0)
    log.info(
        "http.body_timeout",
        client=f"{host}:{port}",
        method=scope["method"],
        path=scope["path"],
        seconds=seconds,
    )
    return BodyTimeout(message)


async def read_within(scope: Any, seconds: float, reading: Awaitable[_T]) -> _T:
    """``reading`` (of a request's whole body), which must end within ``seconds``.

    Raises:
        BodyTimeout: It did not (answered 408, and the connection closed).
    """
    try:
        async with asyncio.timeout(seconds):
            return await reading
    except TimeoutError:
        said = f"the request's body did not arrive whole within {seconds:g} s"
        raise _stalled(scope, seconds, said) from None


class BodyClock:
    """A request's ``receive`` with a deadline for each of its body's parts, and its
    ``send``, which closes the connection after an answer to a body that stopped arriving."""

    __slots__ = ("_receive", "_send", "answered", "more", "scope", "timeout")

    def __init__(self, scope: Any, receive: Any, send: Any, timeout: float) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        #: Seconds to wait for the body's next part.
        self.timeout = timeout
        #: Whether more of the body is to come (a request without one says so at once).
        self.more = True
        #: Whether the answer has begun: a read after it (a stream's watch for its client
        #: leaving) waits for as long as it takes, and a body it never read is the server's
        #: to bound (api/server.py).
        self.answered = False

    async def receive(self) -> Any:
        """The request's next message; :class:`BodyTimeout` when its body's next part does
        not come within the timeout.

        Raises:
            BodyTimeout: No byte of the body came for ``timeout`` seconds.
        """
        if not self.more or self.answered:
            return await self._receive()
        try:
            async with asyncio.timeout(self.timeout):
                message = await self._receive()
        except TimeoutError:
            said = f"the request's body stopped arriving: no byte of it came for {self.timeout:g} s"
            raise _stalled(self.scope, self.timeout, said) from None
        self.more = message["type"] == "http.request" and message.get("more_body", False)
        return message

    async def send(self, message: Any) -> None:
        """Send ``message``; a 408 (a body that stopped arriving) closes the connection: the
        rest of the body is never read."""
        if message["type"] == "http.response.start":
            self.answered = True
            if message["status"] == 408:
                message = {**message, "headers": [*message.get("headers", ()), _CLOSE]}
        await self._send(message)
