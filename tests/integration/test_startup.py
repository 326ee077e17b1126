"""Startup: the lifespan upgrades the database and loads the templates once, fails cleanly, and
file template versions pinned by queued tasks survive a change of the file and a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import msgspec
import pytest

from orchestra.config import Settings, TemplateSettings
from orchestra.db import Database, TaskStore
from orchestra.db.schema import LATEST, upgrade
from orchestra.db.templates import StoredFileVersion, TemplateStore
from orchestra.domain import NewTask
from orchestra.errors import ConfigError
from tests.conftest import StartService, sql_rows
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.migrated import stop_at
from tests.fixtures.servers import free_port, start_process, write_config

V1 = """\
name: greet
version: 1
model: llama3.2
parameters:
  who: {type: string, required: true}
steps:
  - id: hello
    prompt: "Say hello to {{ params.who }}"
"""
V2 = V1.replace("version: 1", "version: 2").replace("Say hello to", "Say goodbye to")


def _events(log: Path) -> list[dict[str, object]]:
    lines = log.read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.empty_database
async def test_serve_upgrades_the_database_and_loads_the_templates_once(
    fake_ollama: FakeOllama, tmp_path: Path, db_url: str
) -> None:
    config = tmp_path / "o.toml"
    port = free_port()
    write_config(config, port=port, db=db_url, ollama_url=fake_ollama.url)
    proc = await start_process(config)
    try:
        events = _events(config.with_suffix(".log"))
        names = [e.get("event") for e in events]
        assert names.count("database.ready") == 1
        # Where it listens, said once (uvicorn says it only for sockets it bound itself).
        listening = [e for e in events if e.get("event") == "server.listening"]
        assert [e["urls"] for e in listening] == [[f"http://127.0.0.1:{port}"]], listening
        assert names.count("templates.loaded") == 1
        # Once started, what it holds is frozen: a full garbage collection no longer walks
        # it on the event loop (it held the loop for 100 ms and more).
        frozen = [e for e in events if e.get("event") == "service.heap_frozen"]
        assert len(frozen) == 1 and frozen[0]["objects"] > 10_000, frozen
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), timeout=30)


async def _serve_fails(config: Path, **env: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestra",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    finally:
        if proc.returncode is None:  # it served instead: not left running past the test
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, err.decode()
    text = err.decode()
    assert "Traceback" not in text
    return text


async def test_serve_with_a_proxy_it_cannot_use_fails_in_one_clean_message(
    tmp_path: Path, db_url: str
) -> None:
    """As any setting that cannot work: exit 1 and one line (it was a traceback, exit 3)."""
    config = tmp_path / "o.toml"
    config.write_text(f'[server]\nport = {free_port()}\n[database]\nurl = "{db_url}"\n')
    err = await _serve_fails(config, ALL_PROXY="ftp://user:pw@proxy.example:21")
    assert "Error: the proxy ftp://***@proxy.example:21 named in the environment" in err, err
    assert "pw@" not in err


async def test_serve_with_an_invalid_template_fails_in_one_clean_message(
    tmp_path: Path, db_url: str
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "broken.yaml").write_text("name: broken\nsteps: nope\n")
    config = tmp_path / "o.toml"
    config.write_text(
        f'[server]\nport = {free_port()}\n[database]\nurl = "{db_url}"\n'
        f'[templates]\ndirs = ["{folder}"]\n'
    )
    err = await _serve_fails(config)
    assert "Error: invalid templates:" in err and "broken.yaml" in err and "steps" in err
    assert "Application startup failed" not in err


async def test_serve_with_an_unsupported_database_url_fails_in_one_clean_line(
    tmp_path: Path,
) -> None:
    config = tmp_path / "o.toml"
    config.write_text(f'[server]\nport = {free_port()}\n[database]\nurl = "mysql://x/y"\n')
    err = await _serve_fails(config)
    assert f"Error: {config}: database.url: 'mysql' is not supported; use sqlite+aio" in err
    # Checked before anything starts: no server process, no lifespan.
    assert "Started server process" not in err and "startup" not in err


async def test_a_database_url_that_cannot_be_read_is_refused_without_its_password(
    tmp_path: Path,
) -> None:
    """A password not percent-encoded (a Kubernetes Secret's) made the URL unreadable, and
    the refusal printed it whole, into the pod's log (helper-127)."""
    config = tmp_path / "o.toml"
    url = "postgresql+psycopg://orchestra:p@ss:w/rd%x@127.0.0.1:5/race"
    config.write_text(f'[server]\nport = {free_port()}\n[database]\nurl = "{url}"\n')
    err = await _serve_fails(config)
    assert "database.url: postgresql+psycopg://… (not shown" in err, err
    assert "percent-encode" in err and "p@ss" not in err and "rd%x" not in err, err


async def test_serve_with_a_file_where_the_databases_folder_goes_says_so(
    tmp_path: Path,
) -> None:
    (tmp_path / "afile").write_text("")
    config = tmp_path / "o.toml"
    url = f"sqlite+aiosqlite:///{tmp_path}/afile/orch.db"
    config.write_text(f'[server]\nport = {free_port()}\n[database]\nurl = "{url}"\n')
    err = await _serve_fails(config)
    assert f"cannot open {url}: {tmp_path}/afile is a file, not a folder" in err, err


@pytest.mark.parametrize(
    ("key", "variable", "value", "said"),
    [
        ("ui.path", "ORCHESTRA_UI__PATH", "/", "needs a path of its own"),
        # /api: the API's key check skips the dashboard's paths, so it checked no request.
        ("ui.path", "ORCHESTRA_UI__PATH", "/api", "/api is the API's; the dashboard needs"),
        ("ui.path", "ORCHESTRA_UI__PATH", "/metrics/ui", "/metrics is Prometheus's; the"),
        (
            "server.root_path",
            "ORCHESTRA_SERVER__ROOT_PATH",
            "nested",
            "'nested' is not a path such as /orchestra",
        ),
        (
            "database.url",
            "ORCHESTRA_DATABASE__URL",
            "sqlite+aiosqlite:///:memory:",
            "an in-memory database loses every task",
        ),
    ],
)
async def test_a_setting_checked_at_serve_names_where_it_was_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, variable: str, value: str, said: str
) -> None:
    config = tmp_path / "o.toml"
    config.write_text(f'server.port = {free_port()}\n{key} = "{value}"\n')
    err = await _serve_fails(config)
    assert f"Error: {config}: {key}: " in err and said in err, err
    # The same value from the environment names the variable, not the file.
    config.write_text(f"server.port = {free_port()}\n")
    monkeypatch.setenv(variable, value)
    err = await _serve_fails(config)
    assert f"Error: {variable} (environment): {key}: " in err and said in err, err


async def test_a_template_folder_that_does_not_exist_stops_serve_in_one_line_naming_its_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was "invalid templates:" and the folder on a second line, after the server process
    had started (uvicorn's lines first), and naming no settings file."""
    config = tmp_path / "o.toml"
    config.write_text(f'server.port = {free_port()}\ntemplates.dirs = ["./my-templates"]\n')
    monkeypatch.chdir(tmp_path)
    err = await _serve_fails(config)
    said = f"Error: {config}: templates.dirs: ./my-templates is not a folder (from {tmp_path})"
    assert err.strip() == said, err
    config.write_text(f"server.port = {free_port()}\n")
    monkeypatch.setenv("ORCHESTRA_TEMPLATES__DIRS", f'["{tmp_path}/gone"]')
    err = await _serve_fails(config)
    said = f"Error: ORCHESTRA_TEMPLATES__DIRS (environment): templates.dirs: {tmp_path}/gone is"
    assert err.strip() == said + " not a folder", err


@pytest.fixture
def greet(settings: Settings, tmp_path: Path) -> tuple[Path, Settings]:
    """A template folder holding greet v1, and the settings that read it."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "greet.yaml").write_text(V1)
    return folder, msgspec.structs.replace(settings, templates=TemplateSettings(dirs=[str(folder)]))


async def test_a_queued_task_runs_its_file_version_after_the_file_changed_and_a_restart(
    settings: Settings,
    start_service: StartService,
    fake_ollama: FakeOllama,
    greet: tuple[Path, Settings],
) -> None:
    folder, with_dir = greet
    body = {"template": "greet", "params": {"who": "Ada"}, "delay": 3600}
    async with start_service(with_dir) as svc:
        queued = [(await svc.client.post("/api/v1/tasks", json=body)).json() for _ in range(2)]
    assert [t["status"] for t in queued] == ["queued", "queued"]
    url = settings.database.url
    stored = sql_rows(url, "SELECT version FROM file_template_versions WHERE name = 'greet'")
    assert stored == [(1,)]  # once, however many tasks pinned it
    # Due now: the restarted service runs them (the delay kept the first one from it).
    sql_rows(url, "UPDATE tasks SET run_at = '2000-01-01T00:00:00.000000Z'")

    (folder / "greet.yaml").write_text(V2)
    async with start_service(with_dir) as svc:
        done = [await svc.wait(t["id"]) for t in queued]
        assert [(d["status"], d["template_version"]) for d in done] == [("succeeded", 1)] * 2
        fresh = await svc.wait((await svc.submit("greet", who="Bo"))["id"])
        assert (fresh["status"], fresh["template_version"]) == ("succeeded", 2)
    prompts = sorted(r["messages"][-1]["content"] for r in fake_ollama.requests)
    assert prompts == ["Say goodbye to Bo", "Say hello to Ada", "Say hello to Ada"]


async def test_a_new_task_gets_the_current_file_version_only(
    start_service: StartService, greet: tuple[Path, Settings]
) -> None:
    """A stored version runs the tasks that pinned it; new tasks cannot ask for it."""
    folder, with_dir = greet
    async with start_service(with_dir) as svc:
        assert (await svc.wait((await svc.submit("greet", who="Ada"))["id"]))["status"] == (
            "succeeded"
        )
    (folder / "greet.yaml").write_text(V2)
    async with start_service(with_dir) as svc:
        asked = await svc.client.post(
            "/api/v1/tasks",
            json={"template": "greet", "template_version": 1, "params": {"who": "x"}},
        )
        assert asked.status_code == 404
        assert "version 1 is not available" in asked.json()["message"]


async def test_a_version_loaded_by_a_reload_is_stored_when_a_task_is_queued_with_it(
    settings: Settings,
    start_service: StartService,
    fake_ollama: FakeOllama,
    greet: tuple[Path, Settings],
) -> None:
    folder, with_dir = greet
    async with start_service(with_dir) as svc:
        (folder / "greet.yaml").write_text(V2)
        assert (await svc.client.post("/api/v1/templates/reload")).status_code == 200
        body = {"template": "greet", "params": {"who": "Ada"}, "delay": 3600}
        queued = (await svc.client.post("/api/v1/tasks", json=body)).json()
    assert (queued["status"], queued["template_version"]) == ("queued", 2)
    sql_rows(settings.database.url, "UPDATE tasks SET run_at = '2000-01-01T00:00:00.000000Z'")

    v3 = V2.replace("version: 2", "version: 3").replace("goodbye", "farewell")
    (folder / "greet.yaml").write_text(v3)
    async with start_service(with_dir) as svc:
        done = await svc.wait(queued["id"])
        assert (done["status"], done["template_version"]) == ("succeeded", 2)
    assert [r["messages"][-1]["content"] for r in fake_ollama.requests] == ["Say goodbye to Ada"]


async def test_a_file_changed_back_to_an_earlier_body_is_the_latest_again(db: Database) -> None:
    # One version, three bodies in turn (the file edited without a new `version:`): the body
    # stored last is the one a queued task gets after a restart, even when it was seen before.
    store = TemplateStore(db)
    await TaskStore(db).enqueue(NewTask(template="t", template_version=1, params={}))

    def body(text: str) -> StoredFileVersion:
        return StoredFileVersion("t", 1, text, text, "file")

    for text in ("A", "B", "A"):
        await store.keep_file_versions([body(text)])
    assert [v.body for v in await store.pinned_file_versions()][0] == "A"


@pytest.mark.empty_database
async def test_serve_on_a_database_holding_a_table_named_as_orchestras_fails_cleanly(
    tmp_path: Path, db_url: str
) -> None:
    """Another program's ``tasks`` table: a one-line refusal naming it, not the traceback of
    ``table tasks already exists``; and nothing of Orchestra's is left behind."""
    sql_rows(db_url, "CREATE TABLE tasks (id INTEGER PRIMARY KEY, name TEXT)")
    config = tmp_path / "o.toml"
    config.write_text(f'[server]\nport = {free_port()}\n[database]\nurl = "{db_url}"\n')
    err = await _serve_fails(config)
    assert "Error: " in err and "(tasks)" in err and "of its own" in err, err
    assert "Application startup failed" not in err
    assert sql_rows(db_url, "SELECT count(*) FROM tasks") == [(0,)]  # theirs, untouched


@pytest.mark.empty_database
async def test_a_migration_that_fails_is_one_clean_line_and_leaves_the_database_as_it_was(
    tmp_path: Path, db_url: str
) -> None:
    """A database at version 12 that already holds a table migration 13 makes (someone's
    own ``model_cache``): the start said ``table model_cache already exists`` in a logged
    traceback and exit 3; now one line naming the migration, exit 1."""
    old = Database(db_url)
    try:
        await old.transaction(lambda conn: stop_at(conn, 12))
    finally:
        await old.close()
    sql_rows(db_url, "CREATE TABLE model_cache (x INTEGER)")
    config = tmp_path / "o.toml"
    config.write_text(f'[server]\nport = {free_port()}\n[database]\nurl = "{db_url}"\n')
    err = await _serve_fails(config)
    assert "Error: " in err and "schema version 13" in err and "model_cache" in err, err
    assert "still at schema version 12" in err, err
    assert "Application startup failed" not in err
    assert sql_rows(db_url, "SELECT max(version) FROM schema_version") == [(12,)]


@pytest.mark.empty_database
async def test_a_schema_version_table_of_another_program_is_said_so(db_url: str) -> None:
    """Its version could not be read: it was "the migration to schema version 0 failed"
    (review)."""
    sql_rows(db_url, "CREATE TABLE schema_version (v TEXT)")
    database = Database(db_url)
    try:
        with pytest.raises(ConfigError, match="cannot read the schema version") as info:
            await upgrade(database)
    finally:
        await database.close()
    assert "migration to" not in info.value.message


@pytest.mark.empty_database
async def test_a_first_migration_refuses_a_sqlite_file_of_another_program(
    tmp_path: Path, db_url: str
) -> None:
    """A SQLite file is Orchestra's alone: another program's tables, even with names of their
    own, are not mixed with Orchestra's. (PostgreSQL, whose database others may share, minds
    only a clash of names.)"""
    sql_rows(db_url, "CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    database = Database(db_url)
    try:
        if db_url.startswith("sqlite"):
            with pytest.raises(ConfigError, match=r"not Orchestra's \(invoices\)"):
                await upgrade(database)
        else:
            assert await upgrade(database) == LATEST
    finally:
        await database.close()
    tables = "SELECT count(*) FROM sqlite_master WHERE name = 'task_events'"
    if db_url.startswith("sqlite"):
        assert sql_rows(db_url, tables) == [(0,)]
