"""SQLite's write-ahead log while a reader keeps an old snapshot (a person's ``sqlite3`` shell
left inside a transaction): every checkpoint stops short of the log's end, and the log grows
with every write. The service says so in its log, and once the reader is gone the log is cut
back when it starts over. It grew silently (313 MB in 100 s at 25 tasks/s) and never shrank."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import structlog

from orchestra.db import Database
from orchestra.db.sqlite_checkpoint import WAL_KEPT_BYTES
from tests.fixtures.servers import wait_until

pytestmark = pytest.mark.sqlite_only

MiB = 2**20


async def _write(db: Database, rows: int = 100) -> None:
    """One transaction of ``rows`` random 4,000-byte blobs (100: about 400 KB of log)."""
    await db.transaction(
        lambda c: c.exec_driver_sql(
            "INSERT INTO filler SELECT randomblob(4000) FROM "
            f"(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            f"WHERE i < {rows}) SELECT i FROM n)"
        )
    )


async def test_big_writes_are_checkpointed_by_the_log_s_size_not_only_by_commits(
    tmp_path: Path,
) -> None:
    """Tasks with a megabyte of text each wrote about 7 MB of log, and a checkpoint came every
    hundred commits whatever their size: the log reached 0.5 GB between two."""
    path, wal = tmp_path / "o.db", tmp_path / "o.db-wal"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await db.transaction(lambda c: c.exec_driver_sql("CREATE TABLE filler (x BLOB)"))
        for _ in range(20):  # 20 commits of 2 MB: far fewer than a checkpoint's 100 commits
            await _write(db, rows=500)
        # (At least: the checkpoint the log's size made due may have cut it back already.)
        assert wal.stat().st_size >= WAL_KEPT_BYTES
        # The log's size made a checkpoint due: its pages reach the database file.
        await wait_until(
            lambda: path.stat().st_size > WAL_KEPT_BYTES and db.checkpoints.idle, timeout=30
        )

        async def cut_back() -> bool:
            await _write(db)  # the log starts over, cut back to what is kept
            return wal.stat().st_size <= WAL_KEPT_BYTES

        await wait_until(cut_back, timeout=30, interval=0)
    finally:
        await db.close()


async def test_a_log_a_reader_holds_back_is_reported_and_cut_back_after_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    wal = tmp_path / "o.db-wal"
    db = Database(f"sqlite+aiosqlite:///{path}")
    db.checkpoints.warn_bytes = 8 * MiB  # (64 MiB in service: less to write here)
    try:
        await db.transaction(lambda c: c.exec_driver_sql("CREATE TABLE filler (x BLOB)"))

        async def write() -> None:
            await _write(db)

        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM filler").fetchall()  # its snapshot, kept
        with structlog.testing.capture_logs() as logged:

            async def reported(event: str) -> bool:
                await write()
                return any(e["event"] == event for e in logged)

            await wait_until(lambda: reported("database.log_growing"), timeout=60, interval=0)
            [growing] = [e for e in logged if e["event"] == "database.log_growing"]
            assert growing["wal_mb"] >= 8 and "sqlite3 shell" in growing["detail"]
            peak = wal.stat().st_size
            assert peak > WAL_KEPT_BYTES  # grown past what is kept
        reader.execute("COMMIT")
        reader.close()

        async def cut_back() -> bool:
            await write()  # the next checkpoint reaches the end; the log starts over
            return wal.stat().st_size <= WAL_KEPT_BYTES

        await wait_until(cut_back, timeout=60, interval=0)
    finally:
        await db.close()


async def test_reads_that_never_pause_are_named_not_an_old_snapshot(tmp_path: Path) -> None:
    """A reader that always holds some snapshot, each newer than the last (the service's own
    reads of big results, overlapping), also keeps the log from starting over; the log
    blamed "a sqlite3 shell left inside a transaction", which was not there."""
    path = tmp_path / "o.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    db.checkpoints.warn_bytes = 8 * MiB
    try:
        await db.transaction(lambda c: c.exec_driver_sql("CREATE TABLE filler (x BLOB)"))
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM filler").fetchall()
        with structlog.testing.capture_logs() as logged:

            async def reported() -> bool:
                reader.execute("COMMIT")  # a new snapshot, at the log's end, before each write
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM filler").fetchall()
                await _write(db)
                return any(e["event"] == "database.log_growing" for e in logged)

            await wait_until(reported, timeout=60, interval=0)
        [growing] = [e for e in logged if e["event"] == "database.log_growing"]
        assert "reads under way" in growing["detail"], growing
        reader.execute("COMMIT")
        reader.close()
    finally:
        await db.close()
