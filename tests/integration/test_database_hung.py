"""A database that takes connections and never answers (a hung server, a network path that
drops every packet): /health and /metrics answer within seconds, saying it is down. They
waited for the pool's minute: a liveness probe failed (a restart of every replica, which
cures nothing), a scrape failed instead of reading ``orchestra_database_up 0``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import pytest

from orchestra.config import Settings
from orchestra.shared_read import DATABASE_ANSWER_SECONDS
from tests.conftest import Service, StartService, make_keys
from tests.fixtures.pg_cut import CommitCutter
from tests.fixtures.postgres import ON_POSTGRESQL
from tests.fixtures.servers import load_slack, wait_until
from tests.integration.test_lost_commits import cutter, relayed
from tests.integration.test_metrics import Scrape

pytestmark = pytest.mark.skipif(
    not ON_POSTGRESQL, reason="a server that takes connections and does not answer"
)

__all__ = ["cutter", "relayed"]  # the fixtures, here too

#: What an answer may take past the wait: the loop's turns on a loaded machine.
SLACK = 2.0


@pytest.fixture
async def frozen(relayed: Service, cutter: CommitCutter) -> AsyncIterator[Service]:
    """The service, its database hung from now until the test ends."""
    assert (await relayed.client.get("/health")).status_code == 200
    cutter.freeze()
    try:
        yield relayed
    finally:
        cutter.thaw()  # so the service can stop


async def _timed(svc: Service, path: str) -> tuple[float, int, str]:
    began = time.monotonic()
    response = await svc.client.get(path, timeout=DATABASE_ANSWER_SECONDS * 10)
    return time.monotonic() - began, response.status_code, response.text


async def test_health_and_metrics_answer_in_time_while_the_database_hangs(
    frozen: Service, cutter: CommitCutter
) -> None:
    await asyncio.sleep(1.1)  # the check /health made a moment ago is stale now
    live, ready, scraped = await asyncio.gather(
        _timed(frozen, "/health?probe=live"), _timed(frozen, "/health"), _timed(frozen, "/metrics")
    )
    for took, *_ in (live, ready, scraped):
        assert took < DATABASE_ANSWER_SECONDS + SLACK, (live, ready, scraped)
    assert live[1] == 200 and '"status":"down"' in live[2], live
    assert ready[1] == 503 and "has not answered" in ready[2], ready
    assert scraped[1] == 200, scraped
    assert Scrape(scraped[2])("orchestra_database_up") == 0
    # Asked again while those reads still hang: in time (the keys' copy went stale meanwhile:
    # its read waits as long, once, and the copy stays in use), then at once.
    took, status, _ = await _timed(frozen, "/health")
    assert status == 503 and took < DATABASE_ANSWER_SECONDS + SLACK, took
    took, status, _ = await _timed(frozen, "/health")
    assert status == 503 and took < 1.0 * load_slack(), took

    cutter.thaw()

    async def ok_again() -> bool:
        return (await frozen.client.get("/health")).status_code == 200

    await wait_until(ok_again, timeout=20, interval=0.2)
    assert Scrape((await frozen.client.get("/metrics")).text)("orchestra_database_up") == 1


async def _scrape_in_time(svc: Service, headers: dict[str, str]) -> None:
    began = time.monotonic()
    answer = await svc.client.get("/metrics", headers=headers, timeout=DATABASE_ANSWER_SECONDS * 10)
    took = time.monotonic() - began
    assert took < DATABASE_ANSWER_SECONDS + SLACK, took
    assert answer.status_code == 200, answer.text
    assert Scrape(answer.text)("orchestra_database_up") == 0


async def test_a_scrape_with_a_key_answers_in_time_while_the_database_hangs(
    settings: Settings, start_service: StartService, cutter: CommitCutter, db_url: str
) -> None:
    """The key check of a scrape waited for the keys' read for the pool's minute (the copy
    is read again every 2 s): Prometheus saw the scrape time out, never ``database_up 0``."""
    tokens = await make_keys(db_url, "read")
    database = msgspec.structs.replace(settings.database, url=cutter.url)
    async with start_service(msgspec.structs.replace(settings, database=database)) as svc:
        keyed = {"Authorization": f"Bearer {tokens['read']}"}
        assert (await svc.client.get("/metrics", headers=keyed)).status_code == 200
        cutter.freeze()
        try:
            svc.app.runtime.gatekeeper.forget()  # the copy is stale: the next scrape reads it
            await _scrape_in_time(svc, keyed)
        finally:
            cutter.thaw()


async def test_a_scrape_on_loopback_with_no_keys_yet_answers_while_the_database_hangs(
    frozen: Service,
) -> None:
    """No key made yet (open on loopback): the scrape was a 503, the keys' copy unsure."""
    frozen.app.runtime.gatekeeper.forget()
    await _scrape_in_time(frozen, {})
