"""A delivery's ``webhook-id`` is its own across databases: two services (or one restored
from a backup) number their deliveries from the same start, and a receiver that drops
repeats by ``webhook-id``, as docs/webhooks.md tells it to, dropped the second service's
events as repeats of the first's (``msg_orchestra_1`` from both)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from sqlalchemy import make_url

from tests.conftest import Service, StartService, make_settings
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.migrated import copy_sqlite_file
from tests.fixtures.postgres import PostgresServer
from tests.fixtures.servers import wait_until
from tests.fixtures.webhook_receiver import Receiver
from tests.integration.test_webhooks import QUICK, subscribe, with_webhooks
from tests.integration.test_webhooks import receiver as receiver


@pytest.fixture
def second_db_url(
    tmp_path: Path, postgres: PostgresServer | None, migrated_template: str
) -> Iterator[str]:
    """A second database, migrated (as the test's own ``db_url``)."""
    if postgres is None:
        path = tmp_path / "second.db"
        copy_sqlite_file(Path(migrated_template), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    with postgres.database(template=migrated_template) as url:
        yield url


@pytest.fixture
async def two_services(
    db_url: str, second_db_url: str, fake_ollama: FakeOllama, start_service: StartService
) -> AsyncIterator[tuple[Service, Service]]:
    async with AsyncExitStack() as stack:
        services = [
            await stack.enter_async_context(
                start_service(
                    with_webhooks(make_settings(url, fake_ollama.url), allow_private=True, **QUICK)
                )
            )
            for url in (db_url, second_db_url)
        ]
        assert make_url(db_url) != make_url(second_db_url)
        yield services[0], services[1]


async def test_deliveries_of_two_databases_have_ids_of_their_own(
    two_services: tuple[Service, Service], receiver: Receiver
) -> None:
    for path, svc in zip(("/a", "/b"), two_services, strict=True):  # each its own secret
        await subscribe(svc, receiver, path, event_types=["task.finished"])
        await svc.submit("summarize", text="One event each.")
    await wait_until(lambda: len(receiver.received) == 2, timeout=30)
    ids = [r.message_id for r in receiver.received]
    assert len(set(ids)) == 2, ids
    for svc in two_services:  # each database's first delivery
        [hook] = (await svc.client.get("/api/v1/webhooks")).json()["items"]
        page = (await svc.client.get(f"/api/v1/webhooks/{hook['id']}/deliveries")).json()
        [delivery] = page["items"]
        assert delivery["id"] == 1
        digits = "".join(c for c in delivery["created_at"] if c.isdigit())
        assert delivery["message_id"] == f"msg_orchestra_1_{digits}"
        assert delivery["message_id"] in ids
