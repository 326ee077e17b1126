"""The storage layer's one entry point: every operation on tasks, as a named, documented
method of :class:`TaskStore`, grouped by topic.

The SQL sits beside each operation's transaction body, in one module per topic:

- :mod:`~orchestra.db.queue`: submitting (enqueue, with its idempotency key);
- :mod:`~orchestra.db.attempts`: an attempt's life (claim, lease renewal, steps, its end, lost
  leases);
- :mod:`~orchestra.db.bulk`: what people ask for (cancel, retry; one task or many);
- :mod:`~orchestra.db.retention`: deleting finished tasks;
- :mod:`~orchestra.db.reads` and :mod:`~orchestra.db.events`: reading tasks and their events.

State changes are guarded by the state they expect (:mod:`~orchestra.db.guards` builds the
status guards from :data:`~orchestra.domain.TRANSITIONS`; a worker's writes also carry its
lease: ``lease_owner = :owner AND attempts = :attempt``), so a worker that lost its lease
cannot overwrite what a newer attempt wrote: the guarded UPDATE simply matches no row.

Every time the store writes or compares (leases, due times, events) is read from its clock,
which tests replace; the worker reads the same clock for a retry's due time and the
retention cutoff.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, TypeVar

import msgspec
from sqlalchemy import Connection, select

from orchestra.db import attempts, bulk, claim, counts, events, queue, retention
from orchestra.db.attempts import Ending, LeaseEnd, Renewal
from orchestra.db.batches import BatchStore
from orchestra.db.engine import Database
from orchestra.db.overview import SummaryPage
from orchestra.db.reads import Reads, reads_for
from orchestra.db.rows import dump, owners_on, task_from_row
from orchestra.db.tables import tasks
from orchestra.domain import (
    AttemptStatus,
    Lease,
    NewTask,
    Step,
    Task,
    TaskError,
    TaskStatus,
    iso,
    now,
)
from orchestra.errors import StorageUnreachable
from orchestra.event_types import (
    EventPayload,
    TaskFinished,
    TaskHandedBack,
    TaskRetrying,
)

__all__ = ["Enqueued", "Renewal", "TaskStore"]

#: The most attempts whose last write is remembered as unsure (:meth:`TaskStore._fenced`).
_UNSURE_MAX = 10_000

#: What one of an attempt's fenced writes answers.
W = TypeVar("W")

#: How each terminal status of a task records the attempt that reached it.
_ATTEMPT_ENDED = {
    TaskStatus.SUCCEEDED: AttemptStatus.SUCCEEDED,
    TaskStatus.FAILED: AttemptStatus.FAILED,
    TaskStatus.CANCELLED: AttemptStatus.CANCELLED,
}


class Enqueued(msgspec.Struct, frozen=True):
    """The outcome of an enqueue: the task, and whether this call created it.

    ``created`` is False when an earlier submit used the same idempotency key; ``same_request``
    then tells whether that submit had the same body.
    """

    task: Task
    created: bool
    same_request: bool = True


class TaskStore:
    """Tasks, their attempts and their steps in the database."""

    def __init__(
        self,
        db: Database,
        on_change: Callable[[Iterable[int]], None] = lambda _ids: None,
        *,
        on_progress: Callable[[Iterable[int]], None] | None = None,
        clock: Callable[[], datetime] = now,
    ) -> None:
        """``on_change`` is called with task ids after each committed change to them (it wakes
        the requests waiting on those tasks: ``?wait`` and event streams); ``on_progress``
        (``on_change`` unless given) instead after a change that leaves them running: a claim,
        a step's start or end, streamed text. ``clock`` gives the current time (a zoned
        datetime) for everything the store writes or compares."""
        self.db = db
        self.on_change = on_change
        self.on_progress = on_change if on_progress is None else on_progress
        self.clock = clock
        #: The attempts whose last write may have committed unseen, with its last event.
        self._unsure: dict[tuple[int, int], EventPayload] = {}

    def _now(self, offset_seconds: float = 0.0) -> str:
        """The clock's time (plus an offset), as stored."""
        moment = self.clock()
        return iso(moment + timedelta(seconds=offset_seconds) if offset_seconds else moment)

    def _changed(self, task_id: int, changed: bool) -> bool:
        """Tell the waiters about a committed change to ``task_id``; passes ``changed`` on."""
        if changed:
            self.on_change([task_id])
        return changed

    def _progressed(self, task_id: int, changed: bool) -> bool:
        """:meth:`_changed` for a change that leaves the task running."""
        if changed:
            self.on_progress([task_id])
        return changed

    async def _fenced(
        self,
        lease: Lease,
        work: Callable[[Connection], W],
        last: EventPayload,
        landed: W,
        *,
        instead: tuple[EventPayload, W] | None = None,
    ) -> W:
        """One of an attempt's writes (fenced by its lease), ending with the event ``last``,
        which no other write of the attempt ends with (a step's start or end, the attempt's).

        When the database server is lost during a write (StorageUnreachable), its commit may
        have landed with only its answer lost. The worker then tries the same write again;
        that try first looks whether ``last`` is the task's last event, and if so answers
        ``landed`` (what ``work`` answers when it wrote ``last``) without writing it twice (a
        step's events or the task's end recorded twice, or a finish taken for a lost
        lease). ``instead``: another last event ``work`` may end with, and its answer (a
        retry that a cancel turned into the task's end); not when it follows ``last`` (the
        write landed as asked, and a person cancelled the task queued again since)."""
        key = (lease.task_id, lease.attempt)
        if self._unsure.get(key) == last:
            tail = await events.last_events(self.db, lease.task_id, 2)  # one read for both
            final, before = (tail[-1] if tail else None), (tail[0] if len(tail) == 2 else None)
            if final == events.stored(last):
                del self._unsure[key]
                return landed
            if (
                instead is not None
                and final == events.stored(instead[0])
                and before != events.stored(last)
            ):
                del self._unsure[key]
                return instead[1]
        self._unsure.pop(key, None)
        try:
            return await self.db.transaction(work, small=True)
        except StorageUnreachable:
            if len(self._unsure) >= _UNSURE_MAX:  # attempts that gave up (their lease ran out)
                self._unsure.clear()
            self._unsure[key] = last
            raise

    # -- submitting (queue) -------------------------------------------------------------------

    async def enqueue(self, new: NewTask, *, wake_others: bool = True) -> Enqueued:
        """Insert a queued task; with an idempotency key already used in its scope
        (``new.idempotency_scope``), return that task. ``wake_others``: see
        :func:`~orchestra.db.queue.enqueue`."""
        while True:
            enqueue = functools.partial(
                queue.enqueue, new=new, at=self._now(), wake_others=wake_others
            )
            row = await self.db.transaction(enqueue, small=True)
            if row is not None:
                return Enqueued(task=task_from_row(row), created=True)
            existing = await self.enqueued_before(new)
            if existing is not None:
                return existing
            # Its task was deleted (retention) between the two: the key is free again.

    async def enqueued_before(self, new: NewTask) -> Enqueued | None:
        """The task an earlier submit made with ``new``'s idempotency key (which an insert
        of ``new`` found used), and whether it was the same request; None when that task is
        gone (retention deleted it)."""
        assert new.idempotency_key is not None  # only a used key keeps a task out
        found = await self.by_idempotency_key(new.idempotency_scope, new.idempotency_key)
        if found is None:
            return None
        task, request_hash = found
        return Enqueued(task=task, created=False, same_request=request_hash == new.request_hash)

    async def by_idempotency_key(self, scope: str, key: str) -> tuple[Task, str | None] | None:
        """The task submitted with idempotency key ``key`` in ``scope``, and the hash of the
        request that submitted it; None when the key is unused."""
        async with self.db.read() as conn:
            found = (
                await conn.execute(
                    select(tasks).where(
                        tasks.c.idempotency_scope == scope, tasks.c.idempotency_key == key
                    )
                )
            ).one_or_none()
        return None if found is None else (task_from_row(found), found.request_hash)

    # -- an attempt's life: the worker's side (attempts) --------------------------------------

    async def claim(
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        *,
        skip_models: Collection[str] = (),
        first_step: Callable[[Task], str | None] | None = None,
        min_priority: int | None = None,
    ) -> list[Task]:
        """Atomically take up to ``limit`` due tasks, best first, and lease them to ``owner``.

        One ``UPDATE … RETURNING``: a task is claimed by exactly one caller. Each claim starts
        a new attempt (recorded in ``task_attempts`` in the same transaction). Tasks for a model
        in ``skip_models`` (at its concurrency limit) stay queued. Returned in claim order
        (priority, then run time, then age). Only tasks of priority ``min_priority`` or more
        are taken (None: any; a worker's reserved slot claims single tasks only).

        Args:
            first_step: names each claimed task's first step (None: none), which the claim
                then starts too, in the same transaction, as :meth:`start_step` would: so a
                task's first write after its claim is its first step's end. Called inside the
                transaction (on the event loop or the writer's thread): it must be quick and
                touch only memory.
        """
        at, expires = self._now(), self._now(lease_seconds)
        claimed = await self.db.transaction(
            lambda conn: claim.claim(
                conn, owner, limit, at, expires, skip_models, first_step, min_priority
            ),
            small=True,
        )
        self.on_progress(t.id for t in claimed)
        claimed.sort(key=lambda t: (-t.priority, t.run_at, t.id))
        return claimed

    async def renew_leases(
        self, owner: str, task_ids: Iterable[int], lease_seconds: float
    ) -> Renewal:
        """Extend ``owner``'s leases on ``task_ids``; says which are held and which were asked
        to cancel (so a worker in any process learns of a cancel at its next renewal)."""
        ids = list(task_ids)
        if not ids:
            return Renewal(held=set(), cancel_requested=set())
        expires = self._now(lease_seconds)
        return await self.db.transaction(
            lambda conn: attempts.renew(conn, owner, ids, expires), small=True
        )

    async def start_step(self, lease: Lease, step_id: str, position: int) -> bool:
        """Record that a step started; False when the lease is lost."""
        at = self._now()
        written = await self._fenced(
            lease,
            lambda conn: attempts.start_step(conn, lease, step_id, position, at),
            attempts.step_started(lease, step_id, position),
            True,
        )
        return self._progressed(lease.task_id, written)

    async def add_text(self, lease: Lease, step_id: str, text: str) -> bool:
        """Record a piece of a step's streamed answer (a ``step.tokens`` event); False when the
        lease is lost."""
        at = self._now()
        # Not :meth:`_fenced`: two pieces of text in a row may be the same, so the last event
        # cannot tell whether this one landed (after a lost answer, a piece may be twice).
        written = await self.db.transaction(
            lambda conn: attempts.add_text(conn, lease, step_id, text, at), small=True
        )
        return self._progressed(lease.task_id, written)

    async def finish_step(self, lease: Lease, step: Step, text: str = "") -> bool:
        """Store a step's outcome, after ``text`` (the rest of its streamed answer, as a
        ``step.tokens`` event); False when the lease is lost.

        The attempt's last step is better ended with the attempt itself: the ``step`` argument
        of :meth:`finish`, :meth:`retry_later` and :meth:`release`.
        """
        at = self._now()
        written = await self._fenced(
            lease,
            lambda conn: attempts.end_step(conn, lease, step, text, at),
            attempts.step_ended(step),
            True,
        )
        return self._progressed(lease.task_id, written)

    async def finish(
        self,
        lease: Lease,
        status: TaskStatus,
        *,
        result: Any = None,
        error: TaskError | None = None,
        step: Step | None = None,
        text: str = "",
    ) -> bool:
        """Move a running task to a terminal status; False when the lease is lost.

        Args:
            step: the attempt's last step, ended in the same transaction (after ``text``, the
                rest of its streamed answer), as :meth:`finish_step` would.
        """
        at = self._now()
        values = {
            "v_status": status.value,
            "v_result": dump(result),
            "v_error": dump(error),
            "v_at": at,
        }
        event = TaskFinished(status=status.value, error=error)
        ending = Ending(attempts.FINISH, values, _ATTEMPT_ENDED[status], error, event, status)
        return await self._end(lease, ending, at, step, text) is not None

    async def retry_later(
        self,
        lease: Lease,
        error: TaskError,
        run_at: datetime,
        *,
        step: Step | None = None,
        text: str = "",
    ) -> TaskStatus | None:
        """Put a task whose attempt failed with a retryable error back in the queue, due at
        ``run_at``; the attempt is recorded as failed with its error. Returns ``queued``, or
        ``cancelled`` when a cancel was asked for meanwhile (it wins), or None when the lease
        is lost. ``step`` and ``text``: as for :meth:`finish`."""
        due = iso(run_at)
        event = TaskRetrying(attempt=lease.attempt, error=error, next_run_at=due)
        values = {"v_error": dump(error), "v_run_at": due}
        ending = Ending(
            attempts.RETRY_LATER, values, AttemptStatus.FAILED, error, event, TaskStatus.QUEUED
        )
        return await self._end(lease, ending, self._now(), step, text)

    async def release(
        self, lease: Lease, *, step: Step | None = None, text: str = ""
    ) -> TaskStatus | None:
        """Hand a running task back to the queue (shutdown); the attempt does not count
        against ``max_attempts``. Returns as :meth:`retry_later` does. ``step`` and ``text``:
        as for :meth:`finish`."""
        at = self._now()
        event = TaskHandedBack(attempt=lease.attempt)
        ending = Ending(
            attempts.HAND_BACK, {}, AttemptStatus.HANDED_BACK, None, event, TaskStatus.QUEUED
        )
        return await self._end(lease, ending, at, step, text)

    async def _end(
        self, lease: Lease, ending: Ending, at: str, step: Step | None, text: str
    ) -> TaskStatus | None:
        """End the lease's attempt in one transaction (:func:`attempts.end_attempt`): the
        task's status after, or None when the lease is lost."""
        landed: TaskStatus | None = ending.then
        cancelled: TaskStatus | None = TaskStatus.CANCELLED
        status = await self._fenced(
            lease,
            lambda conn: attempts.end_attempt(conn, lease, ending, at, step, text),
            ending.event,
            landed,
            # What it ends with when a cancel asked for meanwhile wins (a retry, a hand-back).
            instead=(attempts.CANCELLED_MEANWHILE, cancelled)
            if landed is TaskStatus.QUEUED
            else None,
        )
        self._changed(lease.task_id, status is not None)
        return status

    async def requeue_expired(self, running: Collection[int] = ()) -> dict[int, LeaseEnd]:
        """Return tasks whose lease expired (their worker died) to the queue.

        The dead attempt is recorded as lost and counts against ``max_attempts``; a task with
        no attempts left fails instead, with an error saying so. Returns each affected id and
        how it ended (the status it moved to, its template). ``running``: the tasks this
        process runs (and renews), left be (:func:`~orchestra.db.attempts.expire_leases`).
        """
        at = self._now()
        moved = await self.db.transaction(
            lambda conn: attempts.expire_leases(conn, at, running=running)
        )
        self.on_change(moved)
        return moved

    async def requeue_orphaned(self, owner: str, cause: str) -> dict[int, LeaseEnd]:
        """Return the tasks of worker pool ``owner``, whose process is known dead (``cause``
        says how), to the queue now instead of when their leases expire; as
        :meth:`requeue_expired` otherwise."""
        at = self._now()
        moved = await self.db.transaction(
            lambda conn: attempts.expire_leases(conn, at, owner=owner, cause=cause)
        )
        self.on_change(moved)
        return moved

    async def fold_counts(self) -> None:
        """Fold the count changes PostgreSQL's trigger logged into the counters (nothing to
        do on SQLite, whose triggers update the counters themselves)."""
        if self.db.dialect == "postgresql":
            await self.db.transaction(counts.fold)

    # -- requests from people: cancel and retry (bulk) ----------------------------------------

    async def cancel(self, task_id: int) -> TaskStatus | None:
        """Cancel a task: a queued one at once; a running one is flagged for its worker.

        Returns the status after the call (``running`` when the worker still has to stop), or
        None when there is no such task.
        """
        at = self._now()

        def work(conn: Connection) -> TaskStatus | None:
            acted = bulk.cancel(conn, [task_id], at).acted
            return acted.get(task_id) or bulk.status_of(conn, task_id)

        status = await self.db.transaction(work)
        self.on_change([task_id])
        return status

    async def cancel_many(self, ids: Collection[int]) -> bulk.Cancelled:
        """:meth:`cancel` for a chunk of tasks (up to a few thousand), in one transaction:
        the tasks acted on, cancelled or running (flagged for its worker; ids of missing or
        finished tasks are left out), and the templates of those cancelled at once."""
        at = self._now()
        done = await self.db.transaction(lambda conn: bulk.cancel(conn, ids, at))
        self.on_change(done.acted)
        return done

    async def retry(self, task_id: int) -> tuple[TaskStatus | None, bool]:
        """Queue a failed or cancelled task again as a new attempt, due now.

        The task gets at least one more attempt than it has used. Returns (status after, whether
        it was re-queued); the status is None when there is no such task.
        """
        at = self._now()

        def work(conn: Connection) -> tuple[TaskStatus | None, bool]:
            requeued = bool(bulk.retry(conn, [task_id], at))
            return bulk.status_of(conn, task_id), requeued

        status, requeued = await self.db.transaction(work)
        if requeued:
            self.on_change([task_id])
        return status, requeued

    async def retry_many(self, ids: Collection[int]) -> dict[int, bool]:
        """:meth:`retry` for a chunk of tasks (up to a few thousand), in one transaction.

        Returns, for each id given, whether that task was queued again.
        """
        at = self._now()
        requeued = set(await self.db.transaction(lambda conn: bulk.retry(conn, ids, at)))
        self.on_change(requeued)
        return {task_id: task_id in requeued for task_id in ids}

    # -- retention ----------------------------------------------------------------------------

    async def delete_finished_before(self, cutoff: datetime, batch: int = 500) -> int:
        """Delete up to ``batch`` finished tasks (with their steps and attempts) that finished
        before ``cutoff``, oldest first; returns how many. Small batches keep each write
        transaction short, so the queue never waits long behind retention."""
        before = iso(cutoff)
        # The finished batches among those tasks are counted and kept first, by a read and a
        # short write: counted inside the delete's transaction, a batch of a million rows held
        # every other write for about a second.
        async with self.db.read() as conn:
            query = retention.batches_to_keep(self.db.dialect, before, batch)
            owners = [int(batch_id) for batch_id in (await conn.execute(query)).scalars()]
        if owners:
            await BatchStore(self.db).tallies(owners)
        return await self.db.transaction(
            lambda conn: retention.delete_finished_before(conn, before, batch)
        )

    async def delete_records_before(self, cutoff: datetime, batch: int = 500) -> int:
        """Delete up to ``batch`` finished webhook deliveries and ``batch`` schedule ticks from
        before ``cutoff`` (:func:`~orchestra.db.retention.delete_records_before`)."""
        before = iso(cutoff)
        return await self.db.transaction(
            lambda conn: retention.delete_records_before(conn, before, batch)
        )

    # -- reading ------------------------------------------------------------------------------

    @cached_property
    def reads(self) -> Reads:
        """The reads the API serves most (a task, its events, a page): one statement each
        where the database allows it (:func:`~orchestra.db.reads.reads_for` chooses)."""
        return reads_for(self.db)

    async def events_after(self, task_id: int, seq: int) -> list[events.TaskEvent]:
        """A task's events after sequence number ``seq``, in order (500 at most)."""
        return await self.reads.events_after(task_id, seq)

    async def last_event_seq(self, task_id: int) -> int:
        """The sequence number of the task's last event (0 with none)."""
        return await events.last_seq(self.db, task_id)

    async def step_text(self, task_id: int, step: str, attempt: int, upto: int) -> str:
        """The text a step of an attempt has streamed so far, up to event ``upto``."""
        return await events.step_text(self.db, task_id, step, attempt, upto)

    async def get_task(self, task_id: int) -> Task | None:
        """One task with its attempts and the steps of its current attempt, or None."""
        return await self.reads.task(task_id)

    async def running_owners(self, host: str) -> list[str]:
        """The worker pools on ``host`` (their owner names start ``host:``) that hold the
        lease of a running task."""
        query = owners_on(tasks.c.lease_owner, host, tasks.c.status == TaskStatus.RUNNING.value)
        async with self.db.read() as conn:
            return [str(owner) for owner in (await conn.execute(query)).scalars()]

    async def cancels_requested(self, task_ids: Collection[int]) -> set[int]:
        """Those of ``task_ids`` someone asked to cancel (a read: the lease renewal tells
        too, later, with its write)."""
        if not task_ids:
            return set()
        query = select(tasks.c.id).where(
            tasks.c.id.in_(list(task_ids)), tasks.c.cancel_requested != 0
        )
        async with self.db.read() as conn:
            return set((await conn.execute(query)).scalars())

    async def status_of(self, task_id: int) -> TaskStatus | None:
        """A task's status alone (a cheaper read than :meth:`get_task`), or None."""
        return await self.reads.status(task_id)

    async def list_page(
        self,
        *,
        status: TaskStatus | None = None,
        template: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> SummaryPage:
        """A page of task summaries, newest first, with keyset pagination on the id.

        Summaries leave out ``params``, the result, steps and attempts, and the query does not
        read those columns: a page's size is bounded by ``limit``, however big the tasks are.
        The dashboard's listing, with only a status and a template to filter on.

        Args:
            before: the cursor: only tasks with a smaller id (the previous page's last id).
        """
        return await self.reads.page(status, template, limit, before)
