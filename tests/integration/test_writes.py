"""Writes per task: the claim starts the first step, the last step ends with the task, each in
one transaction fenced by the lease; what a follower sees, and what a crash leaves, stay the
same."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import event

from orchestra.config import Settings, TemplateSettings
from orchestra.db import Database, Lease, TaskStore
from orchestra.domain import NewTask, Step, StepStatus, TaskError, TaskStatus, iso_now, now
from tests.conftest import Service, StartService, sql_rows, with_workers
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import free_port, start_process, wait_until, write_config
from tests.fixtures.sse import read_events

TWO_STEPS = """\
name: two_steps
model: llama3.2
steps:
  - id: first
    prompt: "one {{ params.text }}"
  - id: second
    prompt: "two {{ steps.first.output }}"
parameters:
  text: {type: string}
"""


class Writes:
    """Counts the write transactions and the COMMITs of a service's database."""

    def __init__(self, db: Database) -> None:
        self.transactions = 0
        self.commits = 0
        if db.path is not None:
            # SQLite's one writer commits on its sqlite3 connection: every COMMIT it runs.
            raw = db._raw_writer()  # type: ignore[attr-defined]
            raw.set_trace_callback(self._statement)
        else:  # PostgreSQL's pool, through SQLAlchemy
            event.listen(db._engine, "commit", self._commit)  # type: ignore[attr-defined]
        transaction = db.transaction

        async def counted(work: Callable[[Any], Any], **how: Any) -> Any:
            self.transactions += 1
            return await transaction(work, **how)

        db.transaction = counted  # type: ignore[method-assign]

    def _commit(self, _conn: Any) -> None:
        self.commits += 1

    def _statement(self, sql: str) -> None:
        if sql.strip().upper() == "COMMIT":
            self.commits += 1

    def reset(self) -> None:
        self.transactions = self.commits = 0


@pytest.fixture
def quiet_settings(settings: Settings, tmp_path: Path) -> Settings:
    """No write but the tasks' own while a test counts (no poll, no reaper, no lease
    renewal: a submit wakes the workers), and a template with two steps."""
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "two_steps.yaml").write_text(TWO_STEPS)
    quiet = with_workers(settings, poll_interval=3600.0, reap_interval=3600.0, lease_seconds=3600.0)
    return msgspec.structs.replace(quiet, templates=TemplateSettings(dirs=[str(folder)]))


async def settled(service: Service) -> None:
    """Wait until counting may start: the first LISTEN on PostgreSQL wakes the workers for
    what was queued before it (an empty claim, a write), so the dispatcher must have taken
    that wake-up and gone back to sleep (it made a full suite's count one too many once)."""
    pool = service.app.runtime.pool
    await wait_until(lambda: pool.store.db.listening, timeout=10)
    await wait_until(lambda: pool._sleep is not None and not pool._wake.is_set(), timeout=10)


@pytest.fixture
async def svc(quiet_settings: Settings, start_service: StartService) -> AsyncIterator[Service]:
    async with start_service(quiet_settings) as service:
        await settled(service)
        yield service


def writes_of(svc: Service) -> Writes:
    return Writes(svc.app.runtime.pool.store.db)


async def test_a_one_step_task_is_three_writes_submit_claim_and_finish(svc: Service) -> None:
    await svc.wait((await svc.submit("summarize", text="warm up"))["id"])
    writes = writes_of(svc)
    for text in ("hello", "again"):  # the first task's end costs no empty claim after it
        done = await svc.wait((await svc.submit("summarize", text=text))["id"])
        assert done["status"] == "succeeded"
        assert [s["status"] for s in done["steps"]] == ["succeeded"]
    # Where a turn's transactions commit together (SQLite), the claim the submit wakes is
    # asked for right behind it and joins its commit: two commits a task, not three.
    together = svc.app.runtime.pool.store.db.commits_together
    assert (writes.transactions, writes.commits) == ((6, 4) if together else (6, 6))


async def test_a_delayed_submit_is_one_write_and_its_claim_comes_when_it_is_due(
    svc: Service,
) -> None:
    await svc.wait((await svc.submit("summarize", text="warm up"))["id"])
    writes = writes_of(svc)
    later = await svc.client.post(
        "/api/v1/tasks", json={"template": "summarize", "params": {"text": "x"}, "delay": 3600}
    )
    assert later.status_code == 201, later.text
    # No claim for a task an hour away: the submit is the only write.
    assert writes.transactions == 1
    body = {"template": "summarize", "params": {"text": "soon"}, "delay": 0.5}
    soon = (await svc.client.post("/api/v1/tasks", json=body)).json()
    done = await svc.wait(soon["id"])
    # Claimed when due, though the pool polls only hourly here.
    started = datetime.fromisoformat(done["started_at"])
    due = datetime.fromisoformat(done["created_at"]) + timedelta(seconds=0.5)
    assert due <= started < due + timedelta(seconds=0.5)
    # Two submits; the claim and the end of the one due.
    assert writes.transactions == 4


async def test_a_two_step_task_writes_its_middle_step_between(svc: Service) -> None:
    await svc.wait((await svc.submit("summarize", text="warm up"))["id"])
    writes = writes_of(svc)
    done = await svc.wait((await svc.submit("two_steps", text="hello"))["id"])
    assert [s["status"] for s in done["steps"]] == ["succeeded", "succeeded"]
    # submit; claim + first started; first finished; second started; second finished + task.
    assert writes.transactions == 5


async def test_a_failed_step_ends_with_its_task_in_one_write(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    await svc.wait((await svc.submit("summarize", text="warm up"))["id"])
    fake_ollama.models.discard("llama3.2")  # model_not_found: not retried
    writes = writes_of(svc)
    done = await svc.wait((await svc.submit("two_steps", text="hello"))["id"])
    assert done["status"] == "failed" and done["error"]["step"] == "first"
    assert [s["status"] for s in done["steps"]] == ["failed"]
    assert writes.transactions == 3


async def test_events_keep_their_order_and_a_middle_step_shows_before_the_next_ends(
    svc: Service, fake_ollama: FakeOllama
) -> None:
    fake_ollama.latency = 0.5
    task = await svc.submit("two_steps", text="hello")
    seen: list[str] = []

    async def follow() -> None:
        async for e in read_events(svc.client, f"/api/v1/tasks/{task['id']}/events"):
            if e["event"] != "step.tokens":
                seen.append(e["event"])

    follower = asyncio.create_task(follow())
    # The claim's own step start is seen while the model answers the first step.
    await wait_until(lambda: seen[-1:] == ["step.started"], timeout=5)
    assert fake_ollama.in_flight == 1
    # The first step's end is seen while the second step still runs.
    await wait_until(lambda: len(seen) >= 5, timeout=5)
    assert fake_ollama.in_flight == 1 and len(seen) == 5
    await asyncio.wait_for(follower, timeout=10)
    assert seen == [
        "task.queued",
        "task.started",
        "step.started",
        "step.finished",
        "step.started",
        "step.finished",
        "task.finished",
    ]


# -- the store's fenced writes ----------------------------------------------------------------


async def new_task(store: TaskStore) -> int:
    task = (await store.enqueue(NewTask(template="t", template_version=1, params={}))).task
    return task.id


def step_rows(db: Database, task_id: int) -> list[tuple[Any, ...]]:
    return sql_rows(
        db.url,
        "SELECT attempt, step_id, status FROM task_steps WHERE task_id = ? "
        "ORDER BY attempt, position",
        (task_id,),
    )


def event_types(db: Database, task_id: int) -> list[str]:
    rows = sql_rows(
        db.url, "SELECT type FROM task_events WHERE task_id = ? ORDER BY seq", (task_id,)
    )
    return [r[0] for r in rows]


async def test_the_claim_starts_the_first_step_it_is_told_of(db: Database) -> None:
    store = TaskStore(db)
    with_step, without = await new_task(store), await new_task(store)
    firsts = {with_step: "summary"}
    claimed = await store.claim("w", 2, 60, first_step=lambda t: firsts.get(t.id))
    assert {t.id for t in claimed} == {with_step, without}
    assert step_rows(db, with_step) == [(1, "summary", "running")]
    assert step_rows(db, without) == []
    assert event_types(db, with_step) == ["task.queued", "task.started", "step.started"]
    assert event_types(db, without) == ["task.queued", "task.started"]


async def test_the_last_step_and_the_task_end_together_and_a_stale_lease_writes_neither(
    db: Database,
) -> None:
    store = TaskStore(db)
    task_id = await new_task(store)
    first = (await store.claim("old", 1, 60, first_step=lambda _t: "summary"))[0]
    await store.release(Lease(task_id, "old", first.attempts))
    second = (await store.claim("new", 1, 60, first_step=lambda _t: "summary"))[0]
    step = Step(
        id="summary",
        position=0,
        status=StepStatus.SUCCEEDED,
        output="done",
        finished_at=iso_now(),
    )
    stale = Lease(task_id, "old", first.attempts)
    assert not await store.finish(stale, TaskStatus.SUCCEEDED, result="x", step=step)
    current = Lease(task_id, "new", second.attempts)
    assert await store.finish(current, TaskStatus.SUCCEEDED, result="done", step=step, text="do")
    # The handed-back attempt's step ended with it; the stale lease changed nothing.
    assert step_rows(db, task_id) == [(1, "summary", "failed"), (2, "summary", "succeeded")]
    assert event_types(db, task_id)[-4:] == [
        "step.started",
        "step.tokens",
        "step.finished",
        "task.finished",
    ]
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.SUCCEEDED and task.result == "done"


async def test_a_retry_and_a_hand_back_carry_the_ended_step_too(db: Database) -> None:
    store = TaskStore(db)
    task_id = await new_task(store)
    claimed = (await store.claim("w", 1, 60, first_step=lambda _t: "summary"))[0]
    failed = Step(
        id="summary",
        position=0,
        status=StepStatus.FAILED,
        error=TaskError(type="model_error", message="no"),
        finished_at=iso_now(),
    )
    error = TaskError(type="model_error", message="no", retryable=True)
    lease = Lease(task_id, "w", claimed.attempts)
    assert await store.retry_later(lease, error, now(), step=failed)
    again = (await store.claim("w", 1, 60, first_step=lambda _t: "summary"))[0]
    skipped = Step(id="summary", position=0, status=StepStatus.SKIPPED, finished_at=iso_now())
    assert await store.release(Lease(task_id, "w", again.attempts), step=skipped)
    assert step_rows(db, task_id) == [(1, "summary", "failed"), (2, "summary", "skipped")]
    types = event_types(db, task_id)
    assert types.index("step.finished") < types.index("task.retrying")
    assert types[-2:] == ["step.skipped", "task.handed_back"]
    task = await store.get_task(task_id)
    assert task is not None and task.status is TaskStatus.QUEUED and task.handed_back == 1


# -- a crash between the claim and the end ----------------------------------------------------


def attempts_and_steps(db_url: str, task_id: int) -> tuple[list[Any], list[Any]]:
    attempts = sql_rows(
        db_url,
        "SELECT number, status FROM task_attempts WHERE task_id = ? ORDER BY number",
        (task_id,),
    )
    steps = sql_rows(
        db_url,
        "SELECT attempt, status FROM task_steps WHERE task_id = ? ORDER BY attempt",
        (task_id,),
    )
    return attempts, steps


@pytest.mark.slow
async def test_a_crash_between_the_claim_and_the_end_runs_the_task_again(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    fake_ollama.latency = 0.5
    # Leases of a second, reaped and polled five times a second.
    port, config = free_port(), tmp_path / "crash.toml"
    quick = {"lease_seconds": 1.0, "reap_interval": 0.2, "poll_interval": 0.2}
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url, **quick)
    first = await start_process(config)
    try:
        import httpx

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            body = {"template": "summarize", "params": {"text": "crash me"}}
            task_id = (await client.post("/api/v1/tasks", json=body)).json()["id"]
        # Claimed, its step started in the same transaction, the model answering.
        await wait_until(lambda: attempts_and_steps(db_url, task_id)[1] == [(1, "running")])
        await wait_until(lambda: fake_ollama.in_flight > 0, timeout=5)
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    fake_ollama.latency = 0.0
    second = await start_process(config)
    try:

        def done() -> bool:
            rows = sql_rows(db_url, "SELECT status FROM tasks WHERE id = ?", (task_id,))
            return rows == [("succeeded",)]

        await wait_until(done, timeout=30, interval=0.1)
    finally:
        second.send_signal(signal.SIGTERM)
        await second.wait()
    attempts, steps = attempts_and_steps(db_url, task_id)
    assert attempts == [(1, "lost"), (2, "succeeded")]
    # The lost attempt's step ended with it (failed, as its attempt was lost), not running.
    assert steps == [(1, "failed"), (2, "succeeded")]


async def test_an_idle_service_polls_its_webhook_outbox_without_writing(
    quiet_settings: Settings, start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestra.webhook_sender import WebhookSender

    polls = 0
    claim_and_send = WebhookSender._claim_and_send

    async def counted(self: WebhookSender) -> bool:
        nonlocal polls
        polls += 1
        return await claim_and_send(self)

    monkeypatch.setattr(WebhookSender, "_claim_and_send", counted)
    hooks = msgspec.structs.replace(quiet_settings.webhooks, poll_interval=0.02)
    async with start_service(msgspec.structs.replace(quiet_settings, webhooks=hooks)) as svc:
        await settled(svc)
        writes = writes_of(svc)
        seen = polls
        await wait_until(lambda: polls >= seen + 5, timeout=10)
        # Nothing to send: each poll reads, none writes (it was a claim, a write, a second).
        assert writes.transactions == 0
