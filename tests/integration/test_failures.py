from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest

from orchestra import running
from orchestra.db import Database, TaskStore
from orchestra.db.schema import upgrade
from orchestra.domain import NewTask, Task, now
from orchestra.worker import WorkerPool
from tests.conftest import (
    Service,
    StartService,
    make_settings,
    sql_rows,
    task_row,
    with_provider,
    with_workers,
)
from tests.fixtures.fake_ollama import Failure, FakeOllama
from tests.fixtures.servers import free_socket, wait_until


async def test_ollama_down_fails_the_task_naming_the_url_and_health_says_so(
    db_url: str, start_service: StartService
) -> None:
    sock = free_socket()  # bound but not listening: connections are refused
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        async with start_service(make_settings(db_url, dead)) as svc:
            task = await svc.submit("summarize", text="hello")
            done = await svc.wait(task["id"])
            health = await svc.client.get("/health")
    finally:
        sock.close()
    assert done["status"] == "failed"
    error = done["error"]
    assert error["type"] == "provider_unavailable"
    assert error["step"] == "summary"
    assert dead in error["message"] and "refused" in error["message"].lower()
    assert done["steps"][0]["status"] == "failed"
    assert done["steps"][0]["error"]["message"] == error["message"]
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "degraded" and body["database"] == "ok"
    assert dead in body["providers"]["ollama"]["detail"]
    assert body["providers"]["ollama"]["available"] is False


async def test_missing_model_fails_naming_the_model(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.models.discard("llama3.2")
    task = await service.submit("summarize", text="hello")
    done = await service.wait(task["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "model_not_found"
    assert "'llama3.2' not found" in done["error"]["message"]
    assert "ollama pull llama3.2" in done["error"]["message"]


async def test_server_error_fails_the_attempt_naming_url_and_status(
    service: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.failure = Failure(500, "CUDA out of memory")
    task = await service.submit("summarize", text="hello")
    done = await service.wait(task["id"])
    assert done["status"] == "failed"
    assert done["error"]["type"] == "provider_unavailable"
    assert fake_ollama.url in done["error"]["message"]
    assert "500: CUDA out of memory" in done["error"]["message"]


async def test_model_timeout_fails_the_attempt(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    fake_ollama.latency = 3
    settings = with_provider(make_settings(db_url, fake_ollama.url), "ollama", timeout=0.3)
    async with start_service(settings) as svc:
        done = await svc.wait((await svc.submit("summarize", text="x"))["id"])
    assert done["status"] == "failed"
    assert "did not answer within 0.3s" in done["error"]["message"]


async def test_bad_output_rendering_fails_the_task_clearly(
    service: Service, fake_ollama: FakeOllama
) -> None:
    template = (
        "name: mood\nmodel: llama3.2\nsteps:\n  - id: a\n    prompt: How do you feel?\n"
        "output: \"{{ steps.a.output | choose(['happy', 'sad']) }}\"\n"
    )
    assert (await service.client.post("/api/v1/templates", content=template)).status_code == 201
    fake_ollama.reply = lambda _req: "I would rather not say."
    task = await service.submit("mood")
    done = await service.wait(task["id"])
    assert done["status"] == "failed"
    assert done["error"]["step"] == "output"
    assert "none of: happy, sad" in done["error"]["message"]
    assert done["steps"][0]["status"] == "succeeded"  # the model call itself worked


async def test_task_of_a_dead_worker_is_recovered_at_startup(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    # A previous process claimed the task a minute ago and died: its lease has expired.
    db = Database(db_url)
    await upgrade(db)
    store = TaskStore(db, clock=lambda: now() - timedelta(minutes=1))
    task = (
        await store.enqueue(
            NewTask(
                template="summarize",
                template_version=1,
                params={"text": "survivor", "sentences": 3, "style": "paragraph"},
            )
        )
    ).task
    await store.claim("dead-host:1:abc", 1, lease_seconds=30)
    await db.close()

    async with start_service(make_settings(db_url, fake_ollama.url)) as svc:
        done = await svc.wait(task.id)
    assert done["status"] == "succeeded"
    assert [(a["number"], a["status"]) for a in done["attempts"]] == [(1, "lost"), (2, "succeeded")]
    assert done["attempts"][0]["worker"] == "dead-host:1:abc"
    assert done["attempts"][0]["error"]["type"] == "lease_expired"
    assert "survivor" in done["result"]


async def test_long_generation_keeps_its_lease_by_heartbeat(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    fake_ollama.latency = 1.5  # five lease lengths
    settings = with_workers(
        make_settings(db_url, fake_ollama.url), lease_seconds=0.3, reap_interval=0.1
    )
    async with start_service(settings) as svc:
        done = await svc.wait((await svc.submit("summarize", text="slow"))["id"])
    assert done["status"] == "succeeded"
    assert len(done["attempts"]) == 1
    assert len(fake_ollama.requests) == 1


async def test_concurrency_setting_bounds_parallel_model_calls(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    fake_ollama.latency = 0.2
    settings = with_workers(make_settings(db_url, fake_ollama.url), concurrency=3)
    async with start_service(settings) as svc:
        ids = [(await svc.submit("summarize", text=f"t{i}"))["id"] for i in range(9)]
        results = [await svc.wait(i) for i in ids]
    assert all(r["status"] == "succeeded" for r in results)
    assert fake_ollama.max_in_flight == 3


@pytest.mark.parametrize(
    ("grace", "claim_ends_after"),
    [(None, 0.0), (0.0, 0.3)],
    ids=["default-grace", "claim-outlasts-a-zero-grace"],
)
async def test_a_task_claimed_while_the_service_stops_is_run_or_handed_back(
    db_url: str,
    fake_ollama: FakeOllama,
    start_service: StartService,
    monkeypatch: pytest.MonkeyPatch,
    grace: float | None,
    claim_ends_after: float,
) -> None:
    # The claim has committed when the stop is asked for; its result reaches the pool only
    # after (``claim_ends_after`` seconds later). Before the fix the stop cancelled the
    # claiming loop there (at once, then once the grace period was over): the task stayed
    # claimed (running, leased to a pool that was gone) until its lease ran out.
    claimed, stop_asked = asyncio.Event(), asyncio.Event()
    claim, request_stop = TaskStore.claim, WorkerPool.request_stop

    async def held_claim(self: TaskStore, *args: Any, **kwargs: Any) -> list[Task]:
        tasks: list[Task] = await claim(self, *args, **kwargs)
        if tasks:
            claimed.set()
            await stop_asked.wait()
            await asyncio.sleep(claim_ends_after)
        return tasks

    def noted_stop(self: WorkerPool) -> None:
        request_stop(self)
        stop_asked.set()

    monkeypatch.setattr(TaskStore, "claim", held_claim)
    monkeypatch.setattr(WorkerPool, "request_stop", noted_stop)
    settings = make_settings(db_url, fake_ollama.url)
    if grace is not None:
        settings = with_workers(settings, shutdown_grace=grace)
    async with start_service(settings) as svc:
        task = await svc.submit("summarize", text="claimed as the service stops")
        await asyncio.wait_for(claimed.wait(), timeout=10)
    status, lease_owner = task_row(db_url, task["id"], "status, lease_owner")
    assert (status, lease_owner) in {("succeeded", None), ("queued", None)}


@pytest.mark.parametrize(
    ("latency", "grace", "expected"),
    [
        # the call outlasts the grace period: handed back, the attempt not counted
        (2.0, 0.2, ("queued", 0, None)),
        # the call ends within the grace period: it finishes normally
        (0.5, 5.0, ("succeeded", 1, None)),
    ],
    ids=["handed-back", "finished-in-grace"],
)
async def test_stopping_waits_for_the_grace_period_then_hands_tasks_back(
    db_url: str,
    fake_ollama: FakeOllama,
    start_service: StartService,
    latency: float,
    grace: float,
    expected: tuple[str, int, None],
) -> None:
    fake_ollama.latency = latency
    settings = with_workers(make_settings(db_url, fake_ollama.url), shutdown_grace=grace)
    async with start_service(settings) as svc:
        task = await svc.submit("summarize", text="interrupted")
        await wait_until(lambda: fake_ollama.in_flight == 1)
    assert task_row(db_url, task["id"], "status, attempts - handed_back, lease_owner") == expected


async def test_a_task_handed_back_mid_stream_leaves_no_write_behind(
    db_url: str,
    fake_ollama: FakeOllama,
    start_service: StartService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its streamed text still waiting to be written was flushed after the stop, by a
    timer nobody cancelled: on SQLite, on the writer's connection while the database closed
    it (a segfault in a fresh-clone run). The flush waits 30 s here, so a timer left behind
    is still there when the service has stopped."""
    monkeypatch.setattr(running, "TEXT_FLUSH_SECONDS", 30.0)
    fake_ollama.word_delay = 0.05
    settings = with_workers(make_settings(db_url, fake_ollama.url), shutdown_grace=0)
    async with start_service(settings) as svc:
        task = await svc.submit("summarize", text="streamed as the service stops")
        timer = f"orchestra-task-{task['id']}-text"
        await wait_until(lambda: any(t.get_name() == timer for t in asyncio.all_tasks()))
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("orchestra-")]
    assert left == []
    assert task_row(db_url, task["id"], "status, lease_owner") == ("queued", None)


async def test_a_task_handed_back_counts_its_attempts_as_the_retry_policy_does(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    """The task page said "Attempts 2 of 1" for a task handed back once and then run: a
    hand-back at shutdown does not use up an attempt, and the page now counts as the retry
    policy counts."""
    fake_ollama.latency = 2.0
    settings = with_workers(make_settings(db_url, fake_ollama.url), shutdown_grace=0.2)
    async with start_service(settings) as svc:
        response = await svc.client.post(
            "/api/v1/tasks",
            json={"template": "summarize", "params": {"text": "again"}, "max_attempts": 1},
        )
        task = response.json()
        await wait_until(lambda: fake_ollama.in_flight == 1)
    fake_ollama.latency = 0
    async with start_service(settings) as svc:
        done = await svc.wait(task["id"])
        page = (await svc.client.get(f"/ui/tasks/{task['id']}")).text
    assert done["status"] == "succeeded", done
    assert [a["status"] for a in done["attempts"]] == ["handed_back", "succeeded"]
    assert '<dd id="attempts">1 of 1 (and 1 handed back at a shutdown, not counted)</dd>' in page, (
        page[page.find("Attempts") - 100 : page.find("Attempts") + 200]
    )


async def test_a_retry_that_runs_shows_no_error_of_its_own_yet(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """A task running its second attempt was listed with the first attempt's error, as if
    the attempt running had failed ("lease_expired: the worker running this attempt …");
    that error stays in its attempt's record."""
    fake_ollama.failure = Failure(500, "the model server is on fire", times=1)
    fake_ollama.close_gate("llama3.2")
    task = await service.submit("summarize", text="twice")
    await wait_until(lambda: fake_ollama.held("llama3.2") == 1, timeout=15)
    running = (await service.client.get(f"/api/v1/tasks/{task['id']}")).json()
    listed = (await service.client.get("/api/v1/tasks", params={"status": "running"})).json()
    fake_ollama.open_gate("llama3.2")
    done = await service.wait(task["id"])
    assert running["status"] == "running" and running["error"] is None, running
    first = running["attempts"][0]
    assert first["status"] == "failed" and "on fire" in first["error"]["message"]
    [summary] = [t for t in listed["items"] if t["id"] == task["id"]]
    assert summary["error"] is None
    assert done["status"] == "succeeded" and done["error"] is None


async def test_a_step_cut_short_keeps_its_prompt_error_and_end_event(
    db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    """A step cut short from outside (the task's timeout, a cancel, the service stopping)
    was closed with no prompt, no ``step.finished`` event (a feed consumer saw it running for
    good) and, when handed back, no error: someone debugging saw "failed", and nothing else."""
    fake_ollama.close_gate("llama3.2")
    settings = with_workers(make_settings(db_url, fake_ollama.url), shutdown_grace=0)
    async with start_service(settings) as svc:
        body = {"template": "summarize", "params": {"text": "late"}, "timeout": 1}
        late = (await svc.client.post("/api/v1/tasks", json=body)).json()
        assert (await svc.wait(late["id"]))["status"] == "failed"
        cancelled = await svc.submit("summarize", text="cancelled")
        await wait_until(lambda: fake_ollama.held("llama3.2") == 1)
        await svc.client.post(f"/api/v1/tasks/{cancelled['id']}/cancel")
        assert (await svc.wait(cancelled["id"]))["status"] == "cancelled"
        back = await svc.submit("summarize", text="handed back")
        await wait_until(lambda: fake_ollama.held("llama3.2") == 1)
    expected = {late["id"]: "timeout", cancelled["id"]: "cancelled", back["id"]: "handed_back"}
    for task_id, error in expected.items():
        [(status, step_error, prompt, ended)] = sql_rows(
            db_url,
            "SELECT status, error, prompt, finished_at "
            "FROM task_steps WHERE task_id = ? AND attempt = 1",
            (task_id,),
        )
        assert (status, json.loads(step_error)["type"]) == ("failed", error), task_id
        assert ended is not None and prompt is not None and '"role"' in prompt, task_id
        types = [
            t
            for (t,) in sql_rows(
                db_url, "SELECT type FROM task_events WHERE task_id = ? ORDER BY seq", (task_id,)
            )
        ]
        assert types[-2] == "step.finished", (task_id, types)
