"""The worker pool's side loops that need none of its running tasks: a body run every so
often (failures logged, the loop carries on), the reaper of dead workers' leases (and of dead
uploads' batches; and the rescue of a dead process's tasks, without waiting for their leases),
and the retention that deletes old finished tasks in small batches."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Collection
from datetime import timedelta
from typing import TypeVar

from orchestra import logs, metrics
from orchestra.batch_lease import close_dead_uploads, reap_lost_uploads
from orchestra.config import RetentionSettings
from orchestra.db import TaskStore
from orchestra.db.attempts import LeaseEnd
from orchestra.db.batches import BatchStore
from orchestra.domain import TaskStatus
from orchestra.errors import StorageError
from orchestra.owners import dead_among

log = logs.get("orchestra.worker")

T = TypeVar("T")

#: Finished tasks (or records) deleted per statement: claims and submits go in between.
RETENTION_BATCH = 500


async def every(
    seconds: float,
    name: str,
    body: Callable[[], Awaitable[object]],
    first: float | None = None,
) -> None:
    """Run ``body`` every ``seconds`` (the first time after ``first``, if given), until
    cancelled; a failure is logged (a refused write once per outage) and the loop goes on."""
    await asyncio.sleep(seconds if first is None else first)
    refused = False
    while True:
        try:
            await body()
            refused = False
        except StorageError as exc:  # said once per outage, not every round
            if not refused:
                log.warning("pool.side_loop_failed", loop=name, error=exc.message)
            refused = True
        except Exception:
            log.exception("pool.side_loop_failed", loop=name)
        await asyncio.sleep(seconds)


async def reap(store: TaskStore, queued: Callable[[], None], running: Collection[int] = ()) -> None:
    """Fold the counters' change log, and return the tasks of workers whose leases expired
    to the queue (or fail those out of attempts, cancel those a cancel was asked for), but for
    those this process is ``running``;
    ``queued()`` when any was queued again. Then close the batches whose upload died with its
    process (:func:`~orchestra.batch_lease.reap_lost_uploads`)."""
    await store.fold_counts()
    _moved(await store.requeue_expired(running), queued)
    # The tasks' reaping goes on whatever befalls this.
    await _apart("batch.reap_failed", reap_lost_uploads(BatchStore(store.db)))


async def rescue(store: TaskStore, owner: str, cause: str, queued: Callable[[], None]) -> None:
    """Return the tasks of worker pool ``owner``, whose process died (``cause``), to the queue
    now (or fail or cancel them), as the reaper would once their leases expired;
    ``queued()`` when any was queued again. A refused write is logged: the leases then
    expire as usual."""
    try:
        moved = await store.requeue_orphaned(owner, cause)
    except StorageError as exc:
        log.warning("pool.rescue_failed", owner=owner, error=exc.message)
        return
    except Exception:  # a bug, or the database closed as the process stops: said, not lost
        log.exception("pool.rescue_failed", owner=owner)
        return
    _moved(moved, queued, process_died=cause)


async def rescue_dead_here(store: TaskStore, me: str, queued: Callable[[], None]) -> None:
    """Return the tasks of every process on this machine known dead
    (:func:`~orchestra.owners.known_dead`: a restart after a crash) to the queue now, as
    :func:`rescue` does, rather than when their leases expire; and close the batches whose
    uploads such a process read."""
    # Failed, their leases expire as usual.
    owners = await _apart("pool.rescue_failed", store.running_owners(me.split(":", 1)[0]))
    for owner, pid in dead_among(owners or (), me):
        await rescue(store, owner, f"pid {pid}, gone when pid {os.getpid()} started", queued)
    await _apart("batch.reap_failed", close_dead_uploads(BatchStore(store.db), me))


async def _apart(event: str, work: Awaitable[T]) -> T | None:
    """``work``'s result; None when it failed, logged as ``event`` (a storage failure in
    words, any other with its traceback), so that what its caller does besides goes on."""
    try:
        return await work
    except StorageError as exc:
        log.warning(event, error=exc.message)
    except Exception:
        log.exception(event)
    return None


def _moved(moved: dict[int, LeaseEnd], queued: Callable[[], None], **why: str) -> None:
    for task_id, end in moved.items():
        metrics.lease_expired(end.status.value)
        if end.status is not TaskStatus.QUEUED:  # out of attempts, or a cancel asked for
            metrics.task_finished(end.template, end.status.value)
        log.warning(
            "task.lease_expired",
            task_id=task_id,
            template=end.template,
            attempt=end.attempt,
            now=end.status.value,
            **why,
        )
    if any(end.status is TaskStatus.QUEUED for end in moved.values()):
        queued()


async def apply_retention(store: TaskStore, retention: RetentionSettings) -> int:
    """Delete finished tasks older than ``retention.days``, a small batch at a time, then
    finished webhook deliveries and schedule ticks as old; returns how many tasks."""
    cutoff = store.clock() - timedelta(days=retention.days)
    counted = {}
    for what, delete in (
        ("tasks", store.delete_finished_before),
        ("records", store.delete_records_before),
    ):
        total = 0
        while True:
            deleted = await delete(cutoff, RETENTION_BATCH)
            total += deleted
            if deleted < RETENTION_BATCH:
                break
            await asyncio.sleep(0)  # let claims and submits in between batches
        counted[what] = total
    if any(counted.values()):
        log.info("retention.deleted", **counted, cutoff=cutoff.isoformat())
    return counted["tasks"]
