"""Following an event stream across dropped connections, without I/O (both clients use it).

A stream cut while it is followed — the service restarted, a proxy or the network dropped
the connection — is opened again after the last event seen (``?after=``: the API resumes a
stream from there with no gap and no repeat, docs/events.md). While it cannot be opened, it is
tried again after a growing wait (:class:`ReconnectPolicy`); once it has been down for the
policy's ``window`` (no new connection delivered anything meanwhile), the follower gives up
with :class:`~orchestra.client.errors.ConnectionFailed`.

What is not a drop, and fails at once as before:

- the first connection failing (nothing was followed yet: the service is not there);
- an error answer other than 502, 503 or 504 (a 404: the task is gone; a 401: the key);
- a stream silent for the client's ``stream_timeout`` (a frozen service or a half-open
  connection: a service that is up sends a heartbeat every 15 s).

A task's own stream ends after its ``task.finished``, and the service ends it only there: an
answer that ends cleanly after other events was cut short (a proxy, a service that stopped),
and is resumed. A service that stops ends its streams with SSE's ``retry:`` field, "come
back": such an answer is resumed even when it carried no event. An answer that ends without
an event is the end only if the task has finished (``after`` was at or past its last event):
the client asks, and when it has, opens the stream once more (the task may have finished
after the answer ended: its last events are then sent); an answer without an event then is
the end. A proxy that ends streams after a while ends a quiet one so too, and the service
ends the stream of a key revoked meanwhile so (asking then raises its 401).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import httpx
import msgspec

from orchestra.client.core import Call, SseMessage
from orchestra.client.errors import ApiError, ClientError, ConnectionFailed

#: The event after which a task's own stream ends.
TASK_FINISHED = "task.finished"
#: Answers that mean the service is on its way back (a proxy's 502 or 504, a 503).
TRANSIENT_STATUSES = frozenset({502, 503, 504})


class ReconnectPolicy(msgspec.Struct, frozen=True):
    """How a dropped event stream (``task_events``, ``events``) is opened again."""

    #: Seconds a dropped stream may stay down before the follower gives up with
    #: ConnectionFailed; it is down until a new connection delivers something (an event or
    #: a heartbeat). 0: never reconnect.
    window: float = 60.0
    #: The first wait before opening it again, doubling on each failed try.
    backoff: float = 0.25
    #: The longest wait between tries.
    max_wait: float = 5.0


class Follow:
    """One event stream followed over as many connections as it takes: where it is (the id
    of the last event seen), whether an answer that ended was the end, and how long to wait
    before the next try.

    Args:
        url: The service's base URL (for the error at the end).
        open_at: The call that opens the stream after an event id (None: the API's default).
        after: Where the stream starts.
        policy: How it is opened again.
        end: The event type after which the stream is over (None: it has no end).
        clock: Monotonic seconds (tests pass their own).
        jitter: A number in [0, 1) spreading the waits (so that the followers of a restarted
            service do not all come back at once).
    """

    def __init__(
        self,
        url: str,
        open_at: Callable[[int | None], Call[None]],
        after: int | None,
        policy: ReconnectPolicy,
        *,
        end: str | None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        what: str = "the event stream dropped",
    ) -> None:
        self.url = url
        self._what = what
        self.position = after
        self.policy = policy
        self._open_at = open_at
        self._end = end
        self._clock = clock
        self._jitter = jitter
        #: Whether a connection was ever opened (before that, a failure is not a drop).
        self._followed = False
        #: Whether the current connection delivered an event.
        self._delivered = False
        #: Whether the current connection asked to be opened again (``retry:``: a stop).
        self._asked_back = False
        self._last_type: str | None = None
        #: The task was found finished after a quiet answer: the next answer is the last look.
        self._last_look = False
        #: Since when the stream is down (None: it is up).
        self._down_since: float | None = None
        self._tries = 0

    def call(self) -> Call[None]:
        """The call that opens the stream where it is."""
        return self._open_at(self.position)

    def opened(self) -> None:
        """A connection answered with the stream."""
        self._followed = True
        self._delivered = False
        self._asked_back = False

    def heard(self, line: str = "") -> None:
        """The connection delivered ``line`` (an event's, or a heartbeat): the stream is up.
        A ``retry:`` line is the service asking to be called again (it is stopping)."""
        self._down_since = None
        self._tries = 0
        if line.startswith("retry:"):
            self._asked_back = True

    def seen(self, message: SseMessage) -> None:
        """An event was handed to the caller: a resumed stream starts after it."""
        if message.id is not None and message.id.isdigit():
            self.position = int(message.id)
        self._last_type = message.event
        self._delivered = True
        self._last_look = False  # the task went on (retried): a quiet answer is asked again

    def over(self) -> bool | None:
        """Whether an answer the service ended cleanly was the stream's end (see the module's
        docstring); a stream without end never is. None: it was if the task has finished,
        which the caller asks the service."""
        if self._end is None:
            return False
        if self._last_type == self._end:
            return True
        if self._delivered or self._asked_back:
            return False
        return True if self._last_look else None

    def last_look(self) -> None:
        """The task was found finished after an answer without an event: open the stream
        once more (at once), and take an answer without an event then for the end."""
        self._last_look = True

    def retry_in(self, failure: ClientError) -> float:
        """Seconds to wait before opening the stream again after ``failure`` (the stream
        dropped, or opening it again failed).

        Raises:
            ClientError: ``failure`` itself when it is not a drop (see the module's docstring)
                or reconnecting is off.
            ConnectionFailed: the stream has been down for the policy's window.
        """
        if not self._followed or self.policy.window <= 0 or not _transient(failure):
            raise failure
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
        left = self._down_since + self.policy.window - now
        if left <= 0:
            reason = failure.reason if isinstance(failure, ConnectionFailed) else failure.message
            raise ConnectionFailed(
                self.url,
                f"{self._what} and could not be resumed within "
                f"{self.policy.window:g} s (last: {reason})",
            ) from failure
        wait = min(self.policy.max_wait, self.policy.backoff * 2.0**self._tries)
        self._tries += 1
        # Half to all of the wait, and a last try at the window's end.
        return min(wait * (0.5 + self._jitter() / 2), left)


class Poll:
    """A long poll (``wait``) kept through a restart of the service, as a stream is: a poll
    cut off (the service stopping under it), a 502, 503 or 504, or after an answer any failed
    connection, is tried again for up to the policy's window, then given up with
    ConnectionFailed (its message begins with ``what``). Only a first poll that could not
    connect at all, from a client the service never answered (``reached`` False), fails at
    once (a wrong URL, a service that is not there)."""

    def __init__(
        self,
        url: str,
        policy: ReconnectPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
        reached: bool = False,
        what: str = "the wait for the task was cut off",
    ) -> None:
        self._follow = Follow(
            url, _never_opened, None, policy, end=None, clock=clock, jitter=jitter, what=what
        )
        self._clock = clock
        self._reached = reached

    def answered(self) -> None:
        """A poll was answered: the service is up."""
        self._reached = True
        self._follow.opened()
        self._follow.heard()

    def retry_in(self, failure: ClientError, deadline: float | None = None) -> float:
        """Seconds to wait before polling again after ``failure`` (see
        :meth:`Follow.retry_in`: what it raises, it raises), never past ``deadline`` (a
        :func:`time.monotonic` time: the wait's own timeout).

        Raises:
            ClientError: ``failure``, when the first poll could not connect, or the deadline
                has passed (the task cannot be read, so it cannot be answered as it is).
        """
        # A host that drops the connection (a firewall) times out instead of refusing it.
        unreached = (httpx.ConnectError, httpx.ConnectTimeout)
        if not self._reached and isinstance(failure.__cause__, unreached):
            raise failure
        self._reached = True
        self._follow.opened()
        pause = self._follow.retry_in(failure)
        if deadline is None:
            return pause
        left = deadline - self._clock()
        if left <= 0:
            raise failure
        return min(pause, left)


def _never_opened(position: int | None) -> Call[None]:  # pragma: no cover - a Poll opens none
    raise AssertionError("a poll opens no stream")


def _transient(failure: ClientError) -> bool:
    """Whether ``failure`` may pass as the service comes back (not the client's own pool
    being full: no request went out, and the service may well be up)."""
    if isinstance(failure, ApiError):
        return failure.status in TRANSIENT_STATUSES
    return isinstance(failure, ConnectionFailed) and not failure.pool_full
