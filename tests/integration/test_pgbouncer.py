"""Behind pgbouncer in transaction mode (before 1.21: Debian 12's 1.18), each transaction may
run on another server connection, so psycopg's prepared statements (kept per server
connection) fail at random unless ``[database] prepared_statements = false``; and
notifications never arrive, so workers find tasks by their poll."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import msgspec
import pytest

from orchestra.config import Settings
from tests.conftest import StartService
from tests.fixtures.pgbouncer import binary, transaction_pooler
from tests.fixtures.postgres import ON_POSTGRESQL, PostgresServer

pytestmark = [
    pytest.mark.skipif(not ON_POSTGRESQL, reason="pgbouncer pools PostgreSQL's connections"),
    pytest.mark.skipif(binary() is None, reason="pgbouncer is not installed"),
]


@pytest.fixture
def pooled_url(postgres: PostgresServer, db_url: str) -> Iterator[str]:
    with transaction_pooler(postgres, db_url) as url:
        yield url


@pytest.mark.empty_database
async def test_without_prepared_statements_the_service_runs_behind_transaction_pooling(
    settings: Settings, start_service: StartService, pooled_url: str
) -> None:
    """Migrated, then 60 tasks submitted and read back at once, through four server
    connections shared transaction by transaction: none fails. With prepared statements on,
    the same run failed statements ("prepared statement "_pg3_3" already exists")."""
    database = msgspec.structs.replace(settings.database, url=pooled_url, prepared_statements=False)
    pooled = msgspec.structs.replace(settings, database=database)
    async with start_service(pooled) as svc:
        submitted = await asyncio.gather(
            *(svc.submit("summarize", text=f"text {n}") for n in range(60))
        )
        done = await asyncio.gather(*(svc.wait(task["id"], seconds=60) for task in submitted))
        assert [task["status"] for task in done] == ["succeeded"] * 60
        listed = await svc.client.get("/api/v1/tasks", params={"limit": 100})
        assert listed.status_code == 200 and len(listed.json()["items"]) == 60


async def test_with_prepared_statements_a_lost_one_answers_503_naming_the_setting(
    settings: Settings, start_service: StartService, pooled_url: str
) -> None:
    """Left on behind the same pooler, statements fail; each failure is a 503 that says what
    to set, never a 500."""
    pooled = msgspec.structs.replace(
        settings, database=msgspec.structs.replace(settings.database, url=pooled_url)
    )
    body = {"template": "summarize", "params": {"text": "t"}}
    async with start_service(pooled) as svc:
        refused: list[httpx.Response] = []
        for _ in range(20):  # until a statement was lost (in the first round, as measured)
            answers = await asyncio.gather(
                *(svc.client.post("/api/v1/tasks", json=body) for _ in range(20))
            )
            refused += [a for a in answers if a.status_code != 201]
            if refused:
                break
        assert refused, "pgbouncer 1.18 in transaction mode lost no prepared statement"
        for answer in refused:
            assert answer.status_code == 503, answer.text
            assert "prepared_statements = false" in answer.json()["message"]
