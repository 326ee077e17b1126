"""Fixtures build on each other: fake model server -> settings -> running service -> client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from sqlalchemy.engine import make_url

from orchestra.api.app import create_app
from orchestra.auth import Scope
from orchestra.config import (
    DEFAULT_PROVIDERS,
    CacheSettings,
    DatabaseSettings,
    FallbackSettings,
    LimitSettings,
    ProviderSettings,
    Settings,
    TemplateSettings,
    WorkerSettings,
)
from orchestra.db import Database
from orchestra.db.keys import KeyStore
from orchestra.db.schema import upgrade
from tests.fixtures.browser import browser  # noqa: F401  (the fixture, for the browser tests)
from tests.fixtures.fake_ollama import FakeOllama, running_fake_ollama
from tests.fixtures.migrated import copy_sqlite_file, migrate, migrated_sqlite_file
from tests.fixtures.ordering import longest_first
from tests.fixtures.postgres import ON_POSTGRESQL, PostgresServer, running_postgres
from tests.fixtures.servers import serve

#: The templates the service ships with.
BUILTINS = frozenset(
    {
        "summarize",
        "translate",
        "classify",
        "extract",
        "sentiment",
        "rewrite",
        "keywords",
        "qa",
        "summarize_long",
        "extract_schema",
        "classify_confidence",
        "qa_evidence",
        "code_review",
        "title",
        "compare",
        "translate_glossary",
    }
)


def sql_rows(db_url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows straight from the database, as a person with the sqlite3 shell (or psql) would
    read them; ``?`` marks a parameter on both engines."""
    if db_url.startswith("postgresql"):
        import psycopg

        from orchestra.db.postgres_engine import conninfo

        with psycopg.connect(conninfo(db_url)) as pg:
            cursor = pg.execute(sql.replace("%", "%%").replace("?", "%s"), params)  # type: ignore[arg-type]
            return [tuple(r) for r in cursor.fetchall()] if cursor.description else []
    import sqlite3

    with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]


def task_row(db_url: str, task_id: int, columns: str) -> tuple[Any, ...]:
    """Read a task's columns straight from the database, as a person with sqlite3 would."""
    rows = sql_rows(db_url, f"SELECT {columns} FROM tasks WHERE id = ?", (task_id,))
    assert rows, f"no task {task_id}"
    return rows[0]


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    async with running_fake_ollama() as fake:
        yield fake


def pytest_configure(config: pytest.Config) -> None:
    """Services started in a test log warnings and errors only, as a service that serves
    load is told to: rendering and capturing an info line per task event cost a third of the
    suite's CPU (every line went through structlog's console renderer, into pytest's capture,
    and to the xdist controller). A test that reads info events captures them itself
    (``structlog.testing.capture_logs`` after raising the level, or a service's log file)."""
    import logging

    import structlog

    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    logging.getLogger().setLevel(logging.WARNING)
    config.addinivalue_line(
        "markers",
        "empty_database: db_url is an empty database, not a copy of a migrated one (tests of "
        "migrating; tests/fixtures/migrated.py)",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection left (the modules of orchestra, its libraries and the tests),
    as ``orchestra serve`` freezes its heap once started (``api.server.freeze_heap``): a
    full garbage collection then walks only what tests make. In a test process it walked
    about 230,000 objects, up to 0.4 s on the loop of the test's own service and client
    (measured over five API test files: 20 full collections, 3.1 s in all; frozen, 1.7 s,
    at most 0.2 s each)."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_report_header() -> str:
    return f"database engine: {'PostgreSQL' if ON_POSTGRESQL else 'SQLite'}"


#: Markers of tests left out of the PostgreSQL run (see pytest_collection_modifyitems).
ENGINE_FREE = ("real_model", "browser")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (tests/fixtures/ordering.py): xdist hands out files in this
    order (``--dist loadfile --no-loadscope-reorder``), so a minute-long file starts early
    instead of running alone at the end.

    On PostgreSQL, run the tests that use a database (the ``db_url`` fixture, directly or
    through another): the others ran on SQLite already and touch no engine. Leave out too
    the tests of a real model (``real_model``: the model's runtime, its process and its
    crashes) and of the browser (``browser``: what Chromium does with the pages): they ran on
    SQLite, and the storage under them runs on PostgreSQL through the other tests (the
    dashboard's pages in test_dashboard*.py, retries and leases with the fake models). Skip
    the tests about SQLite itself (marked ``sqlite_only``)."""
    longest_first(items, config.rootpath, "postgresql" if ON_POSTGRESQL else "sqlite")
    if not ON_POSTGRESQL:
        return
    skip = pytest.mark.skip(reason="about SQLite itself (its file, writer or locks)")
    kept, dropped = [], []
    for item in items:
        if "db_url" not in getattr(item, "fixturenames", ()) or any(
            item.get_closest_marker(name) for name in ENGINE_FREE
        ):
            dropped.append(item)
            continue
        if item.get_closest_marker("sqlite_only"):
            item.add_marker(skip)
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer | None]:
    """The PostgreSQL server of this test process, when the suite runs on PostgreSQL."""
    if not ON_POSTGRESQL:
        yield None
        return
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def migrated_template(
    postgres: PostgresServer | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A database migrated to the latest schema once in this test process, which ``db_url``
    copies: a SQLite file's path, or a PostgreSQL database's name."""
    if postgres is None:
        yield str(migrated_sqlite_file(tmp_path_factory.mktemp("migrated")))
        return
    with postgres.database() as url:
        migrate(url)
        yield make_url(url).database or ""


@pytest.fixture
def db_url(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    postgres: PostgresServer | None,
    migrated_template: str,
) -> Iterator[str]:
    """The test's own database: a SQLite file, or a PostgreSQL database; migrated to the
    latest schema (a copy of ``migrated_template``), or empty for a test marked
    ``empty_database`` (one about migrating)."""
    empty = request.node.get_closest_marker("empty_database") is not None
    if postgres is None:
        path = tmp_path / "orchestra.db"
        if not empty:
            copy_sqlite_file(Path(migrated_template), path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    with postgres.database(template=None if empty else migrated_template) as url:
        yield url


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """The test's database, migrated to the latest schema (``db_url`` is, unless the test is
    marked ``empty_database``)."""
    database = Database(db_url)
    await upgrade(database)
    yield database
    await database.close()


async def make_keys(db_url: str, *scopes: Scope) -> dict[str, str]:
    """API keys named k-SCOPE in the database, before a service starts: {scope: token}."""
    database = Database(db_url)
    try:
        await upgrade(database)
        store = KeyStore(database)
        return {scope: (await store.create(f"k-{scope}", scope))[1] for scope in scopes}
    finally:
        await database.close()


async def revoke_key(db_url: str, name: str) -> None:
    """Revoke a key as `orchestra keys revoke` does, from outside the service."""
    database = Database(db_url)
    try:
        await KeyStore(database).revoke(name)
    finally:
        await database.close()


def make_settings(db_url: str, ollama_url: str, **workers: Any) -> Settings:
    """Settings for a test service: a tmp SQLite file, the fake model server, quick loops."""
    worker_settings = {
        "concurrency": 4,
        "poll_interval": 0.5,
        "reap_interval": 0.5,
        "shutdown_grace": 2.0,
        **workers,
    }
    return Settings(
        # No low-disk warning: /health's answer must not depend on the test machine's disk.
        database=DatabaseSettings(url=db_url, min_free_mb=0),
        workers=WorkerSettings(**worker_settings),
        providers={
            "ollama": ProviderSettings(kind="ollama", url=ollama_url, timeout=10),
            # Off unless a test turns it on: with it, a "default" task whose Ollama call
            # fails would fall back to a real model where one is installed.
            "embedded": msgspec.convert(
                {**DEFAULT_PROVIDERS["embedded"], "enabled": False}, ProviderSettings
            ),
        },
        templates=TemplateSettings(dirs=[]),
        # Off unless a test turns it on: most tests count what reaches the model, and the
        # built-in templates are deterministic (temperature 0).
        cache=CacheSettings(enabled=False),
        # A render process spawned while the machine is busy (the suite's heaviest files run
        # together first) took over 7 s to answer, and the default 5 s failed a test about
        # something else; the tests of the render timeout set their own.
        limits=LimitSettings(render_timeout=30.0),
        # Tests that stop a model server expect its calls to fail at once; the tests of the
        # wait set their own.
        fallback=FallbackSettings(outage_wait=0.0),
    )


@pytest.fixture
def settings(db_url: str, fake_ollama: FakeOllama) -> Settings:
    return make_settings(db_url, fake_ollama.url)


class Service:
    """A running Orchestra on a loopback port, with a client pointed at it."""

    def __init__(self, url: str, client: httpx.AsyncClient, app: Any) -> None:
        self.url = url
        self.client = client
        self.app = app

    async def submit(self, template: str, **params: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/api/v1/tasks", json={"template": template, "params": params}
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    #: How long ``wait`` waits by default, in seconds.
    wait_seconds = 20.0

    async def wait(self, task_id: int, seconds: float | None = None) -> dict[str, Any]:
        wait = self.wait_seconds if seconds is None else seconds
        response = await self.client.get(f"/api/v1/tasks/{task_id}", params={"wait": wait})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert body["status"] not in ("queued", "running"), f"task still {body['status']}"
        return body


StartService = Callable[..., Any]


@pytest.fixture
def start_service() -> StartService:
    """Start a service with given settings: ``async with start_service(settings) as svc``."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def start(settings: Settings, **kwargs: Any) -> AsyncIterator[Service]:
        app = create_app(settings, **kwargs)
        # Open connections (a browser's event streams) get 3 s once the test is done.
        async with (
            serve(app, timeout_graceful_shutdown=3) as url,
            httpx.AsyncClient(base_url=url, timeout=60) as client,
        ):
            yield Service(url, client, app)

    return start


@pytest.fixture
async def service(settings: Settings, start_service: StartService) -> AsyncIterator[Service]:
    async with start_service(settings) as svc:
        yield svc


def with_provider(settings: Settings, name: str, **changes: Any) -> Settings:
    """The same settings with [providers.NAME] changed, or added (give ``kind``)."""
    providers = dict(settings.providers)
    old = providers.get(name)
    providers[name] = (
        msgspec.structs.replace(old, **changes) if old else ProviderSettings(**changes)
    )
    return msgspec.structs.replace(settings, providers=providers)


def with_workers(settings: Settings, **changes: Any) -> Settings:
    """The same settings with some [workers] values changed."""
    return msgspec.structs.replace(
        settings, workers=msgspec.structs.replace(settings.workers, **changes)
    )


def rows_by_status(**given: int) -> dict[str, int]:
    """A batch's counts: every task status (0 unless given), then invalid and deleted."""
    statuses = ["queued", "running", "succeeded", "failed", "cancelled", "invalid", "deleted"]
    return {status: given.get(status, 0) for status in statuses}
