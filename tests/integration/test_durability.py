"""Retries, timeouts, cancellation, retry by request, scheduling order, idempotency, per-model
limits, fencing and retention — against the fake model server over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from orchestra.config import (
    ModelSettings,
    RetentionSettings,
    ServerSettings,
    Settings,
    TemplateSettings,
)
from orchestra.db import Database, TaskStore
from orchestra.domain import Lease, TaskStatus
from tests.conftest import Service, StartService, sql_rows, task_row, with_workers
from tests.fixtures.fake_ollama import Failure, FakeOllama
from tests.fixtures.servers import load_slack, wait_until

TEMPLATES = {
    "flaky.yaml": """\
name: flaky
model: llama3.2
retry: {max_attempts: 10, backoff: exponential, initial_delay: 10ms, max_delay: 50ms}
parameters:
  n: {type: integer, default: 0}
steps:
  - id: answer
    prompt: "call {{ params.n }}"
""",
    "patient.yaml": """\
name: patient
model: llama3.2
retry: {max_attempts: 2, initial_delay: 2s, max_delay: 2s}
steps:
  - id: answer
    prompt: hi
""",
    "hasty.yaml": """\
name: hasty
model: llama3.2
retry: {max_attempts: 2, initial_delay: 10ms}
steps:
  - id: answer
    prompt: hi
    timeout: 300ms
""",
    "other.yaml": """\
name: other
model: qwen2.5
steps:
  - id: answer
    prompt: hi
""",
}


def settings_with_templates(base: Settings, folder: Path) -> Settings:
    for name, text in TEMPLATES.items():
        (folder / name).write_text(text)
    return msgspec.structs.replace(base, templates=TemplateSettings(dirs=[str(folder)]))


@pytest.fixture
def durable_settings(settings: Settings, tmp_path: Path) -> Settings:
    folder = tmp_path / "templates"
    folder.mkdir()
    return settings_with_templates(settings, folder)


@pytest.fixture
async def svc(durable_settings: Settings, start_service: StartService) -> AsyncIterator[Service]:
    async with start_service(durable_settings) as service:
        yield service


async def post(svc: Service, body: dict[str, object], **kwargs: object) -> dict[str, object]:
    response = await svc.client.post("/api/v1/tasks", json=body, **kwargs)  # type: ignore[arg-type]
    assert response.status_code in (200, 201), response.text
    result: dict[str, object] = response.json()
    return result


# -- retries --------------------------------------------------------------------------------


async def test_flaky_model_every_task_succeeds_within_its_retries(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.fail_rate = 0.3
    ids = [(await svc.submit("flaky", n=i))["id"] for i in range(40)]
    done = [await svc.wait(i, seconds=30) for i in ids]
    assert all(t["status"] == "succeeded" for t in done)
    retried = [t for t in done if len(t["attempts"]) > 1]
    assert retried, "a 30% failure rate should have caused some retries"
    for task in retried:
        *failed, last = task["attempts"]
        assert last["status"] == "succeeded"
        assert all(a["status"] == "failed" for a in failed)
        assert all("500: injected failure" in a["error"]["message"] for a in failed)
        assert [a["number"] for a in task["attempts"]] == list(range(1, len(task["attempts"]) + 1))
    assert len(fake_ollama.requests) == sum(len(t["attempts"]) for t in done)


async def test_missing_model_fails_on_the_first_attempt(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.models.discard("llama3.2")
    done = await svc.wait((await svc.submit("flaky"))["id"])
    assert done["status"] == "failed"
    assert "'llama3.2' not found" in done["error"]["message"]
    assert [a["status"] for a in done["attempts"]] == ["failed"]
    assert len(fake_ollama.requests) == 1


async def test_a_retry_waits_queued_with_next_run_at(svc: Service, fake_ollama: FakeOllama) -> None:
    fake_ollama.failure = Failure(503, "server busy", times=1)
    task = await svc.submit("patient")

    async def waiting_for_retry() -> bool:
        body = (await svc.client.get(f"/api/v1/tasks/{task['id']}")).json()
        return bool(body["status"] == "queued" and body["attempts"])

    await wait_until(waiting_for_retry, timeout=5)
    body = (await svc.client.get(f"/api/v1/tasks/{task['id']}")).json()
    assert body["next_run_at"] > body["attempts"][0]["finished_at"]
    assert body["error"]["message"].endswith("503: server busy")
    done = await svc.wait(task["id"], seconds=10)
    assert done["status"] == "succeeded" and done["next_run_at"] is None
    assert [a["status"] for a in done["attempts"]] == ["failed", "succeeded"]
    gap = datetime.fromisoformat(done["attempts"][1]["started_at"]) - datetime.fromisoformat(
        done["attempts"][0]["finished_at"]
    )
    assert timedelta(seconds=1) <= gap < timedelta(seconds=3)  # 2s backoff, equal jitter


async def test_a_wait_begun_before_a_failed_attempt_answers_the_retry_that_succeeds(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    # The failed attempt wakes the wait (its end may have been the task's), which finds the
    # task queued again and waits on through the retry's claim and steps until its end.
    fake_ollama.failure = Failure(503, "server busy", times=1)
    task = await svc.submit("patient")
    done = await svc.wait(task["id"], seconds=15)
    assert done["status"] == "succeeded"
    assert [a["status"] for a in done["attempts"]] == ["failed", "succeeded"]


async def test_a_retry_waits_as_long_as_a_busy_server_asks(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    """A 429 with Retry-After: the retry waits at least that long (the policy alone would
    try again within 3 s, and be refused again), and the error says the wait."""
    fake_ollama.failure = Failure(429, "slow down", times=1, headers={"Retry-After": "4"})
    task = await svc.submit("patient")
    done = await svc.wait(task["id"], seconds=20)
    assert done["status"] == "succeeded"
    first, second = done["attempts"]
    assert first["error"]["retry_after"] == 4.0 and "Retry-After" in first["error"]["message"]
    gap = datetime.fromisoformat(second["started_at"]) - datetime.fromisoformat(
        first["finished_at"]
    )
    assert gap >= timedelta(seconds=4)


async def test_task_max_attempts_overrides_the_template(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.failure = Failure(500, "down")
    task = await post(svc, {"template": "flaky", "max_attempts": 2})
    done = await svc.wait(task["id"])  # type: ignore[arg-type]
    assert done["status"] == "failed"
    assert done["max_attempts"] == 2 and len(done["attempts"]) == 2


# -- timeouts -------------------------------------------------------------------------------


async def test_step_timeout_closes_the_model_call_and_is_retried(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.latency = 5
    done = await svc.wait((await svc.submit("hasty"))["id"])
    assert done["status"] == "failed"
    assert [a["error"]["type"] for a in done["attempts"]] == ["timeout", "timeout"]
    assert "took longer than its timeout of 0.3s" in done["error"]["message"]
    await wait_until(lambda: fake_ollama.disconnects == 2)


async def test_task_timeout_from_the_request(svc: Service, fake_ollama: FakeOllama) -> None:
    fake_ollama.latency = 5
    task = await post(svc, {"template": "flaky", "timeout": 0.3, "max_attempts": 1})
    done = await svc.wait(task["id"])  # type: ignore[arg-type]
    assert done["status"] == "failed" and done["timeout"] == 0.3
    assert done["error"]["type"] == "timeout"
    assert "task took longer than its timeout of 0.3s" in done["error"]["message"]
    # The step it was in ended with it, not left running.
    [step] = done["steps"]
    assert step["status"] == "failed" and step["finished_at"] is not None
    assert step["error"]["type"] == "timeout"
    # It ran until the timeout, and says for how long, as a step that ends itself does.
    assert 300 <= step["duration_ms"] < 5000
    await wait_until(lambda: fake_ollama.disconnects == 1)


# -- cancel and retry -----------------------------------------------------------------------


async def test_cancel_a_queued_task(
    durable_settings: Settings, start_service: StartService
) -> None:
    async with start_service(with_workers(durable_settings, concurrency=1)) as svc:
        task = await post(svc, {"template": "flaky", "delay": 60})
        response = await svc.client.post(f"/api/v1/tasks/{task['id']}/cancel")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "cancelled" and body["attempts"] == []
        again = await svc.client.post(f"/api/v1/tasks/{task['id']}/cancel")
        assert again.status_code == 409
        assert again.json()["task_status"] == "cancelled"


async def test_cancel_a_running_task_closes_the_model_call(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.latency = 10
    task = await svc.submit("flaky")
    await wait_until(lambda: fake_ollama.in_flight == 1)
    started = asyncio.get_running_loop().time()
    response = await svc.client.post(f"/api/v1/tasks/{task['id']}/cancel")
    elapsed = asyncio.get_running_loop().time() - started
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "cancelled"
    assert [a["status"] for a in body["attempts"]] == ["cancelled"]
    # The step it was in ended with it, not left running (before a retry, and after one
    # queued the task again).
    [step] = body["steps"]
    assert step["status"] == "failed" and step["finished_at"] is not None
    assert step["error"]["type"] == "cancelled"
    assert elapsed < 1.0 * load_slack()
    await wait_until(lambda: fake_ollama.disconnects == 1, timeout=2)


async def test_a_task_that_finishes_before_its_cancel_lands_answers_409_with_its_status(
    durable_settings: Settings, start_service: StartService, db_url: str
) -> None:
    """The cancel flags a running task, and its worker (another process: played here by a
    store of its own) finishes it before it sees the flag: the answer is not a 200 showing a
    succeeded task, but the 409 a finished task gets."""
    api_only = msgspec.structs.replace(durable_settings, server=ServerSettings(workers=False))
    worker = Database(db_url)
    try:
        store = TaskStore(worker)
        async with start_service(api_only) as svc:
            task = await post(svc, {"template": "flaky"})
            [claimed] = await store.claim("other-process", 1, 30)
            assert claimed.id == task["id"]
            cancel = asyncio.create_task(svc.client.post(f"/api/v1/tasks/{task['id']}/cancel"))
            flagged = "SELECT cancel_requested FROM tasks WHERE id = ?"
            await wait_until(lambda: sql_rows(db_url, flagged, (task["id"],))[0][0])
            lease = Lease(claimed.id, "other-process", claimed.attempts)
            assert await store.finish(lease, TaskStatus.SUCCEEDED, result="done")
            response = await cancel
        assert response.status_code == 409, response.text
        assert response.json()["task_status"] == "succeeded"
        assert "finished before it could be stopped" in response.json()["message"]
    finally:
        await worker.close()


async def test_cancel_finished_or_unknown(svc: Service) -> None:
    done = await svc.wait((await svc.submit("flaky"))["id"])
    response = await svc.client.post(f"/api/v1/tasks/{done['id']}/cancel")
    assert response.status_code == 409
    assert response.json()["task_status"] == "succeeded"
    assert (await svc.client.post("/api/v1/tasks/999999/cancel")).status_code == 404


async def test_retry_a_failed_task_as_a_new_attempt(svc: Service, fake_ollama: FakeOllama) -> None:
    fake_ollama.models.discard("llama3.2")
    failed = await svc.wait((await svc.submit("flaky"))["id"])
    assert failed["status"] == "failed"
    fake_ollama.models.add("llama3.2")
    response = await svc.client.post(f"/api/v1/tasks/{failed['id']}/retry")
    assert response.status_code == 200
    assert response.json()["status"] == "queued" and response.json()["error"] is None
    done = await svc.wait(failed["id"])
    assert done["status"] == "succeeded"
    assert [a["status"] for a in done["attempts"]] == ["failed", "succeeded"]
    conflict = await svc.client.post(f"/api/v1/tasks/{failed['id']}/retry")
    assert conflict.status_code == 409 and conflict.json()["task_status"] == "succeeded"


# -- scheduling -----------------------------------------------------------------------------


async def test_priority_then_age_with_one_worker(
    durable_settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    fake_ollama.latency = 2.0  # the first call keeps the only worker busy while we submit
    async with start_service(with_workers(durable_settings, concurrency=1)) as svc:
        first = await svc.submit("flaky", n=0)
        await wait_until(lambda: fake_ollama.in_flight == 1)  # the worker is now busy
        later = [
            await post(svc, {"template": "flaky", "params": {"n": n}, "priority": priority})
            for n, priority in ((1, 0), (2, 5), (3, 0), (4, 9))
        ]
        fake_ollama.latency = 0  # calls that start from now on answer at once
        for task in [first, *later]:
            await svc.wait(task["id"])  # type: ignore[arg-type]
    order = [r["messages"][-1]["content"] for r in fake_ollama.requests]
    assert order == ["call 0", "call 4", "call 2", "call 1", "call 3"]


async def test_run_at_and_delay_are_respected(svc: Service) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=1.5)
    by_time = await post(svc, {"template": "flaky", "run_at": soon.isoformat()})
    by_delay = await post(svc, {"template": "flaky", "delay": 1})
    assert by_time["next_run_at"] is not None
    for task, due in ((by_time, soon), (by_delay, None)):
        done = await svc.wait(task["id"])  # type: ignore[arg-type]
        started = datetime.fromisoformat(done["started_at"])
        expected = due or datetime.fromisoformat(done["created_at"]) + timedelta(seconds=1)
        assert expected <= started < expected + timedelta(seconds=1)


async def test_run_at_and_delay_together_are_refused(svc: Service) -> None:
    response = await svc.client.post(
        "/api/v1/tasks",
        json={"template": "flaky", "delay": 1, "run_at": "2030-01-01T00:00:00Z"},
    )
    assert response.status_code == 400
    assert response.json()["fields"][0]["field"] == "delay"


# -- idempotency ----------------------------------------------------------------------------


async def test_idempotency_key_in_body_or_header(svc: Service) -> None:
    body = {"template": "flaky", "params": {"n": 1}, "idempotency_key": "order-42"}
    first = await svc.client.post("/api/v1/tasks", json=body)
    again = await svc.client.post("/api/v1/tasks", json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    changed = await svc.client.post("/api/v1/tasks", json={**body, "params": {"n": 2}})
    assert changed.status_code == 409
    assert "order-42" in changed.json()["message"]
    assert changed.json()["fields"] == [
        {"field": "idempotency_key", "message": "already used with another request"}
    ]

    plain = {"template": "flaky", "params": {"n": 3}}
    h1 = await svc.client.post("/api/v1/tasks", json=plain, headers={"Idempotency-Key": "k2"})
    h2 = await svc.client.post("/api/v1/tasks", json=plain, headers={"Idempotency-Key": "k2"})
    assert (h1.status_code, h2.status_code) == (201, 200)
    assert h1.json()["id"] == h2.json()["id"] and h2.json()["idempotency_key"] == "k2"
    # A header the key cannot be is refused naming the header, as the body's field is named.
    for bad, reason in (("", "is empty"), ("k" * 256, "is 256 characters; the limit is 255")):
        refused = await svc.client.post(
            "/api/v1/tasks", json=plain, headers={"Idempotency-Key": bad}
        )
        assert refused.status_code == 400, refused.text
        assert refused.json()["fields"] == [{"field": "Idempotency-Key", "message": reason}]
    listing = (await svc.client.get("/api/v1/tasks")).json()["items"]
    assert len(listing) == 2


# -- per-model limits -----------------------------------------------------------------------


async def test_model_concurrency_limit_keeps_the_rest_queued(
    durable_settings: Settings, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    fake_ollama.latency = 0.3
    # four workers, but one llama3.2 call at a time
    limited = msgspec.structs.replace(
        durable_settings, models={"llama3.2": ModelSettings(max_concurrency=1)}
    )
    async with start_service(limited) as svc:
        ids = [(await svc.submit("flaky", n=i))["id"] for i in range(4)]
        ids += [(await svc.submit("other"))["id"] for _ in range(3)]
        await wait_until(lambda: fake_ollama.in_flight_by_model.get("qwen2.5", 0) >= 2)
        running = (await svc.client.get("/api/v1/tasks", params={"status": "running"})).json()
        assert sum(1 for t in running["items"] if t["template"] == "flaky") <= 1
        done = [await svc.wait(i) for i in ids]
    assert all(t["status"] == "succeeded" for t in done)
    assert fake_ollama.max_in_flight_by_model["llama3.2"] == 1
    assert fake_ollama.max_in_flight_by_model["qwen2.5"] >= 2


# -- fencing --------------------------------------------------------------------------------


async def test_a_worker_that_lost_its_lease_cannot_finish_and_stops(
    durable_settings: Settings, fake_ollama: FakeOllama, start_service: StartService, db_url: str
) -> None:
    fake_ollama.latency = 3
    settings = with_workers(durable_settings, lease_seconds=0.6, reap_interval=60)
    async with start_service(settings) as svc:
        task = await svc.submit("flaky")
        await wait_until(lambda: fake_ollama.in_flight == 1)
        # another worker takes over
        sql_rows(db_url, "UPDATE tasks SET lease_owner = 'thief' WHERE id = ?", (task["id"],))
        await wait_until(lambda: fake_ollama.disconnects == 1, timeout=2)  # it stopped its call
    assert task_row(db_url, task["id"], "status, lease_owner, result") == (
        "running",
        "thief",
        None,
    )


# -- retention ------------------------------------------------------------------------------


async def test_retention_deletes_old_finished_tasks_only(
    durable_settings: Settings, start_service: StartService, db_url: str
) -> None:
    settings = msgspec.structs.replace(
        durable_settings,
        retention=RetentionSettings(days=1, interval=3600),
    )
    async with start_service(settings) as svc:
        old = await svc.wait((await svc.submit("flaky", n=1))["id"])
        recent = await svc.wait((await svc.submit("flaky", n=2))["id"])
        waiting = await post(svc, {"template": "flaky", "delay": 3600})
        sql_rows(
            db_url,
            "UPDATE tasks SET finished_at = '2000-01-01T00:00:00.000000Z' WHERE id = ?",
            (old["id"],),
        )
        pool = svc.app.runtime.pool
        assert await pool.apply_retention() == 1
        assert (await svc.client.get(f"/api/v1/tasks/{old['id']}")).status_code == 404
        assert (await svc.client.get(f"/api/v1/tasks/{recent['id']}")).status_code == 200
        assert (await svc.client.get(f"/api/v1/tasks/{waiting['id']}")).status_code == 200
    orphans = sql_rows(
        db_url,
        "SELECT (SELECT count(*) FROM task_attempts WHERE task_id = ?) + "
        "(SELECT count(*) FROM task_steps WHERE task_id = ?)",
        (old["id"], old["id"]),
    )
    assert orphans == [(0,)]


async def test_retention_deletes_old_webhook_deliveries_and_schedule_ticks(
    durable_settings: Settings, start_service: StartService, db_url: str
) -> None:
    """What outlives a task goes by age too: finished deliveries (with their attempts) and
    schedules' ticks. Pending deliveries and recent rows stay."""
    settings = msgspec.structs.replace(
        durable_settings, retention=RetentionSettings(days=1, interval=3600)
    )
    old, new = "2000-01-01T00:00:00.000000Z", "2999-01-01T00:00:00.000000Z"
    async with start_service(settings) as svc:
        sql_rows(
            db_url,
            "INSERT INTO webhooks (url, event_types, secret, created_at) "
            "VALUES ('https://example.com/h', '[]', 'whsec_x', ?)",
            (old,),
        )
        [(hook,)] = sql_rows(db_url, "SELECT id FROM webhooks")
        for status, time in (
            ("delivered", old),
            ("failed", old),
            ("pending", old),
            ("delivered", new),
        ):
            finished = None if status == "pending" else time
            # The pending one is not due: the running service's sender would take it.
            due = new if status == "pending" else time
            sql_rows(
                db_url,
                "INSERT INTO webhook_deliveries (webhook_id, type, payload, status, "
                "next_attempt_at, created_at, finished_at) "
                "VALUES (?, 'task.finished', '{}', ?, ?, ?, ?)",
                (hook, status, due, time, finished),
            )
        [(first,)] = sql_rows(db_url, "SELECT min(id) FROM webhook_deliveries")
        sql_rows(
            db_url,
            "INSERT INTO webhook_attempts (delivery_id, attempt, time) VALUES (?, 1, ?)",
            (first, old),
        )
        sql_rows(
            db_url,
            "INSERT INTO schedules (name, template, params, options, timezone, every_seconds, "
            "overlap, catch_up, source, created_at, updated_at) "
            "VALUES ('s', 'flaky', '{}', '{}', 'UTC', 60, 'skip', 'none', 'api', ?, ?)",
            (old, old),
        )
        [(schedule,)] = sql_rows(db_url, "SELECT id FROM schedules")
        for time in (old, new):
            sql_rows(
                db_url,
                "INSERT INTO schedule_fires (schedule_id, fire_at, outcome, time) "
                "VALUES (?, ?, 'skipped', ?)",
                (schedule, time, time),
            )
        # An old tick whose task is still unfinished stays: it is how the next tick finds its
        # previous task (overlap = "skip"); without it, two ran at once.
        body = {"template": "flaky", "params": {}, "delay": 3600}
        waiting = (await svc.client.post("/api/v1/tasks", json=body)).json()["id"]
        sql_rows(
            db_url,
            "INSERT INTO schedule_fires (schedule_id, fire_at, task_id, outcome, time) "
            "VALUES (?, '1999-01-01T00:00:00.000000Z', ?, 'submitted', ?)",
            (schedule, waiting, old),
        )
        await svc.app.runtime.pool.apply_retention()
    kept = sql_rows(db_url, "SELECT status, created_at FROM webhook_deliveries ORDER BY id")
    assert kept == [("pending", old), ("delivered", new)]
    assert sql_rows(db_url, "SELECT count(*) FROM webhook_attempts") == [(0,)]
    kept_ticks = sql_rows(db_url, "SELECT fire_at, task_id FROM schedule_fires ORDER BY fire_at")
    assert kept_ticks == [("1999-01-01T00:00:00.000000Z", waiting), (new, None)]


async def test_retention_runs_by_itself(
    durable_settings: Settings, start_service: StartService, db_url: str
) -> None:
    settings = msgspec.structs.replace(
        durable_settings, retention=RetentionSettings(days=1, interval=0.2)
    )
    async with start_service(settings) as svc:
        old = await svc.wait((await svc.submit("flaky"))["id"])
        sql_rows(
            db_url,
            "UPDATE tasks SET finished_at = '2000-01-01T00:00:00.000000Z' WHERE id = ?",
            (old["id"],),
        )

        async def gone() -> bool:
            return (await svc.client.get(f"/api/v1/tasks/{old['id']}")).status_code == 404

        await wait_until(gone, timeout=5)


async def test_a_task_that_cannot_be_started_leaves_the_pool_claiming(
    svc: Service, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in starting one claimed task (here: its record cannot be made) is logged, and
    the dispatcher goes on claiming; it had ended, and with it every claim of the process."""
    from orchestra import worker

    class Broken(worker.Running):
        def __init__(self, task: Any, *args: Any) -> None:
            if task.params.get("text") == "broken":
                raise RuntimeError("a bug in starting a task")
            super().__init__(task, *args)

    monkeypatch.setattr(worker, "Running", Broken)
    broken = await svc.submit("summarize", text="broken")
    await wait_until(lambda: task_row(db_url, broken["id"], "status")[0] == "running")
    fine = await svc.submit("summarize", text="fine")
    assert (await svc.wait(fine["id"]))["status"] == "succeeded"


async def test_a_dispatcher_that_fails_is_started_again(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error in the claiming loop itself (a bug) is logged and the loop starts again, after
    a pause that doubles while it keeps failing (no spinning); it had ended, and the process
    claimed nothing more while /health said ok."""
    pool = svc.app.runtime.pool
    plan = pool.capacity.next_claim
    failed_at: list[float] = []

    def fails_three_times(running: Any) -> Any:
        if len(failed_at) < 3:
            failed_at.append(time.monotonic())
            raise RuntimeError("a bug in planning a claim")
        return plan(running)

    monkeypatch.setattr(pool.capacity, "next_claim", fails_three_times)
    pool.notify()
    await wait_until(lambda: len(failed_at) == 3, timeout=10)
    assert failed_at[2] - failed_at[0] >= 0.1 + 0.2 - 0.02  # restarted after 0.1 s, then 0.2 s
    task = await svc.submit("summarize", text="after the failures")
    assert (await svc.wait(task["id"]))["status"] == "succeeded"


async def test_a_pool_that_cannot_claim_makes_health_degraded_naming_why(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims that fail with something other than the database's refusal (a bug, a schema an
    upgrade changed), or a dispatcher that fails, leave the process claiming nothing; /health
    said ok all along. Now it is degraded and names why, until a claim succeeds again."""
    pool = svc.app.runtime.pool
    claim, plan = pool.store.claim, pool.capacity.next_claim
    broken = {"claim": True, "plan": False}

    async def failing_claim(*args: Any, **kwargs: Any) -> Any:
        if broken["claim"]:
            raise RuntimeError("a bug in the claim")
        return await claim(*args, **kwargs)

    def failing_plan(running: Any) -> Any:
        if broken["plan"]:
            broken["plan"] = False
            raise RuntimeError("a bug in planning a claim")
        return plan(running)

    monkeypatch.setattr(pool.store, "claim", failing_claim)
    monkeypatch.setattr(pool.capacity, "next_claim", failing_plan)
    health: dict[str, Any] = {}

    async def health_is(status: str) -> bool:
        pool.notify()
        health.update((await svc.client.get("/health")).json())
        return health["status"] == status

    await wait_until(lambda: health_is("degraded"), timeout=10)
    assert health["workers"].startswith("error: claims fail (RuntimeError: a bug in the claim)")
    assert " since 20" in health["workers"]
    broken["claim"] = False
    await wait_until(lambda: health_is("ok"), timeout=10)
    assert health["workers"] == "ok"

    broken["plan"] = True
    await wait_until(lambda: health_is("degraded"), timeout=10)
    assert "the claiming loop failed (RuntimeError: a bug in planning a claim)" in health["workers"]
    await wait_until(lambda: health_is("ok"), timeout=10)  # started again, it claims


async def test_a_newer_orchestra_upgrading_the_schema_under_this_one_makes_health_degraded(
    svc: Service, db_url: str
) -> None:
    """A rolling upgrade: a newer Orchestra migrates the shared database while this older
    process still serves. Nothing said so until its claims broke; /health now names it, so
    the old process is replaced before it writes rows the new schema does not expect."""
    from orchestra.db.schema import LATEST

    assert (await svc.client.get("/health?check=now")).json()["status"] == "ok"
    sql_rows(
        db_url,
        "INSERT INTO schema_version (version, applied_at) "
        f"VALUES ({LATEST + 1}, '2026-12-05T00:00:00.000000Z')",
    )
    health = (await svc.client.get("/health?check=now")).json()
    assert health["status"] == "degraded", health
    assert f"schema version {LATEST + 1}" in health["database"], health
    assert f"this process knows {LATEST}" in health["database"], health
    sql_rows(db_url, f"DELETE FROM schema_version WHERE version = {LATEST + 1}")
    assert (await svc.client.get("/health?check=now")).json()["status"] == "ok"


async def test_a_process_without_workers_leaves_workers_out_of_health(
    durable_settings: Settings, start_service: StartService
) -> None:
    """`--no-workers`: no pool claims here, so /health has no `workers` to report (it said
    "ok" for a pool that never ran)."""
    server = msgspec.structs.replace(durable_settings.server, workers=False)
    async with start_service(msgspec.structs.replace(durable_settings, server=server)) as svc:
        health = (await svc.client.get("/health")).json()
    assert "workers" not in health and health["status"] in ("ok", "degraded"), health


async def test_a_finished_attempt_is_freed_without_waiting_for_the_garbage_collector(
    svc: Service,
) -> None:
    """Its ``Running`` held its recorder, whose writer closure held the ``Running``: every
    attempt stayed in memory (its task, template, recorder) until a full collection, which a
    busy service may make rarely (a 34-minute soak, helper-146)."""
    import gc

    from orchestra.running import Running

    owner = svc.app.runtime.pool.owner
    gc.collect()
    gc.disable()
    try:
        ids = [(await svc.submit("summarize", text=f"freed {i}"))["id"] for i in range(5)]
        for task_id in ids:
            await svc.wait(task_id)

        def kept() -> list[int]:
            return [
                o.task.id
                for o in gc.get_objects()
                if isinstance(o, Running) and o.lease.owner == owner and o.task.id in ids
            ]

        # The pool drops each after its end is written (just after the answer): none then.
        await wait_until(lambda: not svc.app.runtime.pool._running, timeout=10)
        assert kept() == []
    finally:
        gc.enable()
