"""``orchestra keys``: the CLI's commands that open the database. They work on the service's
own database or refuse: run in the wrong folder they made a fresh ./orchestra.db and printed a
key the service never saw."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import make_url

from tests.conftest import StartService, make_keys, make_settings
from tests.fixtures.fake_ollama import FakeOllama


async def keys_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """``orchestra keys ARGS`` in ``cwd``, with none of the caller's ORCHESTRA_ settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRA_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestra",
        "keys",
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_keys_commands_refuse_a_database_that_does_not_exist(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    named = tmp_path / "gone" / "o.db"
    for args, env in (
        (("create", "--name", "ci"), None),
        (("list",), None),
        (("revoke", "ci"), None),
        (("list",), {"ORCHESTRA_DATABASE__URL": f"sqlite+aiosqlite:///{named}"}),
    ):
        code, out, err = await keys_cli(*args, cwd=elsewhere, env=env)
        assert (code, out) == (1, ""), (args, err)
        where = named if env else elsewhere / "orchestra.db"
        assert f"no database at {where}" in err, err
        assert "--config" in err and "ORCHESTRA_DATABASE__URL" in err
        assert "from built-in defaults" in err if env is None else "(environment)" in err
        assert "Traceback" not in err
    assert list(elsewhere.iterdir()) == [] and not named.parent.exists(), "nothing created"


async def test_keys_work_on_the_services_database_and_say_which(
    db_url: str, tmp_path: Path, fake_ollama: FakeOllama, start_service: StartService
) -> None:
    await make_keys(db_url)  # the database exists, with no key yet
    env = {"ORCHESTRA_DATABASE__URL": db_url}
    code, out, err = await keys_cli("list", cwd=tmp_path, env=env)
    # The file, or the server's database by name (as the service's messages name it).
    where = (
        db_url.split("///", 1)[1] if db_url.startswith("sqlite") else str(make_url(db_url).database)
    )
    assert (code, out) == (0, "") and err.splitlines()[0].startswith("database: ")
    assert where in err.splitlines()[0] and err.splitlines()[1] == "no keys", err

    code, token, err = await keys_cli(
        "create", "--name", "ci", "--scope", "read", cwd=tmp_path, env=env
    )
    assert code == 0 and where in err
    assert token.startswith("orc_") and len(token.strip()) > 40
    # The first key turns authentication on, which the dashboard asks to confirm: the CLI
    # says so, and that a read key alone can manage nothing.
    assert "warning: this is the only active key" in err and "every request needs a key" in err
    assert "make an admin key too" in err, err
    longer = ("create", "--name", "prometheus-scraper", "--scope", "admin")
    code, _, err = await keys_cli(*longer, cwd=tmp_path, env=env)
    assert code == 0 and "warning" not in err, err  # not the first
    code, _, err = await keys_cli("create", "--name", "ci", cwd=tmp_path, env=env)
    assert code == 1 and "Traceback" not in err  # the name is taken
    for empty in ("", "  "):
        code, _, err = await keys_cli("create", "--name", empty, cwd=tmp_path, env=env)
        assert code == 1 and "a key needs a name" in err and "Traceback" not in err
    async with start_service(make_settings(db_url, fake_ollama.url)) as svc:
        headers = {"Authorization": f"Bearer {token.strip()}"}
        answer = await svc.client.get("/api/v1/templates", headers=headers)
        assert answer.status_code == 200, "the service knows the key"
        async with httpx.AsyncClient(base_url=svc.url) as anonymous:
            assert (await anonymous.get("/api/v1/templates")).status_code == 401

    code, out, _ = await keys_cli("list", cwd=tmp_path, env=env)
    header, *rows = out.splitlines()
    assert code == 0 and header.split() == ["ID", "NAME", "SCOPE", "CREATED", "STATE"]
    assert token.strip() not in out
    assert [r.split()[1:3] for r in rows] == [["ci", "read"], ["prometheus-scraper", "admin"]]
    starts = [header.index(word) for word in ("NAME", "SCOPE", "CREATED", "STATE")]
    for row in rows:  # each column starts where its heading does
        assert all(row[at - 1] == " " and row[at] != " " for at in starts), out

    key_id = rows[0].split()[0]
    code, out, _ = await keys_cli("revoke", key_id, cwd=tmp_path, env=env)
    assert (code, out.strip()) == (0, f"key {key_id} (ci) revoked")
    for ref in (key_id, "ci"):
        code, _, err = await keys_cli("revoke", ref, cwd=tmp_path, env=env)
        assert code == 5 and f"key {key_id} (ci) was revoked already, at " in err, err
    code, _, err = await keys_cli("revoke", "nope", cwd=tmp_path, env=env)
    assert code == 5 and "no key with id or name 'nope'" in err


async def test_keys_commands_never_migrate_a_database(tmp_path: Path) -> None:
    """A file that holds no Orchestra schema (empty, or another program's) and a database at
    an older version are refused as they are: never given Orchestra's tables, never upgraded
    under the service that runs on them."""
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    older = tmp_path / "older.db"
    with sqlite3.connect(older) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
        conn.execute("INSERT INTO schema_version VALUES (1, '2026-01-01T00:00:00Z')")
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
        conn.execute("INSERT INTO schema_version VALUES (999, '2026-01-01T00:00:00Z')")
    for path, said, unsaid in (
        (empty, "holds no Orchestra database yet", "migrates"),
        (older, "schema version 1", "a newer"),
        # Not "this version's serve migrates it": serve refuses a newer database.
        (newer, "a newer orchestra's", "migrates"),
    ):
        env = {"ORCHESTRA_DATABASE__URL": f"sqlite+aiosqlite:///{path}"}
        code, out, err = await keys_cli("create", "--name", "ci", cwd=tmp_path, env=env)
        assert (code, out) == (1, "") and said in err and unsaid not in err, err
        with sqlite3.connect(path) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "api_keys" not in tables and "tasks" not in tables, tables


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://orc@127.0.0.1:9/orc?password=PGQ_SECRET",
        "postgresql+psycopg://orc:PGQ_SECRET@127.0.0.1:9/orc",
    ],
)
async def test_the_keys_commands_never_print_the_databases_password(
    tmp_path: Path, url: str
) -> None:
    """``?password=`` (libpq takes it) was printed whole on the "database:" line."""
    code, out, err = await keys_cli("list", cwd=tmp_path, env={"ORCHESTRA_DATABASE__URL": url})
    assert code != 0  # nothing listens there
    assert "PGQ_SECRET" not in out + err, err
    assert "127.0.0.1:9" in err, err
