"""Fixtures build on each other: fake model server -> settings -> running service -> client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from orchestra.api.app import create_app
from orchestra.auth import Scope
from orchestra.config import (
    DEFAULT_PROVIDERS,
    DatabaseSettings,
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


def task_row(db_url: str, task_id: int, columns: str) -> tuple[Any, ...]:
    """Read a task's columns straight from the SQLite file, as a person with sqlite3 would."""
    import sqlite3

    with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
        row = conn.execute(f"SELECT {columns} FROM tasks WHERE id = ?", (task_id,)).fetchone()
    assert row is not None, f"no task {task_id}"
    return tuple(row)


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    async with running_fake_ollama() as fake:
        yield fake


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'orchestra.db'}"


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """The test's database file, migrated to the latest schema."""
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
