"""The event hub: one reader per process tails ``task_events`` and fans events out.

Every event stream — one task's (``GET /api/v1/tasks/{id}/events``, the dashboard's live task
page) and the all-tasks feed (``GET /api/v1/events``) — is a :class:`Subscription` to one
:class:`EventFeed`. The feed's reader reads the events after its watermark (one query, however
many follow), woken by :class:`~orchestra.notify.TaskSignals` after each commit (this
process's, and other processes' through :meth:`~orchestra.db.engine.Database.watch`) and by a
timer, in case a wake-up is lost. An idle follower costs a waiting coroutine, not a query.

**Slow subscribers.** Each subscription buffers at most ``buffer`` events. One that falls
further behind loses its buffer and is told the id up to which it must read the database
itself (:attr:`Subscription.reread_upto`), from its own cursor: it never stalls the reader or
the other subscribers, and never holds more than ``buffer`` events. A new subscriber catches
up the same way, from where it resumes to the watermark.

**Caught-up followers** are not woken at all: a follower that gave its subscription a writer
(:attr:`Subscription.deliver`; the HTTP streams write the SSE chunk to their connection) and
whose task waits with nothing pending gets new events through it, from the reader, at once.
The writer keeps the follower's place (a task's stream: its sequence number, a hole, its
end), so either path, the reader's or the follower's own task, can go on from where the other
left off; a writer that cannot take events (a write still waits for the client) sends them
the usual way: buffered, and the task woken.

**Late commits (PostgreSQL).** Ids are taken at insert, transactions commit later: the reader
at watermark N can see N+2 before N+1 commits. It hands out events in id order and never past
a gap until the gap is settled: either every transaction that could still fill it has ended,
or ``gap_grace`` seconds have passed (a transaction held open that long; its event is then
skipped by the live feed, with a warning). "Every transaction that could fill it": at the
first look again after the gap was seen (:data:`GAP_RECHECK_SECONDS` later, time enough for
a transaction that had taken the missing id to have taken its transaction id too: a
transaction whose first write is the event's INSERT gets its id within that statement), the
reader takes a transaction id of its own (:func:`~orchestra.db.feed.xid_horizon`); once a
read's snapshot ``xmin`` has passed it, every such transaction has committed or rolled back,
and that read's answer is final. An id burned by a rolled-back transaction (a retry after a
conflict) thus holds the feed for two looks, about 0.1 s, not the grace period. SQLite has
one writer, so its ids commit in order and a gap is always settled.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager

from orchestra import logs
from orchestra.db import feed as reads
from orchestra.db.engine import POSTGRESQL, Database
from orchestra.db.feed import FeedEvent, FeedFilter
from orchestra.notify import TaskSignals
from orchestra.shared_read import SharedReads

log = logs.get("orchestra.feed")

#: The reader looks at least this often even when nothing woke it (a lost wake-up).
POLL_SECONDS = 1.0
#: While a gap is open, the reader looks again this soon.
GAP_RECHECK_SECONDS = 0.05
#: How long a gap may hold the feed back before its ids are given up (PostgreSQL).
GAP_GRACE_SECONDS = 5.0
#: How many events a subscription holds before it must read the database itself.
BUFFER_EVENTS = 1000
#: A stream sends a comment this often while nothing happens, so proxies keep it open.
HEARTBEAT_SECONDS = 15.0
#: On PostgreSQL a starting reader looks back this many ids for transactions still open.
START_LOOKBACK = 1000
#: After a failed read, the reader waits this long before the next one.
RETRY_SECONDS = 1.0


#: How a follower lets the reader write its events itself (see :meth:`Subscription.push`):
#: called with the events its filter passed, it writes them and answers True, or answers False
#: to have them buffered and its own task woken, as without it.
Deliver = Callable[[list[FeedEvent]], bool]


class Pushed(enum.Enum):
    """What became of events pushed to a subscription."""

    BUFFERED = "buffered"  # its task was woken to take them
    OVERFLOWED = "overflowed"  # its buffer was dropped: its task reads the database
    DELIVERED = "delivered"  # written by its :attr:`~Subscription.deliver`


class Subscription:
    """One follower's place at the hub: the events for it that the reader found, bounded."""

    def __init__(self, wanted: FeedFilter, buffer: int, watermark: int) -> None:
        self.wanted = wanted
        self._buffer: deque[FeedEvent] = deque()
        self._limit = buffer
        self._wake = asyncio.Event()
        self._beat = False
        self._waiting = False  # its task waits in wait(), with nothing left to do
        #: Set when events up to this id must be read from the database (it subscribed
        #: below the watermark, or its buffer overflowed); the buffer holds what follows.
        self.reread_upto: int | None = watermark
        #: The follower's own writer, for the reader to call while the follower is caught up.
        self.deliver: Deliver | None = None
        #: The service is stopping: the follower ends once it has what it was handed.
        self.closed = False

    @property
    def waiting(self) -> bool:
        """Whether its task waits for events, with nothing left to do."""
        return self._waiting

    def push(self, events: list[FeedEvent], watermark: int) -> Pushed:
        """Add events the reader found (called by the reader only). Past the limit, drop the
        buffer: the subscriber reads everything up to ``watermark`` from the database.

        A follower that is caught up (its task waits, no reread or buffered event before
        these) and has a :attr:`deliver` gets them through it, at once and without waking its
        task: a thousand followers of one event cost a thousand writes, not a thousand task
        switches through the stream's generators."""
        if (
            self._waiting
            and self.deliver is not None
            and not self._buffer
            and self.reread_upto is None
            and self._delivered(self.deliver, events)
        ):
            return Pushed.DELIVERED
        self._wake.set()
        if len(self._buffer) + len(events) > self._limit:
            self._buffer.clear()
            self.reread_upto = watermark
            return Pushed.OVERFLOWED
        self._buffer.extend(events)
        return Pushed.BUFFERED

    @staticmethod
    def _delivered(deliver: Callable[[list[FeedEvent]], bool], events: list[FeedEvent]) -> bool:
        """``deliver(events)``; a follower's writer that raises has delivered nothing (its
        task then gets the events), and never stops the reader or the other followers."""
        try:
            return deliver(events)
        except Exception as exc:
            log.warning("feed.delivery_failed", error=f"{type(exc).__name__}: {exc}")
            return False

    def take(self) -> list[FeedEvent]:
        """The buffered events, oldest first; the buffer is empty after."""
        events = list(self._buffer)
        self._buffer.clear()
        return events

    def take_reread(self) -> int | None:
        """:attr:`reread_upto`, cleared."""
        upto, self.reread_upto = self.reread_upto, None
        return upto

    def beat(self) -> None:
        """Wake the subscriber for a heartbeat (called by the feed's heartbeat)."""
        self._beat = True
        self._wake.set()

    def wake(self) -> None:
        """Wake the subscriber: its :attr:`deliver` ended its stream, say."""
        self._wake.set()

    def close(self) -> None:
        """Tell the subscriber to end (:attr:`closed`), and wake it."""
        self.closed = True
        self._wake.set()

    async def wait(self) -> bool:
        """Wait for events (or a reread); False when woken for a heartbeat instead.

        No timer per subscriber: one heartbeat of the feed wakes them all (a thousand
        ``asyncio.timeout`` reschedules cost more than the fan-out itself)."""
        if not self._buffer and self.reread_upto is None:
            self._waiting = True
            try:
                await self._wake.wait()
            finally:
                self._waiting = False
            self._wake.clear()
        if self._beat:
            self._beat = False
            return bool(self._buffer) or self.reread_upto is not None
        return True


class _Place:
    """Where one :meth:`EventFeed.follow` is: the last id given, by its own task or by the
    reader through ``write``."""

    __slots__ = ("after", "write")

    def __init__(self, after: int, write: Callable[[list[FeedEvent]], bool] | None) -> None:
        self.after, self.write = after, write

    def deliver(self, events: list[FeedEvent]) -> bool:
        """:data:`Deliver` for the follow: the events past its place, written."""
        if events[0].id <= self.after:
            events = [e for e in events if e.id > self.after]
            if not events:
                return True
        assert self.write is not None
        if not self.write(events):
            return False
        self.after = events[-1].id
        return True


class _Gap:
    """Ids the reader saw skipped: from ``first`` on, since ``seen``; ``horizon``, the
    transaction id taken at the first look again (None before it)."""

    def __init__(self, first: int, seen: float) -> None:
        self.first, self.seen = first, seen
        self.horizon: int | None = None


class EventFeed:
    """One reader of every task's events, fanning them out to subscriptions.

    Start it with :meth:`run` (the lifespan runs it as a background task); subscribe with
    :meth:`subscribe` or follow with :meth:`follow`.
    """

    def __init__(
        self,
        db: Database,
        signals: TaskSignals,
        *,
        poll_seconds: float = POLL_SECONDS,
        gap_grace: float = GAP_GRACE_SECONDS,
        buffer: int = BUFFER_EVENTS,
        heartbeat: float = HEARTBEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.signals = signals
        self.poll_seconds = poll_seconds
        self.gap_grace = gap_grace
        self.buffer = buffer
        self.heartbeat = heartbeat
        self.clock = clock
        #: Every id up to here is settled: handed out, or known never to appear.
        self.watermark = 0
        #: Reads of the tail so far, subscriptions' buffers overflowed, and events handed to
        #: followers' own writers (counted per follower and read; for tests).
        self.reads = 0
        self.overflows = 0
        self.delivered = 0
        self._started = asyncio.Event()
        self._joined = asyncio.Event()  # someone subscribed
        self._beat = asyncio.Event()  # set and cleared at each heartbeat
        self._changed: asyncio.Event | None = None  # what wakes the reader
        self._gap: _Gap | None = None
        self._groups: dict[FeedFilter, set[Subscription]] = {}
        self._task_filters: dict[int, set[FeedFilter]] = defaultdict(set)
        self._shared = SharedReads()
        self._closing = False

    @property
    def closing(self) -> bool:
        """Whether the service is stopping (:meth:`close` was called)."""
        return self._closing

    def close(self) -> None:
        """The service is stopping: every follower's stream ends now, once it has what it was
        handed (a client reconnects, after its last event, to a process that runs on), instead
        of holding the HTTP drain of the stop for its full wait."""
        self._closing = True
        for group in self._groups.values():
            for sub in group:
                sub.close()
        self._beat.set()

    @property
    def subscribers(self) -> int:
        """How many subscriptions are open."""
        return sum(len(group) for group in self._groups.values())

    @property
    def waiting(self) -> int:
        """How many subscriptions' tasks wait for events, with nothing left to do."""
        return sum(sub.waiting for group in self._groups.values() for sub in group)

    async def start(self) -> None:
        """Find where to start: the newest event (on PostgreSQL a little before it, so that
        transactions still open then are waited for like any gap)."""
        newest = await reads.last_id(self.db)
        lookback = START_LOOKBACK if self.db.dialect == POSTGRESQL else 0
        self.watermark = max(0, newest - lookback)
        self._started.set()

    async def run(self) -> None:
        """Read and fan out until cancelled; a failed read is logged and tried again."""
        if not self._started.is_set():
            await self.start()
        beats = asyncio.create_task(self._heartbeat(), name="event-feed-heartbeat")
        try:
            await self._read_loop()
        finally:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)

    async def _heartbeat(self) -> None:
        """Every ``heartbeat`` seconds, wake every subscriber to send a heartbeat."""
        while True:
            await asyncio.sleep(self.heartbeat)
            for group in self._groups.values():
                for sub in group:
                    sub.beat()
            self._beat.set()  # wakes every waiter of heartbeats(), however soon it is cleared
            self._beat.clear()

    async def _read_loop(self) -> None:
        outage = logs.Outage(log, "feed.read_failed")
        with self.signals.watch_all() as changed:
            self._changed = changed
            while True:
                changed.clear()
                try:
                    again = await self.read_once()
                except Exception as exc:
                    outage.failed(exc)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                outage.succeeded()
                if again == 0.0:
                    continue
                # Nobody follows: keep the watermark fresh on the timer, and leave the
                # database alone on every commit until someone subscribes.
                wake = changed if self._groups else self._joined
                try:
                    async with asyncio.timeout(again):
                        await wake.wait()
                except TimeoutError:
                    pass
                self._joined.clear()

    async def read_once(self) -> float:
        """Read the tail once and hand out what is settled; returns how soon to read again
        (0: at once, a full page was read)."""
        if not self._groups:
            # Nobody follows: move the watermark up to the newest event rather than read
            # every event since (under load, a second's thousand events, decoded on the event
            # loop: 10 ms and more), as a starting reader does (on PostgreSQL a little
            # before it, so that transactions still open are waited for as any gap, once
            # someone follows; nor does it take transaction ids for gaps nobody waits on).
            newest = await reads.last_id(self.db)
            if not self._groups:  # nobody subscribed meanwhile at the old watermark
                lookback = START_LOOKBACK if self.db.dialect == POSTGRESQL else 0
                if newest - lookback > self.watermark:
                    self.watermark, self._gap = newest - lookback, None
            return self.poll_seconds
        self.reads += 1
        tail = await reads.read_tail(self.db, self.watermark)
        settled: list[FeedEvent] = []
        expected = self.watermark + 1
        gap_open = False
        for event in tail.events:
            if event.id != expected and tail.xmin is not None:
                if not await self._gap_settled(expected, tail.xmin):
                    gap_open = True
                    break
            settled.append(event)
            expected = event.id + 1
        if not gap_open:
            self._gap = None
        if settled:
            self.watermark = settled[-1].id
            self._fan_out(settled)
        if gap_open:
            return GAP_RECHECK_SECONDS
        return 0.0 if len(tail.events) >= reads.EVENTS_PER_READ else self.poll_seconds

    async def _gap_settled(self, first: int, xmin: int) -> bool:
        """Whether the ids from ``first`` up to the next visible one will never appear (the
        read that says so had snapshot ``xmin``)."""
        now = self.clock()
        gap = self._gap
        if gap is None or gap.first != first:
            self._gap = _Gap(first, now)
            return False
        if gap.horizon is not None and xmin >= gap.horizon:
            self._gap = None  # every transaction that could fill it has ended
            return True
        if now - gap.seen >= self.gap_grace:
            log.warning("feed.gap_skipped", first_id=first, waited_s=round(now - gap.seen, 1))
            self._gap = None
            return True
        if gap.horizon is None:
            gap.horizon = await reads.xid_horizon(self.db)
        return False

    def _fan_out(self, events: list[FeedEvent]) -> None:
        """Give each subscription the events its filter passes; each distinct filter is
        applied once, however many share it."""
        watermark = self.watermark
        by_task: dict[int, list[FeedEvent]] = defaultdict(list)
        for event in events:
            if event.task_id in self._task_filters:
                by_task[event.task_id].append(event)
        for task_id, own in by_task.items():
            for wanted in self._task_filters[task_id]:
                matched = [e for e in own if wanted.matches(e)]
                if matched:
                    self._push(self._groups[wanted], matched, watermark)
        for wanted, group in self._groups.items():
            if wanted.task_id is not None:
                continue
            matched = [e for e in events if wanted.matches(e)]
            if matched:
                self._push(group, matched, watermark)

    def _push(self, group: set[Subscription], events: list[FeedEvent], watermark: int) -> None:
        # A copy: a follower's writer runs here, and must not be able to change the set.
        for sub in list(group):
            pushed = sub.push(events, watermark)
            if pushed is Pushed.DELIVERED:
                self.delivered += 1
            elif pushed is Pushed.OVERFLOWED:
                self.overflows += 1

    def wake(self) -> None:
        """Read now: events were added that no task signal announces (a submit's
        ``task.queued``: nobody waits on a task that did not exist)."""
        if self._changed is not None:
            self._changed.set()

    async def newest(self) -> int:
        """Where a follower of what happens next starts: after the newest stored event."""
        return max(self.watermark, await reads.last_id(self.db))

    async def highest_given(self) -> int | None:
        """The highest event id the database ever gave, deleted ones included: a client
        resuming after a higher one holds an id of another database (or of an older copy
        of this one). None: not known (then any id is taken)."""
        given = await reads.highest_given(self.db)
        return None if given is None else max(self.watermark, given)

    async def heartbeats(self) -> AsyncIterator[None]:
        """Each heartbeat of the feed, without end: for a stream with nothing left to follow
        that must still show it is alive. Not a subscription, so it never makes the reader
        read; one timer serves every such stream. Ends when the feed closes."""
        while not self._closing:
            await self._beat.wait()
            if not self._closing:
                yield None

    @contextmanager
    def subscribe(self, wanted: FeedFilter) -> Iterator[Subscription]:
        """A subscription for the events ``wanted`` passes, from the watermark on (its
        :attr:`~Subscription.reread_upto` is the watermark: what came before is the
        database's)."""
        sub = Subscription(wanted, self.buffer, self.watermark)
        sub.closed = self._closing
        self._groups.setdefault(wanted, set()).add(sub)
        self._joined.set()
        if wanted.task_id is not None:
            self._task_filters[wanted.task_id].add(wanted)
        try:
            yield sub
        finally:
            group = self._groups.get(wanted)
            if group is not None:
                group.discard(sub)
                if not group:
                    del self._groups[wanted]
                    if wanted.task_id is not None:
                        filters = self._task_filters[wanted.task_id]
                        filters.discard(wanted)
                        if not filters:
                            del self._task_filters[wanted.task_id]

    async def follow(
        self,
        wanted: FeedFilter,
        after: int = 0,
        write: Callable[[list[FeedEvent]], bool] | None = None,
    ) -> AsyncIterator[list[FeedEvent]]:
        """The events ``wanted`` passes with an id above ``after``: the stored ones, then new
        ones as the reader finds them, in id order, without end. An empty list now and then
        while nothing happens (a heartbeat). An ``after`` older than the oldest event kept
        (retention deletes old ones) starts at the oldest.

        With ``write``, the reader hands new events to it while the follower is caught up
        (False from it: it cannot take them now, they come from the iterator as without it);
        those it took are not yielded."""
        await self._started.wait()
        place = _Place(after, write)
        with self.subscribe(wanted) as sub:
            if write is not None:
                sub.deliver = place.deliver
            while True:
                upto = sub.take_reread()
                if upto is not None:
                    async for page in self._catch_up(wanted, place.after, upto):
                        place.after = page[-1].id
                        yield page
                    place.after = max(place.after, upto)
                    continue
                live = [e for e in sub.take() if e.id > place.after]
                if live:
                    place.after = live[-1].id
                    yield live
                elif sub.closed:
                    return
                elif not await sub.wait():
                    yield []

    async def _catch_up(
        self, wanted: FeedFilter, after: int, upto: int
    ) -> AsyncIterator[list[FeedEvent]]:
        """The stored events ``after`` < id <= ``upto`` that ``wanted`` passes, page by page
        (followers at the same place share each read)."""
        limit = reads.EVENTS_PER_READ
        while after < upto:
            page = await self._shared.read(
                ("between", wanted, after, upto),
                functools.partial(reads.events_between, self.db, after, upto, wanted, limit),
            )
            if page:
                yield page
                after = page[-1].id
            if len(page) < limit:
                return
