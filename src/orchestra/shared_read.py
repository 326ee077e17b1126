"""Single-flight reads: callers asking the same question at the same time share one read,
and may each wait for it a bounded time.

When a task changes, every follower of it wakes at once and asks the database the same
question ("events after seq N"); shared, fifty followers cost one query, not fifty.

/health and /metrics read the database on behalf of probes and scrapers that give up after a
few seconds (a liveness probe's ``timeoutSeconds``, Prometheus's ``scrape_timeout``). A
database that takes connections but does not answer (a hung server, a network path that
drops packets) held every such request until the pool gave up a minute later: the probe
failed and the pod was restarted, and the scrape failed instead of saying the database was
down. Asked with a ``wait``, nobody waits past it from the read's start: they are told
:class:`Unanswered`, and the read goes on, its result kept for whoever asks after it ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from orchestra import logs

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


class SharedReads:
    """One read in flight per key at a time, shared by whoever asks for that key meanwhile
    (its result or its exception); ``wait``: how long each caller waits by default, from
    the read's start (None: until it ends)."""

    def __init__(self, wait: float | None = None) -> None:
        self.wait = wait
        self._pending: dict[Hashable, tuple[asyncio.Future[Any], float]] = {}

    async def read(
        self,
        key: Hashable,
        load: Callable[[], Awaitable[T]],
        *,
        bounded: bool = True,
        within: float | None = None,
    ) -> T:
        """The result of the read of ``key`` in flight, or of ``load()`` started now;
        ``bounded``: waiting at most :attr:`wait` (False: until it ends); ``within``: and at
        most this many seconds from now (what is left of a caller's own time).

        Raises:
            Unanswered: :attr:`wait` seconds passed since the read began and it has not
                ended (it goes on; a caller after its end starts the next).
            Exception: what the read raised.
        """
        limit = self.wait if bounded else None
        loop = asyncio.get_running_loop()
        pending = self._pending.get(key)
        if pending is None or pending[0].done():
            # Shared by every caller: not in the context (the task) of the first one.
            task = logs.shared_task(_awaited(load), "shared-read")
            pending = self._pending[key] = (task, loop.time())
            task.add_done_callback(lambda done: self._ended(key, done))
        running, began = pending
        if limit is None or running.done():
            result: T = await asyncio.shield(running)
            return result
        left = limit - (loop.time() - began)
        if within is not None:
            left = min(left, within)
        try:
            if left <= 0:
                raise TimeoutError
            async with asyncio.timeout(left):
                result = await asyncio.shield(running)
        except TimeoutError:
            if running.done():  # it ended as the time ran out
                return running.result()
            raise Unanswered(loop.time() - began) from None
        return result

    def _ended(self, key: Hashable, done: asyncio.Future[Any]) -> None:
        if self._pending.get(key, (None,))[0] is done:
            del self._pending[key]
        if not done.cancelled():
            done.exception()  # retrieved: nobody may be waiting for it any more


async def _awaited(load: Callable[[], Awaitable[T]]) -> T:
    """``load()`` as a coroutine (what an asyncio task runs)."""
    return await load()
