"""Cancel and retry for many tasks at once: the store's chunked transactions and the service
that walks a filter, on a real database. The worker pool is a recorder of what it is told."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

import pytest

from orchestra import bulk
from orchestra.bulk import BulkOutcome, BulkService
from orchestra.db import Database, Lease, TaskStore
from orchestra.db.overview import DashboardStore
from orchestra.domain import NewTask, TaskError, TaskFilter, TaskStatus
from tests.conftest import sql_rows


class Pool:
    """What the service told the worker pool."""

    def __init__(self) -> None:
        self.cancelled: list[int] = []
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1

    def wake_at(self, when: datetime) -> None:
        raise AssertionError("a bulk action schedules nothing")

    def cancel(self, task_id: int) -> bool:
        self.cancelled.append(task_id)
        return True


@pytest.fixture
def changed() -> list[int]:
    return []


@pytest.fixture
def store(db: Database, changed: list[int]) -> TaskStore:
    return TaskStore(db, on_change=changed.extend)


@pytest.fixture
def pool() -> Pool:
    return Pool()


@pytest.fixture
def service(store: TaskStore, db: Database, pool: Pool) -> BulkService:
    return BulkService(store, DashboardStore(db), pool)


async def add(store: TaskStore, template: str = "summarize") -> int:
    new = NewTask(template=template, template_version=1, params={})
    return (await store.enqueue(new)).task.id


def rows(db: Database, columns: str) -> dict[int, tuple[Any, ...]]:
    return {r[0]: r[1:] for r in sql_rows(db.url, f"SELECT id, {columns} FROM tasks")}


async def statuses(store: TaskStore, *ids: int) -> list[str]:
    found = [await store.get_task(i) for i in ids]
    return [t.status.value if t else "missing" for t in found]


async def four_states(store: TaskStore) -> tuple[int, int, int, int]:
    """A queued, a running, a failed and a succeeded task."""
    ids = [await add(store) for _ in range(4)]
    [running] = await store.claim("w", 1, 30)
    for status, error in ((TaskStatus.FAILED, TaskError("x", "y")), (TaskStatus.SUCCEEDED, None)):
        [task] = await store.claim("w", 1, 30)
        await store.finish(Lease(task.id, "w", task.attempts), status, error=error)
    return ids[3], running.id, ids[1], ids[2]


async def test_cancel_many_cancels_queued_at_once_and_flags_running_in_one_call(
    store: TaskStore, db: Database, changed: list[int]
) -> None:
    queued, running, failed, succeeded = await four_states(store)
    changed.clear()
    done = await store.cancel_many([queued, running, failed, succeeded, 999])
    assert done.acted == {queued: TaskStatus.CANCELLED, running: TaskStatus.RUNNING}
    assert done.templates == [rows(db, "template")[queued][0]]  # the one cancelled at once
    assert sorted(changed) == sorted([queued, running])
    state = rows(db, "status, cancel_requested, finished_at IS NOT NULL")
    assert state[queued] == ("cancelled", 0, 1)
    assert state[running] == ("running", 1, 0)  # its worker stops it
    assert state[failed][0] == "failed" and state[succeeded][0] == "succeeded"
    events = await store.events_after(queued, 0)
    assert events[-1].type == "task.finished"
    assert events[-1].data == {
        "status": "cancelled",
        "error": {"type": "cancelled", "message": "cancelled by request"},
    }
    task = await store.get_task(queued)
    assert task is not None and task.error == TaskError("cancelled", "cancelled by request")


async def test_retry_many_queues_failed_and_cancelled_again_as_new_attempts(
    store: TaskStore, db: Database, changed: list[int]
) -> None:
    queued, running, failed, succeeded = await four_states(store)
    await store.cancel(queued)
    changed.clear()
    answer = await store.retry_many([queued, running, failed, succeeded, 999])
    assert answer == {queued: True, running: False, failed: True, succeeded: False, 999: False}
    assert sorted(changed) == sorted([queued, failed])
    state = rows(db, "status, error, finished_at, max_attempts")
    assert state[failed] == ("queued", None, None, 3)
    assert state[queued][0] == "queued"
    for task_id in (queued, failed):
        events = await store.events_after(task_id, 0)
        assert (events[-1].type, events[-1].data) == ("task.queued", {"retry": True})


async def test_single_cancel_and_retry_answer_as_before(store: TaskStore) -> None:
    queued, running, failed, succeeded = await four_states(store)
    assert await store.cancel(succeeded) is TaskStatus.SUCCEEDED
    assert await store.cancel(999) is None
    assert await store.cancel(running) is TaskStatus.RUNNING
    assert await store.cancel(queued) is TaskStatus.CANCELLED
    assert await store.retry(succeeded) == (TaskStatus.SUCCEEDED, False)
    assert await store.retry(999) == (None, False)
    assert await store.retry(failed) == (TaskStatus.QUEUED, True)


async def test_cancel_tasks_tells_the_pool_about_running_ones(
    service: BulkService, store: TaskStore, pool: Pool
) -> None:
    queued, running, failed, succeeded = await four_states(store)
    outcome = await service.cancel_tasks([queued, running, failed, succeeded, 999, 2**70])
    assert outcome == BulkOutcome(changed=2, skipped=4, stopping=1)
    assert pool.cancelled == [running]
    assert await statuses(store, queued, running) == ["cancelled", "running"]


async def test_retry_tasks_wakes_the_pool_once_per_chunk(
    service: BulkService, store: TaskStore, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "CHUNK", 2)
    queued, running, failed, succeeded = await four_states(store)
    await store.cancel(queued)
    outcome = await service.retry_tasks([queued, running, failed, succeeded])
    assert outcome == BulkOutcome(changed=2, skipped=2)
    assert pool.notified == 2  # two chunks of two ids, each re-queuing one
    assert await statuses(store, queued, failed) == ["queued", "queued"]
    assert await service.retry_tasks([succeeded]) == BulkOutcome(changed=0, skipped=1)
    assert pool.notified == 2


async def test_cancel_matching_acts_on_every_match_in_chunks_and_nothing_else(
    service: BulkService, store: TaskStore, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "CHUNK", 3)
    mine = [await add(store, "mine") for _ in range(8)]
    other = [await add(store, "other") for _ in range(3)]
    running = await store.claim("w", 2, 30)  # mine[0] and mine[1]
    flt = TaskFilter(template="mine")
    assert (await service.confirmation(flt, "cancel")).count == 8
    outcome = await service.cancel_matching(flt)
    assert outcome == BulkOutcome(changed=8, skipped=0, stopping=2)
    assert sorted(pool.cancelled) == sorted(t.id for t in running)
    assert await statuses(store, *mine) == ["running"] * 2 + ["cancelled"] * 6
    assert await statuses(store, *other) == ["queued"] * 3
    assert (
        await service.confirmation(flt, "cancel")
    ).count == 2  # still running until their worker stops
    assert (
        await service.confirmation(TaskFilter(template="mine", text="nothing"), "cancel")
    ).count == 0


async def test_retry_matching_requeues_failed_and_cancelled_of_the_filter(
    service: BulkService, store: TaskStore, pool: Pool
) -> None:
    ids = [await add(store, "t") for _ in range(4)]
    await store.cancel_many(ids[:2])
    [task] = await store.claim("w", 1, 30)
    await store.finish(Lease(task.id, "w", task.attempts), TaskStatus.FAILED)
    assert (await service.confirmation(TaskFilter(), "retry")).count == 3
    assert (await service.confirmation(TaskFilter(status=TaskStatus.FAILED), "retry")).count == 1
    outcome = await service.retry_matching(TaskFilter(template="t"))
    assert outcome == BulkOutcome(changed=3)
    assert pool.notified == 1
    assert await statuses(store, *ids) == ["queued"] * 4
    assert await service.retry_matching(TaskFilter(template="t")) == BulkOutcome()


async def test_a_task_submitted_during_a_bulk_cancel_is_left_alone(
    store: TaskStore, db: Database, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "CHUNK", 2)
    before = [await add(store) for _ in range(3)]
    submitted: list[int] = []

    class Busy(DashboardStore):
        async def matching_ids(
            self,
            filter: TaskFilter,
            statuses: Collection[TaskStatus],
            after: int | None,
            limit: int,
        ) -> list[int]:
            submitted.append(await add(store))  # someone submits while the walk goes on
            return await super().matching_ids(filter, statuses, after, limit)

    outcome = await BulkService(store, Busy(db), pool).cancel_matching(TaskFilter())
    assert outcome.changed == 3
    assert await statuses(store, *before) == ["cancelled"] * 3
    assert await statuses(store, *submitted) == ["queued"] * len(submitted)


async def test_a_task_submitted_after_the_confirmation_is_left_alone(
    service: BulkService, store: TaskStore
) -> None:
    before = [await add(store) for _ in range(3)]
    confirmation = await service.confirmation(TaskFilter(), "cancel")
    assert confirmation == bulk.Confirmation(count=3, upto=before[-1])
    late = await add(store)
    outcome = await service.cancel_matching(TaskFilter(), confirmation.upto)
    assert outcome == BulkOutcome(changed=3)
    assert await statuses(store, *before, late) == ["cancelled"] * 3 + ["queued"]
    await store.cancel_many([late])
    assert await service.retry_matching(TaskFilter(), upto=before[0]) == BulkOutcome(changed=1)
    assert await statuses(store, *before, late) == ["queued"] + ["cancelled"] * 3


async def test_a_confirmation_with_no_tasks_acts_on_none(
    service: BulkService, store: TaskStore
) -> None:
    confirmation = await service.confirmation(TaskFilter(), "retry")
    assert confirmation == bulk.Confirmation(count=0, upto=0)
    await add(store)
    assert await service.cancel_matching(TaskFilter(), confirmation.upto) == BulkOutcome()
