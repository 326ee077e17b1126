"""PostgreSQL sessions the service opens: one opened under a database's read-only default is
not kept after that default is reset, and a URL that names several hosts serves the LISTEN
connection as well as the pools."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from sqlalchemy.engine import make_url

from orchestra.config import Settings
from orchestra.db.postgres_engine import conninfo
from tests.conftest import StartService, sql_rows
from tests.fixtures.postgres import ON_POSTGRESQL, PostgresServer
from tests.fixtures.servers import wait_until

pytestmark = pytest.mark.skipif(not ON_POSTGRESQL, reason="PostgreSQL's sessions")

BODY = {"template": "summarize", "params": {"text": "a short text"}}


def as_admin(db_url: str, sql: str) -> None:
    """``sql`` from a session that is never read-only, whatever the database's default (as
    ``PGOPTIONS="-c default_transaction_read_only=off" psql``)."""
    with psycopg.connect(
        conninfo(db_url), autocommit=True, options="-c default_transaction_read_only=off"
    ) as pg:
        pg.execute(sql)  # type: ignore[arg-type]


def writable(scraped: str) -> float:
    [line] = [s for s in scraped.splitlines() if s.startswith("orchestra_database_writable ")]
    return float(line.split()[1])


@pytest.mark.timeout(90)
async def test_the_service_writes_again_once_a_databases_read_only_default_is_reset(
    settings: Settings, start_service: StartService, db_url: str
) -> None:
    """``ALTER DATABASE … SET default_transaction_read_only = on`` reaches the sessions
    opened after it, and they keep it for their life: after the RESET every submit still
    answered 503 "read-only", /health stayed degraded and the gauge 0 until a restart."""
    name = make_url(db_url).database
    async with start_service(settings) as svc:
        assert (await svc.client.post("/api/v1/tasks", json=BODY)).status_code == 201
        as_admin(db_url, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        sql_rows(
            db_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        refused: dict[str, Any] = {}

        async def read_only() -> bool:
            answer = await svc.client.post("/api/v1/tasks", json=BODY)
            refused.update(answer.json())
            return answer.status_code == 503 and "read-only" in answer.text

        await wait_until(read_only, timeout=20, interval=0.1)
        assert refused["code"] == "storage_unavailable", refused

        async def degraded() -> bool:  # a probe on a connection just cut may say "down"
            during = (await svc.client.get("/health")).json()
            return during["status"] == "degraded" and "cannot write" in during["database"]

        await wait_until(degraded, timeout=10, interval=0.2)
        assert writable((await svc.client.get("/metrics")).text) == 0

        as_admin(db_url, f'ALTER DATABASE "{name}" RESET default_transaction_read_only')

        async def accepted() -> bool:
            answer = await svc.client.post("/api/v1/tasks", json=BODY)
            return answer.status_code == 201

        await wait_until(accepted, timeout=20, interval=0.2)
        task = (await svc.client.post("/api/v1/tasks", json=BODY)).json()
        assert "id" in task, task
        assert (await svc.wait(task["id"]))["status"] == "succeeded"
        after = (await svc.client.get("/health")).json()
        assert after["status"] == "ok" and after["database"] == "ok", after
        assert writable((await svc.client.get("/metrics")).text) == 1


async def test_a_url_naming_two_hosts_gets_wake_ups_across_processes(
    settings: Settings,
    start_service: StartService,
    db_url: str,
    postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    """SQLAlchemy's multi-host form (``?host=h1:p1&host=h2:p2``), the first host one where no
    server listens: the pools connect to the second, and so must the LISTEN connection (it
    failed for ever, "failed to resolve host", and other processes' submits waited on the
    poll). The worker process polls every 30 s: only a wake-up runs the task sooner."""
    name = make_url(db_url).database
    dead = tmp_path / "no-server-here"
    dead.mkdir()
    two_hosts = (
        f"postgresql+psycopg://postgres@/{name}?host={dead}:{postgres.port}"
        f"&host={postgres.folder}:{postgres.port}&target_session_attrs=read-write"
    )
    database = msgspec.structs.replace(settings.database, url=two_hosts)
    workers = msgspec.structs.replace(
        settings,
        database=database,
        workers=msgspec.structs.replace(settings.workers, poll_interval=30.0),
    )
    api_only = msgspec.structs.replace(
        settings,
        database=database,
        server=msgspec.structs.replace(settings.server, workers=False),
    )
    async with start_service(workers) as worker, start_service(api_only) as api:
        await wait_until(lambda: worker.app.runtime.db.listening, timeout=10)
        started = time.monotonic()
        task = await api.submit("summarize", text="woken")
        done = await api.wait(task["id"])
        assert done["status"] == "succeeded", done
        assert time.monotonic() - started < 15  # woken, not its 30 s poll


def gauge(scraped: str, name: str) -> float | None:
    found = [s for s in scraped.splitlines() if s.startswith(f"{name} ")]
    return float(found[0].split()[1]) if found else None


async def test_a_scrape_says_whether_the_listener_is_up(
    settings: Settings, start_service: StartService, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing showed that the LISTEN connection could not connect (a URL libpq read wrong):
    /health said ok and wake-ups came at the poll interval. With its LISTEN connection cut
    and its retry 30 s away, the scrape says 0 until it listens again."""
    from orchestra.db import postgres_engine

    monkeypatch.setattr(postgres_engine, "LISTEN_RETRY", 30.0)
    async with start_service(settings) as svc:
        db = svc.app.runtime.db
        await wait_until(lambda: db.listening, timeout=10)
        assert gauge((await svc.client.get("/metrics")).text, "orchestra_database_listening") == 1
        sql_rows(
            db_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
        )

        async def down() -> bool:
            scraped = (await svc.client.get("/metrics")).text
            return gauge(scraped, "orchestra_database_listening") == 0

        await wait_until(down, timeout=10, interval=0.1)
