"""A cancel that meets an attempt's end. A cancel asked for while the attempt was ending in a
way that queues the task again (a retryable failure, a hand-back at a stop, a lost lease) was
lost: the task ran again (a batch's row, 80 s after its batch's cancel) and ended failed. And
a cancel that reached the worker before the task's coroutine had begun left the task running
for good, its slot taken (helper-126, batches of 50,000 rows on 2 processes)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import msgspec
import pytest

from orchestra.batches import BatchService
from orchestra.config import Settings
from orchestra.db import Database, Lease, TaskStore
from orchestra.db.batches import BatchStore
from orchestra.domain import NewTask, Task, TaskError, TaskStatus, now
from tests.conftest import Service, StartService, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until
from tests.integration.test_batches import no_workers

FAILED = TaskError(type="provider_error", message="500 from the model", retryable=True)


@pytest.fixture
def store(db: Database) -> TaskStore:
    return TaskStore(db)


async def _running(store: TaskStore) -> tuple[Task, Lease]:
    """A task claimed by worker ``w`` and then asked to cancel (flagged for its worker)."""
    new = NewTask(template="summarize", template_version=1, params={"text": "x"})
    task = (await store.enqueue(new)).task
    [claimed] = await store.claim("w", 1, lease_seconds=30)
    assert await store.cancel(task.id) is TaskStatus.RUNNING  # flagged, still running
    return task, Lease(task.id, "w", claimed.attempts)


async def _ended_cancelled(store: TaskStore, db: Database, task_id: int) -> list[str]:
    """The task is cancelled by request, nothing is left to claim; its attempts' statuses."""
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.CANCELLED, task
    assert task.error is not None and task.error.message == "cancelled by request"
    assert task.lease_owner is None and task.finished_at is not None
    assert await store.claim("w2", 10, lease_seconds=30) == []
    [(kind, data)] = sql_rows(
        db.url, "SELECT type, data FROM task_events WHERE task_id = ? ORDER BY seq DESC LIMIT 1",
        (task_id,),
    )  # fmt: skip
    assert (kind, json.loads(data)["status"]) == ("task.finished", "cancelled")
    return [a.status.value for a in task.history]


async def test_a_cancel_asked_while_an_attempt_fails_wins_over_its_retry(
    store: TaskStore, db: Database
) -> None:
    task, lease = await _running(store)
    later = now() + timedelta(seconds=5)
    assert await store.retry_later(lease, FAILED, later) is TaskStatus.CANCELLED
    assert await _ended_cancelled(store, db, task.id) == ["failed"]  # the attempt did fail


async def test_a_cancel_asked_while_a_stop_hands_the_task_back_wins(
    store: TaskStore, db: Database
) -> None:
    task, lease = await _running(store)
    assert await store.release(lease) is TaskStatus.CANCELLED
    assert await _ended_cancelled(store, db, task.id) == ["cancelled"]


async def test_a_cancel_asked_before_the_worker_died_wins_over_the_reaper(
    db: Database,
) -> None:
    clock_at = [now()]
    store = TaskStore(db, clock=lambda: clock_at[0])
    task, _ = await _running(store)
    clock_at[0] += timedelta(seconds=31)  # the worker died: its lease ran out
    assert {i: e.status for i, e in (await store.requeue_expired()).items()} == {
        task.id: TaskStatus.CANCELLED
    }
    assert await _ended_cancelled(store, db, task.id) == ["lost"]


async def test_without_a_cancel_a_retry_and_a_hand_back_queue_the_task_again(
    store: TaskStore,
) -> None:
    """(What the guard must leave as it was.)"""
    new = NewTask(template="summarize", template_version=1, params={"text": "x"})
    task = (await store.enqueue(new)).task
    [claimed] = await store.claim("w", 1, lease_seconds=30)
    lease = Lease(task.id, "w", claimed.attempts)
    assert await store.retry_later(lease, FAILED, now()) is TaskStatus.QUEUED
    [again] = await store.claim("w", 1, lease_seconds=30)
    assert await store.release(Lease(task.id, "w", again.attempts)) is TaskStatus.QUEUED
    assert await store.release(Lease(task.id, "w", again.attempts)) is None  # not held now


@pytest.fixture
async def idle(settings: Settings, start_service: StartService) -> AsyncIterator[Service]:
    """A service whose pool claims nothing by itself (the test hands it a task)."""
    async with start_service(no_workers(settings)) as service:
        yield service


async def test_a_cancel_that_reaches_the_worker_before_the_task_begins_cancels_it(
    idle: Service,
) -> None:
    """The pool starts the task's coroutine, and a cancel reaches the pool in the same turn of
    the loop, before the coroutine's first step (as a batch's cancel in this process did
    while the dispatcher started what it had claimed)."""
    task = await idle.submit("summarize", text="x")
    pool = idle.app.runtime.pool
    [claimed] = await pool.store.claim(pool.owner, 1, lease_seconds=30)
    lease_until = asyncio.get_running_loop().time() + 30
    pool._spawn(claimed, lease_until, None)  # noqa: SLF001 - the claim's next act
    assert pool.cancel(task["id"])  # the same turn: the coroutine has not begun

    async def cancelled() -> bool:
        got = (await idle.client.get(f"/api/v1/tasks/{task['id']}")).json()
        return got["status"] == "cancelled"

    await wait_until(cancelled, timeout=10)
    await wait_until(lambda: pool.running == 0, timeout=10)  # its slot is free


class _RetriedBetweenPasses:
    """The batch's cancels, as the service makes them; after the first (the queued rows'
    pass), the running row's attempt fails and is queued again, as a worker's would."""

    def __init__(self, bulk: Any, again: Any) -> None:
        self.bulk, self.again, self.calls = bulk, again, 0

    async def cancel_tasks(self, ids: Any) -> Any:
        outcome = await self.bulk.cancel_tasks(ids)
        self.calls += 1
        if self.calls == 1:
            await self.again()
        return outcome


async def test_a_batch_row_queued_again_between_the_cancels_passes_is_cancelled(
    idle: Service,
) -> None:
    """A row running (not asked to stop) while the queued rows were cancelled, and queued
    again before the running ones' pass reached it (its attempt failed, retryably): neither
    pass took it, and it ran again after its batch's cancel (review of helper-126's fix)."""
    made = await idle.client.post(
        "/api/v1/batches",
        params={"template": "summarize", "format": "csv"},
        content=b"text\na\nb\nc\n",
    )
    assert made.status_code == 201, made.text
    runtime = idle.app.runtime
    store = runtime.pool.store
    [claimed] = await store.claim("w", 1, lease_seconds=30)
    lease = Lease(claimed.id, "w", claimed.attempts)
    bulk = _RetriedBetweenPasses(runtime.bulk, lambda: store.retry_later(lease, FAILED, now()))
    batches = BatchService(BatchStore(runtime.db), runtime.tasks, bulk, lease_seconds=30)
    batch_id = made.json()["batch"]["id"]
    await batches.cancel(batch_id)
    task = await store.get_task(claimed.id)
    assert task is not None and task.status is TaskStatus.CANCELLED, task
    counts = (await idle.client.get(f"/api/v1/batches/{batch_id}")).json()["counts"]
    assert (counts["queued"], counts["running"], counts["cancelled"]) == (0, 0, 3), counts
    assert bulk.calls >= 2  # (the row was queued again between the passes)


@pytest.mark.sqlite_only
async def test_a_second_cancel_does_not_cut_the_first_ones_write(
    settings: Settings,
    start_service: StartService,
    fake_ollama: FakeOllama,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cancel's end was being written (here: refused while SQLite's write lock is held,
    and tried again) when the cancel was seen again (a lease renewal reads the flag): the
    second interrupt cut those tries, and the task stayed running until its lease ran out
    (review)."""
    database = msgspec.structs.replace(settings.database, busy_timeout_ms=100)
    async with start_service(msgspec.structs.replace(settings, database=database)) as svc:
        fake_ollama.close_gate("llama3.2")
        task = await svc.submit("summarize", text="x")
        await wait_until(lambda: fake_ollama.held("llama3.2") == 1, timeout=10)
        pool = svc.app.runtime.pool
        finish, tries = pool.store.finish, [0]

        async def counted(*args: Any, **kwargs: Any) -> Any:
            tries[0] += 1
            return await finish(*args, **kwargs)

        monkeypatch.setattr(pool.store, "finish", counted)
        locker = sqlite3.connect(db_url.split("///", 1)[1], isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # the finish's write is refused meanwhile
            assert pool.cancel(task["id"])
            await wait_until(lambda: tries[0] >= 2, timeout=10)  # refused, and tried again
            pool.cancel(task["id"])  # seen again
            before = tries[0]
            await wait_until(lambda: tries[0] > before, timeout=10)  # still tried after it
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        done = await svc.wait(task["id"], 10)
        assert done["status"] == "cancelled", done
        await wait_until(lambda: pool.running == 0, timeout=10)


class _ClaimedMeanwhile:
    """The batch's cancels, as the service makes them; the first time, a worker claims one of
    the rows between their listing and their cancel."""

    def __init__(self, bulk: Any, claim: Any) -> None:
        self.bulk, self.claim, self.calls = bulk, claim, 0

    async def cancel_tasks(self, ids: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            await self.claim()
        return await self.bulk.cancel_tasks(ids)


async def test_a_batch_row_claimed_during_the_cancel_is_counted_once(idle: Service) -> None:
    """Claimed between its listing and its cancel, a row was asked to stop by the first pass
    and again by the second: counted twice in the answer (second review)."""
    made = await idle.client.post(
        "/api/v1/batches",
        params={"template": "summarize", "format": "csv"},
        content=b"text\na\nb\nc\n",
    )
    runtime = idle.app.runtime
    store = runtime.pool.store
    bulk = _ClaimedMeanwhile(runtime.bulk, lambda: store.claim("w", 1, lease_seconds=30))
    batches = BatchService(BatchStore(runtime.db), runtime.tasks, bulk, lease_seconds=30)
    outcome = await batches.cancel(made.json()["batch"]["id"])
    assert (outcome.changed, outcome.stopping) == (3, 1), outcome
