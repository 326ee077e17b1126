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
