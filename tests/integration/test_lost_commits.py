"""A commit whose answer is lost (the connection to PostgreSQL cut just after the server
committed): the worker cannot tell it from a commit that did not happen, and writes again.
That second write first looks for its own last event, so a task's end or a step's end is
recorded once, and a finish is counted as one (it was taken for a lost lease: the task's
``task.finished`` log line and its count in ``orchestra_tasks_finished_total`` were missing,
and a step's events were recorded twice)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from orchestra.config import Settings
from tests.conftest import Service, StartService
from tests.fixtures.pg_cut import CommitCutter, commit_cutter
from tests.fixtures.postgres import ON_POSTGRESQL, PostgresServer
from tests.fixtures.servers import wait_until
from tests.fixtures.sse import read_events
from tests.integration.test_metrics import scrape

pytestmark = pytest.mark.skipif(
    not ON_POSTGRESQL, reason="a commit's answer is lost on a network connection"
)

FINISHED = "orchestra_tasks_finished_total"


@pytest.fixture
async def cutter(postgres: PostgresServer, db_url: str) -> AsyncIterator[CommitCutter]:
    async with commit_cutter(postgres, db_url) as relay:
        yield relay


@pytest.fixture
async def relayed(
    settings: Settings, start_service: StartService, cutter: CommitCutter
) -> AsyncIterator[Service]:
    database = msgspec.structs.replace(settings.database, url=cutter.url)
    async with start_service(msgspec.structs.replace(settings, database=database)) as svc:
        yield svc


async def _events(svc: Service, task_id: int) -> list[dict[str, Any]]:
    """The finished task's events, each {"id", "event", **data}."""
    return [e async for e in read_events(svc.client, f"/api/v1/tasks/{task_id}/events")]


async def test_a_finish_whose_commit_answer_is_lost_is_recorded_and_counted_once(
    relayed: Service, cutter: CommitCutter
) -> None:
    before = (await scrape(relayed.client))(FINISHED, template="summarize", status="succeeded")
    cutter.arm(b"task.finished")
    task = await relayed.submit("summarize", text="A commit's answer lost.")
    done = await relayed.wait(task["id"], seconds=60)
    assert done["status"] == "succeeded"
    assert cutter.cuts == 1, "the finish's COMMIT answer was not cut"
    [attempt] = done["attempts"]
    assert attempt["status"] == "succeeded"
    types = [e["event"] for e in await _events(relayed, task["id"])]
    assert types.count("task.finished") == 1, types
    # The status is seen as soon as the server committed; the worker counts the finish once
    # its second write learns that (after a pause): wait for the count, then it is one.
    counted: list[float] = []

    async def finish_counted() -> bool:
        metric = await scrape(relayed.client)
        counted[:] = [metric(FINISHED, template="summarize", status="succeeded") - before]
        return counted[0] >= 1

    await wait_until(finish_counted, timeout=15, interval=0.1)
    assert counted == [1]


async def test_a_step_end_whose_commit_answer_is_lost_is_recorded_once(
    relayed: Service, cutter: CommitCutter
) -> None:
    cutter.arm(b"step.finished")
    text = " ".join(f"Sentence {n} of a long text." for n in range(80))
    task = await relayed.submit("summarize_long", text=text, chunk_size=1000)
    done = await relayed.wait(task["id"], seconds=60)
    assert done["status"] == "succeeded", done
    assert cutter.cuts == 1, "the step's COMMIT answer was not cut"
    events = await _events(relayed, task["id"])
    ends = [e["step"] for e in events if e["event"] == "step.finished"]
    assert ends == ["parts", "combined"], events


async def test_a_retry_a_cancel_turned_into_the_end_is_known_when_its_answer_is_lost(
    cutter: CommitCutter,
) -> None:
    """The worker's retry met a cancel asked for meanwhile and ended the task cancelled, and
    the commit's answer was lost. Written again, it looked for the retry's event, found the
    cancel's, and took the task for another attempt's (``task.lease_lost``, its end not
    counted, its waiters not woken) (review)."""
    from orchestra.db import Database, Lease, TaskStore
    from orchestra.domain import NewTask, TaskError, TaskStatus, now
    from orchestra.errors import StorageUnreachable

    db = Database(cutter.url)  # the migrated test database, through the relay
    try:
        store = TaskStore(db)
        new = NewTask(template="summarize", template_version=1, params={"text": "x"})
        task = (await store.enqueue(new)).task
        [claimed] = await store.claim("w", 1, lease_seconds=30)
        lease = Lease(task.id, "w", claimed.attempts)
        assert await store.cancel(task.id) is TaskStatus.RUNNING  # flagged for its worker
        failed = TaskError(type="provider_error", message="500", retryable=True)
        cutter.arm(b"task.finished")
        due = now()  # the same write again, as the worker's within_lease sends it
        with pytest.raises(StorageUnreachable):
            await store.retry_later(lease, failed, due)
        assert cutter.cuts == 1
        assert await store.retry_later(lease, failed, due) is TaskStatus.CANCELLED
    finally:
        await db.close()


async def test_a_retry_whose_answer_is_lost_does_not_take_a_later_cancel_for_its_own(
    cutter: CommitCutter,
) -> None:
    """The retry landed (the task queued again), its answer lost; then a person cancelled the
    queued task. Written again, the retry found a cancel as the last event and took it for
    its own end: the cancel was counted twice (second review)."""
    from orchestra.db import Database, Lease, TaskStore
    from orchestra.domain import NewTask, TaskError, TaskStatus, now
    from orchestra.errors import StorageUnreachable

    db = Database(cutter.url)
    try:
        store = TaskStore(db)
        new = NewTask(template="summarize", template_version=1, params={"text": "x"})
        task = (await store.enqueue(new)).task
        [claimed] = await store.claim("w", 1, lease_seconds=30)
        lease = Lease(task.id, "w", claimed.attempts)
        failed = TaskError(type="provider_error", message="500", retryable=True)
        cutter.arm(b"task.retrying")
        due = now()
        with pytest.raises(StorageUnreachable):
            await store.retry_later(lease, failed, due)
        assert cutter.cuts == 1
        assert await store.cancel(task.id) is TaskStatus.CANCELLED  # queued: at once
        assert await store.retry_later(lease, failed, due) is None  # not its own end
    finally:
        await db.close()
