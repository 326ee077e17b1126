"""Databases of older releases opened by this one: stored templates its checks refuse, the
migration's log, and the write-ahead log it leaves."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path

import pytest

from orchestra.config import Settings
from orchestra.db import Database, TaskStore
from orchestra.db.schema import LATEST, upgrade
from orchestra.db.templates import TemplateStore
from orchestra.domain import NewTask
from tests.conftest import StartService, sql_rows
from tests.fixtures.logs import captured, events
from tests.fixtures.migrated import stop_at

#: A version an older release registered, which this one refuses (a negative min_length).
NEGMIN = """\
name: negmin
model: llama3.2
parameters:
  who: {type: string, min_length: -1}
steps:
  - id: hello
    prompt: "Hi {{ params.who }}"
"""


async def _stored_by_an_older_release(db_url: str, tasks: int) -> list[int]:
    """NEGMIN stored as version 1 as an older release wrote it (no checks), and ``tasks``
    tasks queued with it; returns their ids."""
    db = Database(db_url)
    try:
        await upgrade(db)
        digest = hashlib.sha256(NEGMIN.encode()).hexdigest()
        await TemplateStore(db).register("negmin", NEGMIN, digest)
        store = TaskStore(db)
        new = NewTask(template="negmin", template_version=1, params={"who": "Ada"})
        return [(await store.enqueue(new)).task.id for _ in range(tasks)]
    finally:
        await db.close()


async def test_a_stored_version_the_checks_refuse_is_logged_once_and_its_tasks_say_why(
    db_url: str, settings: Settings, start_service: StartService
) -> None:
    """It was logged at error and parsed again at every refresh (every 2 s, and once per task
    of it), its tasks failed with "no longer available", and nothing in the API could delete
    it."""
    ids = await _stored_by_an_older_release(db_url, tasks=3)
    with captured() as logged:
        async with start_service(settings) as svc:
            for task_id in ids:
                done = await svc.wait(task_id)
                assert done["status"] == "failed", done
                said = done["error"]["message"]
                assert "version 1 is stored but no longer valid" in said, said
                assert "min_length must be 0 or more" in said, said
            for _ in range(3):  # as follow() does every 2 s
                await svc.app.runtime.catalog.refresh()
            [refused] = events(logged, "templates.registered_invalid")
            assert (refused["log_level"], refused["version"]) == ("error", 1), refused
            shown = await svc.client.get("/api/v1/templates/negmin")
            assert shown.status_code == 404
            assert "no longer valid" in shown.json()["message"], shown.json()
            assert (await svc.client.delete("/api/v1/templates/negmin")).status_code == 204
            assert (await svc.client.delete("/api/v1/templates/negmin")).status_code == 404
    live = "SELECT count(*) FROM templates WHERE name = 'negmin' AND deleted_at IS NULL"
    assert sql_rows(db_url, live) == [(0,)]
    with captured() as logged:
        async with start_service(settings):
            pass
    # Deleted: nothing left to act on, so no error at the next start.
    [again] = events(logged, "templates.registered_invalid")
    assert again["log_level"] == "info" and again["deleted"] is True, again


@pytest.mark.empty_database
async def test_a_migration_is_logged_when_it_starts_and_ends(db_url: str) -> None:
    old = Database(db_url)
    try:
        await old.transaction(lambda conn: stop_at(conn, 12))
    finally:
        await old.close()
    db = Database(db_url)
    try:
        with captured(logging.INFO) as logged:
            await upgrade(db)
            await upgrade(db)  # nothing to do: nothing said
    finally:
        await db.close()
    [began] = events(logged, "database.migrating")
    assert (began["from_version"], began["to_version"]) == (12, LATEST), began
    [ended] = events(logged, "database.migrated")
    assert (ended["from_version"], ended["to_version"]) == (12, LATEST), ended
    assert ended["duration_ms"] >= 0 and ended["log_level"] == "info", ended


@pytest.mark.sqlite_only
@pytest.mark.empty_database
async def test_the_write_ahead_log_of_a_migration_is_emptied_at_once(
    db_url: str, tmp_path: Path
) -> None:
    """It stayed as large as the migration's writes (510 MB for a 293 MB database) until the
    next write, and ``database.log_growing`` blamed readers meanwhile."""
    old = Database(db_url)
    try:
        await old.transaction(lambda conn: stop_at(conn, 1))
    finally:
        await old.close()
    wal = tmp_path / "orchestra.db-wal"
    db = Database(db_url)
    try:
        await upgrade(db)
        assert wal.stat().st_size == 0  # while the service's connections are open
    finally:
        await db.close()


@pytest.mark.sqlite_only
@pytest.mark.empty_database
async def test_a_reader_holding_the_log_after_a_migration_is_said_and_the_start_goes_on(
    db_url: str, tmp_path: Path
) -> None:
    old = Database(db_url)
    try:
        await old.transaction(lambda conn: stop_at(conn, 1))
    finally:
        await old.close()
    reader = sqlite3.connect(tmp_path / "orchestra.db")  # another program's, in a transaction
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM schema_version").fetchall()
        db = Database(db_url)
        try:
            with captured(logging.INFO) as logged:
                assert await upgrade(db) == LATEST
        finally:
            await db.close()
    finally:
        reader.close()
    [held] = events(logged, "database.log_not_emptied")
    assert held["log_level"] == "info" and "a reader holds" in held["error"], held
