"""/health answers from cached checks (issue 17): probes in a row share one database check,
``?check=now`` checks at once, and a database that stops answering still shows within seconds.

Writes failing shows at once (tests/integration/test_storage_failures.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from orchestra.api.health import DATABASE_CHECK_SECONDS
from orchestra.db.failures import DatabaseState
from orchestra.errors import StorageUnavailable
from orchestra.llm.router import ASKED_CHECK_SECONDS
from tests.conftest import Service
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.servers import wait_until


def count_checks(service: Service) -> list[float]:
    """Count the database checks /health makes from now on (one entry per check)."""
    db = service.app.runtime.db
    state = db.state
    checks: list[float] = []

    async def counting(min_free_mb: float) -> DatabaseState:
        checks.append(asyncio.get_running_loop().time())
        result: DatabaseState = await state(min_free_mb)
        return result

    db.state = counting
    return checks


async def test_probes_in_a_row_share_one_database_check(
    service: Service, fake_ollama: FakeOllama
) -> None:
    checks = count_checks(service)
    listings = fake_ollama.listings
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(30):
        response = await service.client.get("/health")
        assert response.status_code == 200 and response.json()["status"] == "ok"
    elapsed = loop.time() - started
    # At most one check per DATABASE_CHECK_SECONDS (however slow the machine is), not 30.
    assert len(checks) <= elapsed / DATABASE_CHECK_SECONDS + 1
    assert fake_ollama.listings == listings  # the providers as the watcher last saw them

    before = len(checks)
    now = await service.client.get("/health", params={"check": "now"})
    assert now.status_code == 200
    assert len(checks) == before + 1 and fake_ollama.listings == listings + 1


async def test_checks_asked_for_in_a_loop_reach_the_model_servers_once_a_second(
    service: Service, fake_ollama: FakeOllama
) -> None:
    """A read key could make the service check every model server per request: 40 asked
    for at once and in a row cost the fake model 40 listings; now they share one a second."""
    listings = fake_ollama.listings
    loop = asyncio.get_running_loop()
    started = loop.time()
    now = {"check": "now"}
    together = await asyncio.gather(*(service.client.get("/health", params=now) for _ in range(20)))
    in_a_row = [await service.client.get("/health", params=now) for _ in range(20)]
    elapsed = loop.time() - started
    assert all(a.status_code == 200 for a in together + in_a_row)
    # One per ASKED_CHECK_SECONDS however slow the machine, and perhaps the watcher's own.
    assert fake_ollama.listings - listings <= elapsed / ASKED_CHECK_SECONDS + 2
    # A second later, asking checks again.
    before = fake_ollama.listings

    async def checked_again() -> bool:
        await service.client.get("/health", params=now)
        return fake_ollama.listings > before

    await wait_until(checked_again, timeout=ASKED_CHECK_SECONDS + 5, interval=0.1)


async def test_a_database_that_stops_answering_is_reported_down_within_seconds(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = service.app.runtime.db
    assert (await service.client.get("/health")).status_code == 200

    async def refused(*_args: Any) -> None:
        raise StorageUnavailable("the database (orchestra.db) cannot be used: an I/O error")

    monkeypatch.setattr(db, "ping", refused)
    down: dict[str, Any] = {}

    async def reported() -> bool:
        response = await service.client.get("/health")
        down.update(response.json())
        return response.status_code == 503

    await wait_until(reported, timeout=DATABASE_CHECK_SECONDS + 5, interval=0.05)
    assert down["status"] == "down" and down["database"].startswith("error: ")
    # Uptime monitors that ask with HEAD get the same status, without a body.
    headed = await service.client.head("/health")
    assert headed.status_code == 503 and headed.content == b""
    # A liveness probe's question is whether the process answers: yes, saying the state.
    live = await service.client.get("/health", params={"probe": "live"})
    assert live.status_code == 200 and live.json()["status"] == "down"

    monkeypatch.undo()

    async def recovered() -> bool:
        return (await service.client.get("/health")).status_code == 200

    await wait_until(recovered, timeout=DATABASE_CHECK_SECONDS + 5, interval=0.05)
    assert (await service.client.head("/api/v1/health")).status_code == 200
