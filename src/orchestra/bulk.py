"""Service functions for acting on many tasks at once: cancel or retry the tasks a person
selected, or every task matching a filter.

A bulk action goes through the store in chunks of :data:`CHUNK` ids, each chunk one
transaction (so the queue never waits long behind it), and tells the worker pool as
:class:`~orchestra.tasks.TaskService` does for one task: a running task flagged to cancel is
interrupted if it runs in this process (other processes learn it at their next lease
renewal), and retried tasks wake the pool. Unlike the one-task calls it never waits for a
running task to stop.

An action over a filter is confirmed first (:meth:`BulkService.confirmation` states how many
tasks match) and then acts on no task newer than the newest one at confirmation: a task
submitted meanwhile is left alone, whatever it matches.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Literal

import msgspec

from orchestra import logs, metrics
from orchestra.db.overview import DashboardStore
from orchestra.db.store import TaskStore
from orchestra.domain import TaskFilter, TaskStatus, storable_id
from orchestra.tasks import Scheduler

#: Ids per transaction.
CHUNK = 500
#: What each action can change.
CANCELLABLE = (TaskStatus.QUEUED, TaskStatus.RUNNING)
RETRYABLE = (TaskStatus.FAILED, TaskStatus.CANCELLED)

#: The actions over a filter, and the statuses each changes.
Action = Literal["cancel", "retry"]
ACTIONS: dict[Action, tuple[TaskStatus, ...]] = {"cancel": CANCELLABLE, "retry": RETRYABLE}

log = logs.get("orchestra.bulk")


class Confirmation(msgspec.Struct, frozen=True):
    """What a person confirms before a bulk action over a filter: ``count`` tasks match now,
    and the action, once confirmed, acts on no task newer than ``upto`` (0: no task yet)."""

    count: int
    upto: int


class BulkOutcome(msgspec.Struct, frozen=True):
    """What a bulk action did.

    ``changed``: tasks it acted on (cancelled at once, flagged to stop, or queued again).
    ``stopping``: of those, running tasks asked to stop (their worker ends them shortly).
    ``skipped``: tasks it left alone: missing, or in a status the action does not apply to
    (for a filter: tasks that moved on between the walk and the change).
    """

    changed: int = 0
    skipped: int = 0
    stopping: int = 0

    def plus(self, other: BulkOutcome) -> BulkOutcome:
        """Both outcomes together."""
        return BulkOutcome(
            changed=self.changed + other.changed,
            skipped=self.skipped + other.skipped,
            stopping=self.stopping + other.stopping,
        )


def _chunks(ids: Iterable[int]) -> Iterable[list[int]]:
    unique = sorted({i for i in ids if storable_id(i)})
    for start in range(0, len(unique), CHUNK):
        yield unique[start : start + CHUNK]


class BulkService:
    """Cancel and retry for many tasks; built beside :class:`~orchestra.tasks.TaskService`
    from the same store and worker pool."""

    def __init__(self, store: TaskStore, dashboard: DashboardStore, scheduler: Scheduler) -> None:
        self.store = store
        self.dashboard = dashboard
        self.scheduler = scheduler

    async def cancel_tasks(self, ids: Iterable[int]) -> BulkOutcome:
        """Cancel these tasks: queued ones at once, running ones are asked to stop; finished
        or missing ones are skipped."""
        given = set(ids)
        outcome = BulkOutcome()
        for chunk in _chunks(given):
            outcome = outcome.plus(await self._cancel(chunk))
        return _with_skipped(outcome, len(given))

    async def retry_tasks(self, ids: Iterable[int]) -> BulkOutcome:
        """Queue these tasks again if they failed or were cancelled; others are skipped."""
        given = set(ids)
        outcome = BulkOutcome()
        for chunk in _chunks(given):
            outcome = outcome.plus(await self._retry(chunk))
        return _with_skipped(outcome, len(given))

    async def cancel_matching(self, filter: TaskFilter, upto: int | None = None) -> BulkOutcome:
        """Cancel every queued or running task matching ``filter`` whose id is at most
        ``upto`` (the :attr:`Confirmation.upto` a person confirmed; by default the newest
        task now): tasks submitted after it are left alone."""
        return await self._matching(filter, CANCELLABLE, self._cancel, "cancel", upto)

    async def retry_matching(self, filter: TaskFilter, upto: int | None = None) -> BulkOutcome:
        """Queue again every failed or cancelled task matching ``filter`` whose id is at most
        ``upto`` (by default the newest task now)."""
        return await self._matching(filter, RETRYABLE, self._retry, "retry", upto)

    async def confirmation(self, filter: TaskFilter, action: Action) -> Confirmation:
        """What to ask before ``action`` over ``filter``: how many tasks it would change now,
        and the newest task now, the ceiling to act with once confirmed."""
        # The ceiling first: a task submitted between the two reads may then be counted but
        # not acted on, never the other way round.
        upto = await self.dashboard.newest_id()
        count = await self.dashboard.count(filter, ACTIONS[action])
        return Confirmation(count=count, upto=upto)

    async def _matching(
        self,
        filter: TaskFilter,
        statuses: tuple[TaskStatus, ...],
        act: Callable[[list[int]], Awaitable[BulkOutcome]],
        action: str,
        upto: int | None,
    ) -> BulkOutcome:
        """Walk the matching tasks in chunks, up to task ``upto`` (by default the newest task
        at the start), acting on each chunk as it is read."""
        newest = await self.dashboard.newest_id() if upto is None else upto
        outcome = BulkOutcome()
        after: int | None = None
        while True:
            ids = await self.dashboard.matching_ids(filter, statuses, after, CHUNK)
            chunk = [i for i in ids if i <= newest]
            if chunk:
                outcome = outcome.plus(await act(chunk))
            if len(chunk) < CHUNK:
                break
            after = chunk[-1]
        log.info(
            "tasks.bulk",
            action=action,
            changed=outcome.changed,
            skipped=outcome.skipped,
            stopping=outcome.stopping,
        )
        return outcome

    async def _cancel(self, chunk: list[int]) -> BulkOutcome:
        done = await self.store.cancel_many(chunk)
        acted = done.acted
        for template in done.templates:  # they never ran: no worker counts their end
            metrics.task_finished(template, TaskStatus.CANCELLED.value)
        running = [i for i, status in acted.items() if status is TaskStatus.RUNNING]
        for task_id in running:
            self.scheduler.cancel(task_id)
        return BulkOutcome(
            changed=len(acted), skipped=len(chunk) - len(acted), stopping=len(running)
        )

    async def _retry(self, chunk: list[int]) -> BulkOutcome:
        requeued = sum((await self.store.retry_many(chunk)).values())
        if requeued:
            self.scheduler.notify()
        return BulkOutcome(changed=requeued, skipped=len(chunk) - requeued)


def _with_skipped(outcome: BulkOutcome, given: int) -> BulkOutcome:
    """Count ids that could name no task (out of range) as skipped too."""
    return msgspec.structs.replace(outcome, skipped=given - outcome.changed)
