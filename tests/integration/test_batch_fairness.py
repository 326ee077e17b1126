"""Batch fairness (issue 21 §1): a worker pool keeps a slot batch rows may not take, so a single
task submitted while rows fill every other slot starts at once, not when a row ends. Against a
real service on loopback, the fake model slow enough that rows hold their slots; batch rows ask
one model (llama3.2) and single tasks another (qwen2.5), so the fake model's own counters say
how many rows ran at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from orchestra.capacity import Capacity
from orchestra.config import ModelSettings, Settings, TemplateSettings
from orchestra.domain import PRIORITY_MIN, Task, TaskStatus, in_batch_lane
from orchestra.worker import WorkerPool
from tests.conftest import Service, StartService, with_workers
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until

LANEJOB = """\
name: lanejob
model: llama3.2
parameters:
  text: {type: string, required: true}
steps:
  - id: answer
    prompt: "{{ params.text }}"
output: "{{ steps.answer.output }}"
"""


@pytest.fixture
def lane_settings(settings: Settings, tmp_path: Path) -> Settings:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "lanejob.yaml").write_text(LANEJOB)
    return msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))


class LaneWatch:
    """Samples the pool's running tasks every few milliseconds: the most batch rows (and the
    most tasks) seen running at once."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.max_lane = 0
        self.max_running = 0
        #: Every batch row seen running.
        self.rows: set[int] = set()

    def lane_running(self) -> list[int]:
        return [i for i, r in self.pool._running.items() if in_batch_lane(r.task.priority)]

    async def run(self) -> None:
        while True:
            lane = self.lane_running()
            self.rows.update(lane)
            self.max_lane = max(self.max_lane, len(lane))
            self.max_running = max(self.max_running, self.pool.running)
            await asyncio.sleep(0.002)


@asynccontextmanager
async def watching(svc: Service) -> AsyncIterator[LaneWatch]:
    watch = LaneWatch(svc.app.runtime.pool)
    sampler = asyncio.create_task(watch.run())
    try:
        yield watch
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)


async def upload_rows(svc: Service, rows: int) -> int:
    body = b"text\n" + b"".join(b"row %d\n" % i for i in range(rows))
    response = await svc.client.post(
        "/api/v1/batches",
        params={"template": "lanejob", "format": "csv", "max_attempts": 1},
        content=body,
    )
    assert response.status_code == 201, response.text
    batch_id: int = response.json()["batch"]["id"]
    return batch_id


async def counts(svc: Service, batch_id: int) -> dict[str, int]:
    answer: dict[str, int] = (await svc.client.get(f"/api/v1/batches/{batch_id}")).json()["counts"]
    return answer


async def task(svc: Service, task_id: int) -> dict[str, Any]:
    answer: dict[str, Any] = (await svc.client.get(f"/api/v1/tasks/{task_id}")).json()
    return answer


async def running_at(svc: Service, ids: set[int], moment: str) -> list[int]:
    """Those of the tasks ``ids`` whose attempt was running at ``moment`` (started at or
    before it, not finished by then)."""
    at = datetime.fromisoformat(moment)
    found = []
    for task_id in sorted(ids):
        row = await task(svc, task_id)
        started, finished = row["started_at"], row["finished_at"]
        if started is not None and datetime.fromisoformat(started) <= at:
            if finished is None or datetime.fromisoformat(finished) > at:
                found.append(task_id)
    return found


@pytest.mark.parametrize("concurrency", [2, 4])
async def test_a_single_task_starts_in_the_reserved_slot_while_batch_rows_fill_the_others(
    concurrency: int,
    lane_settings: Settings,
    fake_ollama: FakeOllama,
    start_service: StartService,
) -> None:
    settings = with_workers(lane_settings, concurrency=concurrency)
    async with start_service(settings) as svc, watching(svc) as watch:
        fake_ollama.close_gate("llama3.2")  # rows hold their slots until the gate opens
        batch_id = await upload_rows(svc, 8 * concurrency)
        for n in range(3):
            # Rows hold every slot they may have (held at the model, so none can end while
            # the single task is out), and more wait.
            async def lane_full() -> bool:
                return (
                    fake_ollama.held("llama3.2") == concurrency - 1
                    and (await counts(svc, batch_id)).get("queued", 0) > 0
                )

            await wait_until(lane_full, timeout=15)
            single = await svc.client.post(
                "/api/v1/tasks",
                json={"template": "lanejob", "params": {"text": f"single {n}"}, "model": "qwen2.5"},
            )
            assert single.status_code == 201, single.text
            single_id = single.json()["id"]
            done = await svc.wait(single_id)
            assert done["status"] == "succeeded"
            # It ran to its end while rows held every other slot: it took the reserved one
            # and did not wait for a row's slot.
            holding = await running_at(svc, watch.rows, done["finished_at"])
            assert len(holding) == concurrency - 1, holding
            assert (await counts(svc, batch_id)).get("queued", 0) > 0  # rows were still waiting
            # Let this round's rows end; the next ones are held again.
            fake_ollama.open_gate("llama3.2")
            fake_ollama.close_gate("llama3.2")
        cancelled = await svc.client.post(f"/api/v1/batches/{batch_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
    # Rows never took the reserved slot: not in the pool, not at the model.
    assert watch.max_lane == concurrency - 1
    assert fake_ollama.max_in_flight_by_model["llama3.2"] == concurrency - 1
    assert fake_ollama.max_in_flight_by_model["qwen2.5"] == 1
    assert watch.max_running == concurrency  # the reserve was used, by single tasks


async def test_with_one_worker_there_is_no_reserve_and_rows_still_run(
    lane_settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    settings = with_workers(lane_settings, concurrency=1)
    async with start_service(settings) as svc, watching(svc) as watch:
        assert svc.app.runtime.pool.capacity.reserve == 0
        batch_id = await upload_rows(svc, 5)

        async def finished() -> bool:
            c = await counts(svc, batch_id)
            return c.get("queued", 0) + c.get("running", 0) == 0

        await wait_until(finished, timeout=20, interval=0.05)
        assert (await counts(svc, batch_id)).get("succeeded") == 5
    assert watch.max_lane == 1


async def test_a_model_limit_still_holds_beside_the_reserve(
    lane_settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    fake_ollama.latency = 0.2
    limited = msgspec.structs.replace(
        with_workers(lane_settings, concurrency=4),
        models={"llama3.2": ModelSettings(max_concurrency=2)},
    )
    async with start_service(limited) as svc, watching(svc) as watch:
        batch_id = await upload_rows(svc, 12)
        singles = []
        for n in range(3):
            body = {"template": "lanejob", "params": {"text": f"s{n}"}, "model": "qwen2.5"}
            singles.append((await svc.client.post("/api/v1/tasks", json=body)).json()["id"])
        assert [(await svc.wait(i))["status"] for i in singles] == ["succeeded"] * 3

        async def finished() -> bool:
            c = await counts(svc, batch_id)
            return c.get("queued", 0) + c.get("running", 0) == 0

        await wait_until(finished, timeout=30, interval=0.05)
        assert (await counts(svc, batch_id)).get("succeeded") == 12
    assert fake_ollama.max_in_flight_by_model["llama3.2"] == 2  # the model's limit, not 3
    assert watch.max_lane == 2


# -- the claim's shape (no I/O) -----------------------------------------------------------------


def running(*priorities: int, model: str = "m") -> Iterator[Task]:
    for i, priority in enumerate(priorities):
        yield Task(
            id=i + 1,
            template="t",
            template_version=1,
            params={},
            status=TaskStatus.RUNNING,
            priority=priority,
            model=model,
            attempts=1,
            max_attempts=1,
            created_at="",
            run_at="",
        )


@pytest.mark.parametrize(
    ("concurrency", "priorities", "limit", "floor"),
    [
        (4, (), 3, None),  # rows may take three slots; a full claim claims again
        (4, (-1001, -1001), 1, None),
        (4, (-1001, -1001, -1001), 1, PRIORITY_MIN),  # only the reserve: single tasks only
        (4, (0, 0, 0), 1, None),  # single tasks in three slots: a row may take the fourth
        (4, (0, -1001, -1001, -1001), 0, PRIORITY_MIN),
        (2, (-1001,), 1, PRIORITY_MIN),
        (1, (), 1, None),  # no reserve
    ],
)
def test_a_claim_never_gives_batch_rows_the_reserved_slot(
    concurrency: int, priorities: tuple[int, ...], limit: int, floor: int | None
) -> None:
    claim = Capacity(concurrency, {}).next_claim(running(*priorities))
    assert (claim.limit, claim.min_priority) == (limit, floor)


def test_a_model_at_its_limit_is_skipped_and_caps_the_claim() -> None:
    capacity = Capacity(8, {"m": 2, "n": 3})
    claim = capacity.next_claim(running(0, 0, model="m"))
    assert claim.skip_models == {"m"} and claim.limit == 3
