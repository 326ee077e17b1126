"""What an operator's exploratory test found in the logs: ends that are failures are warnings,
a queued task cancelled is logged, and a side loop's failures during a database outage are
said once (and once more when it works again)."""

from __future__ import annotations

import asyncio

import pytest

from orchestra.catalog import TemplateCatalog
from orchestra.config import Settings
from orchestra.db import Database
from orchestra.db.templates import TemplateStore
from orchestra.templating.registry import TemplateRegistry
from tests.conftest import Service
from tests.fixtures.fake_ollama import Failure, FakeOllama
from tests.fixtures.logs import captured, events
from tests.fixtures.postgres import ON_POSTGRESQL, PostgresServer
from tests.fixtures.servers import wait_until

TEXT = {"text": "a sentence for the model"}


async def test_a_task_that_failed_is_logged_as_a_warning(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """A retry was a warning, the failure that ended the task an info line."""
    fake_ollama.failure = Failure(500, "the model server is on fire")
    with captured() as logged:
        response = await service.client.post(
            "/api/v1/tasks", json={"template": "summarize", "params": TEXT, "max_attempts": 1}
        )
        failed = await service.wait(response.json()["id"], 30)
        fake_ollama.failure = None
        succeeded = await service.wait((await service.submit("summarize", **TEXT))["id"])
        # Each is logged just after the write that makes it finished.
        await wait_until(lambda: len(events(logged, "task.finished")) == 2, timeout=10)
    assert (failed["status"], succeeded["status"]) == ("failed", "succeeded")
    ends = {e["task_id"]: e for e in events(logged, "task.finished")}
    assert ends[failed["id"]]["log_level"] == "warning"
    assert ends[failed["id"]]["status"] == "failed"
    assert ends[succeeded["id"]]["log_level"] == "info"


async def test_a_queued_task_cancelled_is_logged(service: Service) -> None:
    with captured() as logged:
        response = await service.client.post(
            "/api/v1/tasks", json={"template": "summarize", "params": TEXT, "delay": 3600}
        )
        task_id = response.json()["id"]
        answer = await service.client.post(f"/api/v1/tasks/{task_id}/cancel")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    [cancelled] = events(logged, "task.cancelled")
    assert cancelled["task_id"] == task_id and cancelled["log_level"] == "info"


@pytest.mark.skipif(not ON_POSTGRESQL, reason="stops the database server")
async def test_the_templates_refresh_says_an_outage_once_and_its_end_once(
    settings: Settings, db_url: str, postgres: PostgresServer | None
) -> None:
    """It said ``templates.refresh_failed`` at every try (about once a second per process)
    while the database was away."""
    assert postgres is not None
    db = Database(db_url)
    catalog = TemplateCatalog(TemplateRegistry([], limits=settings.limits), TemplateStore(db))
    tries = 0
    refresh = catalog.refresh

    async def counted() -> None:
        nonlocal tries
        tries += 1
        await refresh()

    catalog.refresh = counted  # type: ignore[method-assign]
    with captured() as logged:
        following = asyncio.create_task(catalog.follow(interval=0.05))
        try:
            await wait_until(lambda: tries >= 2, timeout=10)
            postgres.stop()
            try:
                await wait_until(lambda: events(logged, "templates.refresh_failed"), timeout=20)
                failed_at = tries
                await wait_until(lambda: tries >= failed_at + 10, timeout=20)
            finally:
                postgres.resume()
            await wait_until(
                lambda: events(logged, "templates.refresh_recovered"), timeout=30, interval=0.1
            )
            recovered_at = tries
            await wait_until(lambda: tries >= recovered_at + 5, timeout=10)
        finally:
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            await db.close()
    assert len(events(logged, "templates.refresh_failed")) == 1
    assert len(events(logged, "templates.refresh_recovered")) == 1
    assert events(logged, "templates.refresh_failed")[0]["log_level"] == "warning"
