"""Service functions for tasks: submit, read, wait, list, cancel, retry.

Controllers call only these. They validate against templates, talk to the store, and tell the
worker pool (through :class:`Scheduler`) when work becomes due or must stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

import msgspec

from orchestra import logs, metrics
from orchestra.config import LimitSettings
from orchestra.db.events import TERMINAL_EVENT, TaskEvent
from orchestra.db.feed import FeedFilter
from orchestra.db.overview import SummaryPage
from orchestra.db.rows import task_from_row
from orchestra.db.store import Enqueued, TaskStore
from orchestra.domain import (
    ANONYMOUS_SCOPE,
    TERMINAL,
    NewTask,
    StepStatus,
    Task,
    TaskStatus,
    as_utc,
    model_name_problem,
    now,
    storable_id,
)
from orchestra.errors import (
    ConflictError,
    FieldProblem,
    InvalidRequest,
    TaskNotFound,
    TemplateNotFound,
)
from orchestra.feed import EventFeed
from orchestra.notify import TaskSignals, Wake
from orchestra.shared_read import SharedReads
from orchestra.task_place import TaskPlace, finishes, in_sequence
from orchestra.templating.model import Template
from orchestra.templating.params import validate_params
from orchestra.templating.registry import TemplateRegistry
from orchestra.webhooks import WebhookService
from orchestra.wire.tasks import Priority as Priority
from orchestra.wire.tasks import SubmitTask as SubmitTask

log = logs.get("orchestra.tasks")


async def _woken(event: Wake, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; whether a change to its own task set it (it is
    cleared again). False after the time, or after a change to anything (another process's
    commit on SQLite): a status read is then the cheaper look."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    named = event.named
    event.clear()
    return named


#: Waiting requests re-read the task at least this often, to see work finished elsewhere.
WAIT_POLL_SECONDS = 1.0

#: How long a cancel request waits for a running task to stop before answering.
CANCEL_WAIT_SECONDS = 5.0


class Scheduler(Protocol):
    """What the service needs from the worker pool."""

    def notify(self) -> None: ...

    def wake_at(self, when: datetime) -> None: ...

    def cancel(self, task_id: int) -> bool: ...

    def takes(self, new: NewTask) -> bool: ...


def _utc(run_at: datetime) -> datetime:
    """``run_at`` in UTC (a time without a zone is UTC already).

    Raises:
        InvalidRequest: it falls outside the years 1 to 9999 in UTC (0001-01-01T00:00+14:00
            is a time in year 0 there), which no datetime can hold.
    """
    try:
        return as_utc(run_at).astimezone(UTC)
    except OverflowError:
        raise InvalidRequest(
            f"run_at {run_at.isoformat()} is out of range",
            [FieldProblem("run_at", "is out of range: in UTC it is before year 1 or after 9999")],
        ) from None


class Submitted(msgspec.Struct, frozen=True):
    """A submitted task, and whether this request created it (False: an idempotent replay)."""

    task: Task
    created: bool


class LiveTask(msgspec.Struct, frozen=True):
    """A task as a live page first shows it: ``streamed`` is the text its running step has
    streamed so far, ``after`` the last event that view includes (the page follows the events
    after it). A finished task has neither: nothing streams any more."""

    task: Task
    streamed: str = ""
    after: int = 0


class TaskService:
    """What the API can do with tasks."""

    def __init__(
        self,
        store: TaskStore,
        registry: TemplateRegistry,
        signals: TaskSignals,
        scheduler: Scheduler,
        *,
        feed: EventFeed,
        default_max_attempts: int,
        limits: LimitSettings | None = None,
        pin: Callable[[Template], Awaitable[None]] | None = None,
        refresh: Callable[[], Awaitable[None]] | None = None,
        callbacks: WebhookService | None = None,
    ) -> None:
        self.limits = limits or LimitSettings()
        #: Checks and stores a submit's callback_url (None: callbacks are refused).
        self.callbacks = callbacks
        #: Learns templates other processes registered (TemplateCatalog.refresh).
        self.refresh = refresh
        #: Stores the file template version a task is queued with (TemplateCatalog.pin).
        self.pin = pin
        self.store = store
        self.registry = registry
        self.signals = signals
        #: The process's one reader of task events: every event stream follows it.
        self.feed = feed
        self._shared = SharedReads()
        self.scheduler = scheduler
        self.default_max_attempts = default_max_attempts

    async def template(
        self, name: str, version: int | None = None, *, exact: bool = False
    ) -> Template:
        """The template a submit (a batch, a webhook's filter) names; one this process has
        not seen may have been registered by another process on the database, so it looks
        again before it says there is none. ``exact``: that version even if it was replaced
        since, as a task queued with it runs it (a resumed batch's rows).

        Raises:
            TemplateNotFound: no such template (or version).
        """

        def look() -> Template:
            if exact and version is not None:
                return self.registry.for_task(name, version)
            return self.registry.get(name, version)

        try:
            return look()
        except TemplateNotFound:
            if self.refresh is None:
                raise
        await self.refresh()
        return look()

    async def named(self, name: str) -> None:
        """Check that ``name`` names a template, or did (a template deleted names its tasks,
        and their events, while they are kept). Raises TemplateNotFound when neither."""
        try:
            await self.template(name)
        except TemplateNotFound:
            if not (await self.list(template=name, limit=1)).items:
                raise

    async def prepare(
        self, sub: SubmitTask, *, key_id: str | None = None, template: Template | None = None
    ) -> NewTask:
        """The task a submit of ``sub`` queues: validated against its template (``template``
        when the caller found it already: a batch's rows), with the defaults applied, its
        template version pinned; nothing is queued (schedules check their task at creation
        with this, and queue it at each tick).

        Raises:
            TemplateNotFound: no such template.
            InvalidParams: the parameters do not fit (every problem listed).
            InvalidRequest: both ``run_at`` and ``delay`` were given, or ``run_at`` is
                outside the years 1 to 9999 in UTC.
        """
        if sub.run_at is not None and sub.delay is not None:
            raise InvalidRequest(
                "give run_at or delay, not both",
                [FieldProblem("delay", "cannot be combined with run_at")],
            )
        check_model(sub.model)
        if template is None:
            template = await self.template(sub.template, sub.template_version)
        spec = template
        params = validate_params(spec, sub.params, self.limits)
        run_at = None if sub.run_at is None else _utc(sub.run_at)
        if sub.delay:
            run_at = now() + timedelta(seconds=sub.delay)
        max_attempts = sub.max_attempts or (
            spec.retry.max_attempts if spec.retry else self.default_max_attempts
        )
        if self.pin is not None:
            await self.pin(spec)  # before the task is queued: a restart finds its version
        return NewTask(
            template=spec.name,
            template_version=spec.version,
            params=params,
            model=sub.model or spec.model,
            priority=sub.priority,
            max_attempts=max_attempts,
            run_at=run_at,
            timeout_seconds=sub.timeout,
            idempotency_key=sub.idempotency_key,
            idempotency_scope=key_id or ANONYMOUS_SCOPE,
            request_hash=sub.fingerprint() if sub.idempotency_key else None,
            cache=sub.cache,
        )

    async def submit(self, sub: SubmitTask, *, key_id: str | None = None) -> Submitted:
        """Validate a task against its template and queue it.

        ``key_id`` is the API key submitting (None: anonymous): its idempotency keys are its
        own, as Stripe scopes them to an account, so reusing another caller's key neither
        returns nor names that caller's task.

        Raises:
            TemplateNotFound: no such template.
            InvalidParams: the parameters do not fit (every problem listed).
            InvalidRequest: both ``run_at`` and ``delay`` were given, or ``run_at`` is
                outside the years 1 to 9999 in UTC.
            ConflictError: the idempotency key was used before with a different request.
        """
        try:
            if sub.callback_url is not None:
                if self.callbacks is None:
                    raise InvalidRequest(
                        "callback_url is not available here",
                        [FieldProblem("callback_url", "webhooks are not running in this process")],
                    )
                await self.callbacks.check_callback(sub.callback_url)
            new = await self.prepare(sub, key_id=key_id)
        except (TemplateNotFound, InvalidRequest):
            # A replay answers with the task its key made, whatever has changed since (the
            # template deleted, or a new version asking for another parameter). Looked up
            # only when the submit is refused: a new key costs no read.
            if sub.idempotency_key is not None:
                replayed = await self._replay(sub, key_id)
                if replayed is not None:
                    return replayed
            raise
        run_at = new.run_at
        due_now = run_at is None or run_at <= now()
        # Where the transactions asked for in one turn of the loop commit together, in order
        # (SQLite), the workers are woken before the submit is: their claim is asked for right
        # after its transaction, joins its commit, and sees the new task, so a free slot
        # starts it with no commit in between. Elsewhere (PostgreSQL's claim runs on another
        # connection) they are woken once the task is committed.
        early = due_now and sub.callback_url is None and self.store.db.commits_together
        if early:
            self.scheduler.notify()
        # Where a submit wakes the other processes (PostgreSQL's NOTIFY), it need not when a
        # worker here has a slot for it and claims it at once: each of them would claim too,
        # and find nothing. They still see it at their poll.
        quiet = due_now and self.store.db.notifies and self.scheduler.takes(new)
        outcome = await self._enqueue(new, sub.callback_url, wake_others=not quiet)
        if not outcome.created:
            return await self._replayed(sub, outcome.task, outcome.same_request)
        metrics.task_submitted(new.template)
        self.feed.wake()  # its task.queued: no task signal announces a new task
        if not due_now:
            assert run_at is not None
            self.scheduler.wake_at(run_at)
        elif not early:
            self.scheduler.notify()
        return Submitted(task=outcome.task, created=True)

    async def _replay(self, sub: SubmitTask, key_id: str | None) -> Submitted | None:
        """The answer to a submit whose idempotency key was used before; None when unused.

        Raises:
            ConflictError: the key was used with a different request.
        """
        assert sub.idempotency_key is not None
        found = await self.store.by_idempotency_key(key_id or ANONYMOUS_SCOPE, sub.idempotency_key)
        if found is None:
            return None
        task, request_hash = found
        return await self._replayed(sub, task, sub.matches(request_hash))

    async def _replayed(self, sub: SubmitTask, task: Task, same_request: bool) -> Submitted:
        if not same_request:
            raise ConflictError(
                f"idempotency key {sub.idempotency_key!r} was already used for task "
                f"{task.id} with a different request",
                fields=[FieldProblem("idempotency_key", "already used with another request")],
            )
        return Submitted(task=await self._get(task.id), created=False)

    async def _enqueue(
        self, new: NewTask, callback_url: str | None, *, wake_others: bool = True
    ) -> Enqueued:
        """Queue ``new``; with a ``callback_url``, its callback subscription is written in
        the task's own transaction (:meth:`WebhookService.enqueue_with_callback`).
        ``wake_others``: see :func:`~orchestra.db.queue.enqueue`."""
        if callback_url is None or self.callbacks is None:
            return await self.store.enqueue(new, wake_others=wake_others)
        row = await self.callbacks.enqueue_with_callback(new, callback_url)
        if row is None:  # the idempotency key was used: that task
            existing = await self.store.enqueued_before(new)
            # None: deleted meanwhile (retention), so the key is free: queue it again.
            return existing or await self._enqueue(new, callback_url)
        return Enqueued(task=task_from_row(row), created=True)

    async def get(self, task_id: int, *, wait: float = 0.0) -> Task:
        """A task; with ``wait`` > 0, answer as soon as it is finished or after ``wait`` seconds
        (or at once when the service is stopping).

        Raises:
            TaskNotFound: no task has this id.
        """
        if wait <= 0:
            return await self._get(task_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        with self.signals.watch(task_id) as changed:
            # The status alone is read first (a quarter of a whole task's cost on SQLite).
            # Progress (the claim, each step) does not wake the wait: a change (this
            # process's or, on PostgreSQL, another's) that may end the attempt does, and the
            # whole task is read then; a change to anything (another process's commit on
            # SQLite) or the poll's timer, and the status is read again.
            status = await self.store.status_of(task_id) if storable_id(task_id) else None
            if status is None:
                raise TaskNotFound(f"no task with id {task_id}")
            # A stopping service answers at once, with the task as it is.
            while (
                status not in TERMINAL
                and not self.signals.stopping
                and (remaining := deadline - loop.time()) > 0
            ):
                if await _woken(changed, min(remaining, WAIT_POLL_SECONDS)):
                    task = await self._get(task_id)
                    if task.finished:
                        return task
                    status = task.status  # handed back or to be retried: wait on
                elif (status := await self.store.status_of(task_id)) is None:
                    break  # deleted meanwhile: the read below says so
        return await self._get(task_id)

    async def live(self, task_id: int) -> LiveTask:
        """A task, the text its running step has streamed so far, and the event to follow it
        from.

        The last event's number is read before the task, so whatever the task read misses is
        in the events after it: a task that finishes between the two reads shows as running,
        and the events it is then followed from say that it finished.

        Raises:
            TaskNotFound: no task has this id.
        """
        after = await self.store.last_event_seq(task_id) if storable_id(task_id) else 0
        task = await self._get(task_id)
        if task.finished:
            return LiveTask(task)
        running = next((s.id for s in task.steps if s.status is StepStatus.RUNNING), None)
        streamed = ""
        if running is not None:
            streamed = await self.store.step_text(task_id, running, task.attempts, after)
        return LiveTask(task, streamed, after)

    async def follow(self, task_id: int, after: int = 0) -> AsyncIterator[TaskEvent | None]:
        """A task's events after ``after``: the past ones, then new ones as they happen, until
        the task finishes. Yields None now and then while nothing happens (a keep-alive)."""
        async for batch in self.follow_batches(task_id, after):
            if not batch:
                yield None
            for event in batch:
                yield event

    async def follow_batches(
        self,
        task_id: int,
        after: int = 0,
        write: Callable[[list[TaskEvent]], bool] | None = None,
    ) -> AsyncIterator[list[TaskEvent]]:
        """:meth:`follow`, the events of each read together (a replay is a few reads, not an
        answer per event); an empty list is the keep-alive.

        The stored events come from the database; new ones from the process's one reader of
        every task's events (:class:`~orchestra.feed.EventFeed`), which it subscribes to first,
        so that nothing committed meanwhile is missed. A task's sequence numbers have no holes:
        a live event past the next number (the reader skipped it, or this follower's buffer
        overflowed) sends it back to the database, from its own cursor.

        With ``write``, the reader hands new events to it while the follower is caught up and
        they follow on without a hole (False from it: it cannot take them now, they come from
        the iterator as without it); those it took are not yielded, and the iterator ends
        once ``task.finished`` went that way."""
        place = TaskPlace(after, write)
        with self.feed.subscribe(FeedFilter(task_id=task_id)) as sub:
            if write is not None:
                place.wake = sub.wake
                sub.deliver = place.deliver
            while not place.ended:
                if sub.take_reread() is not None:
                    batch = await self._events_after(task_id, place.last)
                    if batch:
                        # A task.finished with later events (a retry queued the task again)
                        # is not the end; one at the end of what is stored is, unless the
                        # task was retried since (its status and events commit together).
                        if batch[-1].type == TERMINAL_EVENT and await self._finished(task_id):
                            yield batch
                            return
                        place.last = batch[-1].seq
                        sub.reread_upto = place.last  # read on until none is left
                        yield batch
                        continue
                    if await self._finished(task_id):
                        # The status and its task.finished event commit together, so one more
                        # read now catches an event that committed after the read above.
                        rest = await self._events_after(task_id, place.last)
                        if rest:
                            yield rest
                        return
                taken = sub.take()
                live = [e.as_task_event() for e in taken if e.seq > place.last]
                if live:
                    live, hole, ended = in_sequence(live, place.last)
                    if hole is not None:
                        sub.reread_upto = hole
                    if live:
                        place.last = live[-1].seq
                        yield live
                    if ended:
                        return
                elif finishes(taken) and await self._finished(task_id):
                    return  # it finished short of the place asked for: nothing comes after
                elif sub.closed:  # the service is stopping: the client reconnects elsewhere
                    return
                elif not await sub.wait():  # the feed's heartbeat
                    yield []

    async def _finished(self, task_id: int) -> bool:
        """Whether the task is finished now (one read, shared by every follower asking)."""
        task = await self._shared.read(("task", task_id), lambda: self._get(task_id))
        return task.finished

    async def _events_after(self, task_id: int, after: int) -> list[TaskEvent]:
        """``store.events_after``, one query for all followers at the same point."""
        return await self._shared.read(
            ("events", task_id, after), lambda: self.store.events_after(task_id, after)
        )

    async def _get(self, task_id: int) -> Task:
        task = await self.store.get_task(task_id) if storable_id(task_id) else None
        if task is None:
            raise TaskNotFound(f"no task with id {task_id}")
        return task

    async def cancel(self, task_id: int) -> Task:
        """Cancel a queued task at once, or stop a running one (its model call is closed).

        Raises:
            TaskNotFound: no task has this id.
            ConflictError: the task had already finished, or finished on its own before it
                could be stopped (its status is in the error).
        """
        before = await self._get(task_id)
        if before.finished:
            raise ConflictError(
                f"task {task_id} has already finished: {before.status.value}",
                task_status=before.status.value,
            )
        status = await self.store.cancel(task_id)
        if status is None:
            raise TaskNotFound(f"no task with id {task_id}")
        if status is TaskStatus.CANCELLED:
            metrics.task_finished(before.template, status.value)  # it never ran
            log.info("task.cancelled", task_id=task_id, template=before.template, was="queued")
            return await self._get(task_id)
        if status is TaskStatus.RUNNING:
            self.scheduler.cancel(task_id)
            stopped = await self.get(task_id, wait=CANCEL_WAIT_SECONDS)
            if stopped.finished and stopped.status is not TaskStatus.CANCELLED:
                # It ended on its own before its worker could stop it: not cancelled.
                raise ConflictError(
                    f"task {task_id} finished before it could be stopped: {stopped.status.value}",
                    task_status=stopped.status.value,
                )
            return stopped
        raise ConflictError(
            f"task {task_id} has already finished: {status.value}", task_status=status.value
        )

    async def retry(self, task_id: int) -> Task:
        """Queue a failed or cancelled task again, as a new attempt.

        Raises:
            TaskNotFound: no task has this id.
            ConflictError: the task is not failed or cancelled (its status is in the error).
        """
        status, requeued = await self.store.retry(task_id if storable_id(task_id) else 0)
        if status is None:
            raise TaskNotFound(f"no task with id {task_id}")
        if not requeued:
            raise ConflictError(
                f"only failed or cancelled tasks can be retried; task {task_id} is {status.value}",
                task_status=status.value,
            )
        task = await self._get(task_id)  # as retried, before a worker takes it
        self.scheduler.notify()
        return task

    async def list(
        self,
        *,
        status: TaskStatus | None = None,
        template: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> SummaryPage:
        """A page of task summaries (no params, result or steps), newest first."""
        return await self.store.list_page(
            status=status, template=template, limit=limit, before=before
        )


def check_model(model: str | None) -> None:
    """Refuse a request's ``model`` that names no model
    (:func:`~orchestra.domain.model_name_problem`).

    Raises:
        InvalidRequest: naming the field ``model``.
    """
    why = None if model is None else model_name_problem(model)
    if why is not None:
        raise InvalidRequest(f"model: {why}", [FieldProblem("model", why)])
