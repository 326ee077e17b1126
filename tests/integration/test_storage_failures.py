"""When the database itself fails: a full disk, a lock held elsewhere, a read-only file.

Each test runs the real service on a real SQLite file and makes SQLite fail for real:
``PRAGMA max_page_count`` makes the file as full as a full disk (SQLITE_FULL), a second
connection holding ``BEGIN IMMEDIATE`` is a sqlite3 shell in a transaction (SQLITE_BUSY), and
``PRAGMA query_only`` refuses every write as a read-only file does (SQLITE_READONLY; as root,
chmod would not stop SQLite). As root, a tmpfs the test mounts fills up as a real disk does.
Each shows the clear answer, a truthful /health, and recovery without a restart.

These are SQLite's own failures (``sqlite_only``); PostgreSQL's are named in
:mod:`orchestra.db.pg_failures`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import structlog
from sqlalchemy import text

from orchestra.config import Settings
from orchestra.db import Database
from orchestra.db.failures import storage_error, warn_when_low
from orchestra.db.sqlite_checkpoint import WAL_KEPT_BYTES
from orchestra.errors import StorageError, StorageFull, StorageLocked, StorageUnavailable
from tests.conftest import Service, StartService, make_settings, task_row
from tests.fixtures.fake_ollama import FakeOllama
from tests.fixtures.logs import captured, events
from tests.fixtures.servers import free_port, load_slack, start_process, wait_until

TEXT = "The council voted to build a library. " * 540  # about 20 KB, as in the issue


def database(svc: Service) -> Database:
    db: Database = svc.app.runtime.db
    return db


async def on_writer(db: Database, sql: str) -> Any:
    """Run ``sql`` on the service's own writer connection, outside any transaction: the
    connection-level pragmas that stand for a full or read-only disk live there."""

    def run() -> Any:
        raw = db._connection().connection.driver_connection
        assert raw is not None
        return raw.execute(sql).fetchone()

    return await asyncio.get_running_loop().run_in_executor(db._thread, run)


async def fill(db: Database, room_pages: int = 0) -> None:
    """Leave the database ``room_pages`` pages to grow (a disk that is full, or nearly)."""
    (pages,) = await on_writer(db, "PRAGMA page_count")
    await on_writer(db, f"PRAGMA max_page_count = {pages + room_pages}")


async def make_room(db: Database) -> None:
    await on_writer(db, "PRAGMA max_page_count = 1073741823")


async def health(svc: Service) -> dict[str, Any]:
    response = await svc.client.get("/health")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def submit(svc: Service, text: str = TEXT) -> Any:
    return svc.client.post(
        "/api/v1/tasks", json={"template": "summarize", "params": {"text": text}}
    )


def statuses(db_url: str) -> dict[str, int]:
    with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
        rows = conn.execute("SELECT status, count(*) FROM tasks GROUP BY status").fetchall()
    return dict(rows)


@pytest.mark.sqlite_only
async def test_a_full_disk_answers_507_health_says_so_and_writes_recover(
    service: Service, db_url: str
) -> None:
    db = database(service)
    accepted = [(await submit(service)).json()["id"] for _ in range(3)]
    await fill(db, room_pages=40)
    refused: list[httpx.Response] = []
    for _ in range(60):
        response = await submit(service)
        if response.status_code == 201:
            accepted.append(response.json()["id"])
        else:
            refused.append(response)
    assert refused, "the database never filled up"
    assert {r.status_code for r in refused} == {507}
    body = refused[-1].json()
    assert body["code"] == "storage_full"
    assert "disk is full" in body["message"] and "orchestra.db" in body["message"]
    full = await health(service)
    assert full["status"] == "degraded"
    assert full["database"].startswith("error: disk full since ")

    await make_room(db)

    async def writes() -> bool:
        response = await submit(service, "short text")
        if response.status_code == 201:
            accepted.append(response.json()["id"])
        return response.status_code == 201

    await wait_until(writes, timeout=2, interval=0.05)  # recovered within 2 s, no restart
    assert (await health(service))["database"] == "ok"
    for task_id in accepted:  # every task that got a 201 finishes: none lost, none stuck
        assert (await service.wait(task_id, seconds=30))["status"] == "succeeded"
    assert statuses(db_url) == {"succeeded": len(accepted)}


@pytest.mark.sqlite_only
async def test_a_task_whose_model_answered_while_writes_failed_keeps_its_result(
    service: Service, fake_ollama: FakeOllama, db_url: str
) -> None:
    fake_ollama.latency = 1.0
    store = service.app.runtime.pool.store
    refused: list[str] = []
    finish = store.finish  # the task's end, with its step's: the first write after the answer

    async def counting(*args: Any, **kwargs: Any) -> Any:
        try:
            return await finish(*args, **kwargs)
        except StorageError as exc:
            refused.append(exc.code)
            raise

    store.finish = counting
    task = (await submit(service, "keep me")).json()
    await wait_until(lambda: fake_ollama.in_flight > 0, timeout=10)
    db = database(service)
    # Every write refused (a full disk lets a small write into a page with room left).
    await on_writer(db, "PRAGMA query_only = ON")
    await wait_until(lambda: len(refused) >= 2, timeout=10)  # the model answered; refused
    assert task_row(db_url, task["id"], "status") == ("running",)
    await on_writer(db, "PRAGMA query_only = OFF")
    done = await service.wait(task["id"], seconds=30)
    assert done["status"] == "succeeded" and "keep me" in done["result"]
    assert len(done["attempts"]) == 1  # written once room returned, not run again


@pytest.mark.sqlite_only
async def test_a_held_lock_answers_503_with_retry_after_and_serves_after(
    settings: Settings, start_service: StartService, db_url: str
) -> None:
    quick = msgspec.structs.replace(
        settings, database=msgspec.structs.replace(settings.database, busy_timeout_ms=300)
    )
    async with start_service(quick) as svc:
        shell = sqlite3.connect(db_url.split("///", 1)[1], isolation_level=None)
        try:
            shell.execute("BEGIN IMMEDIATE")  # as a person in the sqlite3 shell would
            with structlog.testing.capture_logs() as logged:
                locked = await submit(svc, "hello")
            listed = await svc.client.get("/api/v1/tasks")  # reads go on meanwhile
            during = await health(svc)
        finally:
            shell.execute("ROLLBACK")
            shell.close()
        after = await submit(svc, "hello")
        done = await svc.wait(after.json()["id"])
        healed = await health(svc)
    assert locked.status_code == 503 and locked.headers["Retry-After"] == "1"
    assert locked.json()["code"] == "storage_locked"
    assert "locked by another connection" in locked.json()["message"]
    assert listed.status_code == 200
    assert during["status"] == "degraded"
    assert during["database"].startswith("error: locked by another connection since ")
    assert after.status_code == 201 and done["status"] == "succeeded"
    assert healed["database"] == "ok"
    # A refused write is a failure an operator should see (it was logged at info).
    [refused] = [e for e in logged if e["event"] == "api.storage_failed"]
    assert refused["log_level"] == "warning" and refused["code"] == "storage_locked"


@pytest.mark.sqlite_only
async def test_a_write_queued_behind_one_waiting_for_the_lock_waits_no_longer_than_its_own_timeout(
    tmp_path: Path,
) -> None:
    # Another connection holds the write lock. A write asked for while an earlier one waits
    # for it fails busy_timeout_ms after it was asked for, not after the earlier one gave up
    # and then a whole busy timeout of its own (a submit on an idle service waited 9-10 s
    # behind the reaper's write with busy_timeout_ms = 5000).
    path = tmp_path / "locked.db"
    db = Database(f"sqlite+aiosqlite:///{path}", busy_timeout_ms=1000)
    await db.transaction(lambda conn: conn.execute(text("CREATE TABLE t (x)")))
    shell = sqlite3.connect(path, isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    try:
        loop = asyncio.get_running_loop()
        first = asyncio.ensure_future(
            db.transaction(lambda conn: conn.execute(text("INSERT INTO t VALUES (1)")))
        )
        # The writer's thread took it from the queue: it waits for the lock now.
        await wait_until(lambda: not db._pending, timeout=5, interval=0.001)
        asked = loop.time()
        with pytest.raises(StorageLocked):
            await db.transaction(
                lambda conn: conn.execute(text("INSERT INTO t VALUES (2)")), small=True
            )
        waited = loop.time() - asked
        with pytest.raises(StorageLocked):
            await first
    finally:
        shell.execute("ROLLBACK")
        shell.close()
        await db.close()
    # 2 s before: the rest of the first's wait (about all of it), then 1 s more.
    assert 0.8 < waited < 1.3 * load_slack(), waited


@pytest.mark.sqlite_only
async def test_a_read_only_database_answers_503_naming_it(service: Service) -> None:
    db = database(service)
    await on_writer(db, "PRAGMA query_only = ON")
    refused = await submit(service, "hello")
    during = await health(service)
    await on_writer(db, "PRAGMA query_only = OFF")
    accepted = await submit(service, "hello")
    assert refused.status_code == 503 and "Retry-After" not in refused.headers
    assert refused.json()["code"] == "storage_unavailable"
    assert "read-only" in refused.json()["message"]
    assert during["status"] == "degraded" and during["database"].startswith("error: ")
    assert accepted.status_code == 201
    assert (await service.wait(accepted.json()["id"]))["status"] == "succeeded"


@pytest.mark.sqlite_only
async def test_workers_back_off_while_writes_are_refused(service: Service) -> None:
    db = database(service)
    pool = service.app.runtime.pool
    claims = 0
    claim = pool.store.claim

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        return await claim(*args, **kwargs)

    pool.store.claim = counting
    await on_writer(db, "PRAGMA query_only = ON")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await wait_until(lambda: claims >= 4, timeout=10)
    # Refused claims wait 0.5, 1, 2 s (poll_interval 0.5, doubled): polling every 0.5 s
    # would reach a fourth claim within about 1.5 s, a loop at once.
    assert loop.time() - started >= 3.0
    await on_writer(db, "PRAGMA query_only = OFF")
    accepted = await submit(service, "hello")  # and claims resume
    assert (await service.wait(accepted.json()["id"]))["status"] == "succeeded"


@pytest.mark.sqlite_only
async def test_low_disk_space_shows_in_health(
    settings: Settings, start_service: StartService
) -> None:
    roomy = msgspec.structs.replace(
        settings, database=msgspec.structs.replace(settings.database, min_free_mb=10**12)
    )
    async with start_service(roomy) as svc:
        body = await health(svc)
    assert body["status"] == "degraded"
    assert body["database"].startswith("low disk: ") and body["database"].endswith(" MB free")


@pytest.mark.sqlite_only
async def test_a_failed_commit_leaves_the_writer_ready_for_the_next_transaction(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:

        def schema(conn: Any) -> None:
            conn.exec_driver_sql("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
            conn.exec_driver_sql(
                "CREATE TABLE child (parent INTEGER REFERENCES parent(id) "
                "DEFERRABLE INITIALLY DEFERRED)"
            )

        await db.transaction(schema)
        # A deferred foreign key is checked at COMMIT: the COMMIT fails and SQLite keeps the
        # transaction open, as a COMMIT that cannot write the log on a full disk does.
        with pytest.raises(Exception, match="FOREIGN KEY"):
            await db.transaction(lambda c: c.exec_driver_sql("INSERT INTO child VALUES (7)"))
        await db.transaction(lambda c: c.exec_driver_sql("INSERT INTO parent VALUES (7)"))
        await db.transaction(lambda c: c.exec_driver_sql("INSERT INTO child VALUES (7)"))
        async with db.read() as conn:
            rows = (await conn.exec_driver_sql("SELECT count(*) FROM child")).scalar()
        assert rows == 1
    finally:
        await db.close()


@pytest.mark.sqlite_only
async def test_one_write_too_big_for_the_disk_does_not_fail_the_others_beside_it(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:
        await db.transaction(lambda c: c.exec_driver_sql("CREATE TABLE t (x TEXT)"))
        await fill(db, room_pages=2)

        def insert(text: str) -> Any:
            return db.transaction(lambda c: c.exec_driver_sql("INSERT INTO t VALUES (?)", (text,)))

        # Asked for together, so they are committed as one group.
        results = await asyncio.gather(
            insert("small"), insert("x" * 200_000), insert("also small"), return_exceptions=True
        )
        assert [type(r).__name__ for r in results] == [
            "CursorResult",
            "StorageFull",
            "CursorResult",
        ]
        assert db.writes.failure is not None  # the disk is still full
    finally:
        await db.close()


async def test_low_disk_space_is_warned_about_every_interval() -> None:
    with structlog.testing.capture_logs() as logged:
        watch = asyncio.create_task(warn_when_low(lambda: 5.0, 100, Path("/x.db"), every=0.01))
        await wait_until(
            lambda: sum(e["event"] == "database.low_disk" for e in logged) >= 3, timeout=5
        )
        watch.cancel()
    assert logged[0]["free_mb"] == 5.0 and logged[0]["min_free_mb"] == 100


@pytest.mark.sqlite_only
def test_sqlite_failures_are_named(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    one = sqlite3.connect(path, isolation_level=None, timeout=0)
    two = sqlite3.connect(path, isolation_level=None, timeout=0)
    one.execute("CREATE TABLE t (x TEXT)")
    caught: list[BaseException] = []

    def attempt(conn: sqlite3.Connection, sql: str, *args: Any) -> None:
        try:
            conn.execute(sql, args)
        except sqlite3.Error as exc:
            caught.append(exc)

    one.execute("BEGIN IMMEDIATE")
    attempt(two, "BEGIN IMMEDIATE")  # locked
    one.execute("ROLLBACK")
    (pages,) = one.execute("PRAGMA page_count").fetchone()
    one.execute(f"PRAGMA max_page_count = {pages}")
    attempt(one, "INSERT INTO t VALUES (?)", "x" * 100_000)  # full
    two.execute("PRAGMA query_only = ON")
    attempt(two, "INSERT INTO t VALUES ('y')")  # read-only
    attempt(one, "INSERT INTO nowhere VALUES (1)")  # a bug, not the database failing
    kinds = [storage_error(exc, path) for exc in caught]
    assert [type(k) for k in kinds] == [
        StorageLocked,
        StorageFull,
        StorageUnavailable,
        type(None),
    ]


# -- a real full disk (root only) ---------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs mounted for the test (root only; skipped elsewhere)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.sqlite_only
@pytest.mark.slow
async def test_a_real_disk_fills_up_and_the_service_recovers_when_it_grows(
    small_disk: Path, fake_ollama: FakeOllama
) -> None:
    port = free_port()
    config = small_disk.parent / "orchestra.toml"
    config.write_text(
        f'[server]\nport = {port}\n[database]\nurl = "sqlite+aiosqlite:///{small_disk}/o.db"\n'
        "min_free_mb = 0\n"
        f'[providers.ollama]\nurl = "{fake_ollama.url}"\n[providers.embedded]\nenabled = false\n'
    )
    service = await start_process(config)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            body = {"template": "summarize", "params": {"text": TEXT}}
            answers = await asyncio.gather(
                *(client.post("/api/v1/tasks", json=body) for _ in range(400))
            )
            codes = {r.status_code for r in answers}
            accepted = [r.json()["id"] for r in answers if r.status_code == 201]
            assert codes == {201, 507}, codes

            # /health tells of the last write: a worker's write that found a few pages free
            # (the file grew) says that writes work again, until the next one fails, as the
            # workers' writes for the accepted tasks do while the disk stays full.
            async def says_full() -> bool:
                health = (await client.get("/health")).json()
                return health["status"] == "degraded" and "disk full" in health["database"]

            await wait_until(says_full, timeout=5, interval=0.02)

            # Room for the backlog's write-ahead log as well as the file: the log grows by
            # tens of MB while the accepted tasks are written, and is kept up to
            # WAL_KEPT_BYTES. Grown by less (it was 30m), the disk could fill up again at once,
            # and for good: copying the log back needs the file to grow (half the runs failed).
            size_mb = 3 * WAL_KEPT_BYTES // 2**20
            subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(small_disk)], check=True)
            loop = asyncio.get_running_loop()
            grown = loop.time()

            async def writes() -> bool:
                response = await client.post("/api/v1/tasks", json=body)
                if response.status_code == 201:
                    accepted.append(response.json()["id"])
                return response.status_code == 201

            await wait_until(writes, timeout=10, interval=0.05)
            assert loop.time() - grown < 2

            def finished() -> bool:  # every 201 succeeds: none lost, none stuck running
                with sqlite3.connect(small_disk / "o.db") as conn:
                    rows = conn.execute("SELECT status, count(*) FROM tasks GROUP BY status")
                    return dict(rows.fetchall()) == {"succeeded": len(accepted)}

            await wait_until(finished, timeout=60, interval=0.2)
    finally:
        service.terminate()
        with contextlib.suppress(ProcessLookupError):
            await service.wait()


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``path`` made immutable (``chattr +i``: root on a file system that has it), so that
    writing it fails with an I/O error while reading it works."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (root on ext4/xfs/btrfs)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.sqlite_only
async def test_health_stays_degraded_while_writes_fail_though_idle_claims_succeed(
    service: Service, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write-ahead log that cannot be written: every submit got 503, yet /health said ok a
    second later, because an idle worker's claim (a transaction that writes nothing) counted
    as a write that worked. The claims' outage flapped the same way (claim_failed, then
    claim_recovered at the next empty claim), so it never reached error level."""
    first = (await submit(service)).json()["id"]
    assert (await service.wait(first))["status"] == "succeeded"
    store = service.app.runtime.pool.store
    claim, empty = store.claim, [0]

    async def counted(*args: Any, **kwargs: Any) -> Any:
        claimed = await claim(*args, **kwargs)
        empty[0] += not claimed
        return claimed

    monkeypatch.setattr(store, "claim", counted)
    wal = Path(db_url.split("///", 1)[1] + "-wal")
    with immutable(wal):
        refused = await submit(service)
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "storage_unavailable"
        # Idle claims after the refusal (poll_interval 0.5 s), each writing nothing.
        after = empty[0]
        await wait_until(lambda: empty[0] >= after + 2, timeout=10, interval=0.05)
        during = await health(service)
        assert during["status"] == "degraded" and during["database"].startswith("error: ")

    async def writes() -> bool:
        return (await submit(service, "again")).status_code == 201

    await wait_until(writes, timeout=5, interval=0.1)
    assert (await health(service))["database"] == "ok"


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "gone", ["renamed", "deleted", "wal deleted", "wal deleted, through a symlink"]
)
async def test_a_database_file_moved_or_deleted_under_the_service_is_said_and_refuses_writes(
    fake_ollama: FakeOllama, start_service: StartService, tmp_path: Path, gone: str
) -> None:
    """Writes went on into a file nothing could open again, answered 201, /health said ok,
    nothing was logged, and the next start made an empty database: every task since gone
    (helper-147). Noticed at the next write, without anyone asking /health (review)."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    folder = tmp_path / ("link" if "symlink" in gone else "real")
    path = real / "orch.db"
    settings = make_settings(f"sqlite+aiosqlite:///{folder}/orch.db", fake_ollama.url)
    async with start_service(settings) as svc:
        assert (await submit(svc, "before")).status_code == 201
        assert (await health(svc))["database"] == "ok"  # the log is there, and seen
        moved = path.with_name("orch.db.moved")
        with captured(logging.WARNING) as logged:
            if gone == "renamed":
                path.rename(moved)
            elif gone == "deleted":
                path.unlink()
            else:
                path.with_name("orch.db-wal").unlink()
            refused: list[Any] = []

            async def refused_now() -> bool:
                answer = await submit(svc, "after")
                refused.append(answer)
                return answer.status_code == 503

            await wait_until(refused_now, timeout=10)

            async def said_so() -> bool:  # /health's look at the database is a second old
                return (await health(svc))["database"] != "ok"

            await wait_until(said_so, timeout=10)
            body = await health(svc)
            scraped = (await svc.client.get("/metrics")).text
        said = f"the database file {real if gone.startswith('wal') else folder}/orch.db"
        assert refused[-1].json()["code"] == "storage_unavailable", refused[-1].text
        assert said in refused[-1].json()["message"], refused[-1].text
        assert body["status"] == "degraded" and body["database"].startswith("error: "), body
        assert ("-wal" in body["database"]) == gone.startswith("wal"), body
        assert "orchestra_database_writable 0.0" in scraped
        [event] = events(logged, "database.file_replaced")
        assert event["path"] == f"{folder}/orch.db"


@pytest.mark.sqlite_only
@pytest.mark.parametrize(("synchronous", "level"), [("normal", 1), ("full", 2)])
async def test_synchronous_full_syncs_each_commit_off_the_event_loop(
    settings: Settings, start_service: StartService, synchronous: str, level: int
) -> None:
    """NORMAL lost the tasks of the last moments before a power cut or an OS crash, though
    answered 201 (helper-147): ``synchronous = "full"`` syncs each commit, and since each
    then waits for an fsync, none runs on the event loop."""
    chosen = msgspec.structs.replace(
        settings, database=msgspec.structs.replace(settings.database, synchronous=synchronous)
    )
    async with start_service(chosen) as svc:
        db = database(svc)
        [pragma] = await on_writer(db, "PRAGMA synchronous")
        # A small one runs on the loop when the writer is idle (a background write may be
        # under way: normal's is waited for, and full's never comes).
        loop_thread = threading.get_ident()
        ran = [await db.transaction(lambda _conn: threading.get_ident(), small=True)]

        async def on_loop() -> bool:
            ran.append(await db.transaction(lambda _conn: threading.get_ident(), small=True))
            return ran[-1] == loop_thread or len(ran) >= 20

        await wait_until(on_loop, timeout=10, interval=0.05)
        made = await submit(svc, "kept")
        assert made.status_code == 201
        assert (await svc.wait(made.json()["id"]))["status"] == "succeeded"
    assert pragma == level
    assert (loop_thread in ran) == (synchronous == "normal"), ran
