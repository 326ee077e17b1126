"""A read that callers asking at the same time share, each waiting a bounded time for it.

/health and /metrics read the database on behalf of probes and scrapers that give up after a
few seconds (a liveness probe's ``timeoutSeconds``, Prometheus's ``scrape_timeout``). A
database that takes connections but does not answer (a hung server, a network path that
drops packets) held every such request until the pool gave up a minute later: the probe
failed and the pod was restarted, and the scrape failed instead of saying the database was
down. With :class:`SharedRead`, one read is in flight at a time; whoever asks meanwhile waits
for that one, and nobody waits past ``wait`` seconds from its start: they are told
:class:`Unanswered`, and the read goes on, its result kept for whoever asks after it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: Seconds a request to /health or /metrics waits for the database to answer (a liveness
#: probe gives up after its ``timeoutSeconds``, 5 in deploy/k8s): past it, the database is
#: "down" in the answer, the read goes on, and its outcome answers the requests after it.
DATABASE_ANSWER_SECONDS = 2.0


class Unanswered(TimeoutError):
    """The read in flight has not answered within the wait, ``seconds`` after it began."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the database has not answered for {seconds:.1f} s")
        self.seconds = seconds


class SharedRead(Generic[T]):
    """One read in flight at a time, shared; each caller waits at most ``wait`` seconds from
    the read's start (:class:`Unanswered` after)."""

    def __init__(self, wait: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.wait = wait
        self._clock = clock
        self._running: asyncio.Future[T] | None = None
        self._began = 0.0

    async def get(self, read: Callable[[], Awaitable[T]]) -> T:
        """The result of the read in flight, or of ``read()`` started now when none is.

        Raises:
            Unanswered: the read has not ended within ``wait`` seconds of its start (it goes
                on; a caller after its end starts the next).
            Exception: what the read raised.
        """
        if self._running is None:
            started: asyncio.Future[T] = asyncio.ensure_future(read())
            self._running, self._began = started, self._clock()
            started.add_done_callback(self._ended)
        running = self._running
        waited = self._clock() - self._began
        if waited >= self.wait:
            raise Unanswered(waited)
        try:
            return await asyncio.wait_for(asyncio.shield(running), self.wait - waited)
        except TimeoutError:
            raise Unanswered(self._clock() - self._began) from None

    def _ended(self, done: asyncio.Future[T]) -> None:
        if self._running is done:
            self._running = None
        if not done.cancelled():
            done.exception()  # retrieved: nobody may be waiting for it any more
