"""Opening the database: pragmas, a serialized writer and a pool of readers.

SQLite allows one writer at a time. Rather than let concurrent writers collide and retry on
"database is locked", every write in this process goes through one connection behind an
asyncio lock, and starts with BEGIN IMMEDIATE so that a writer in *another* process is waited
for (busy_timeout) at the start of the transaction instead of failing halfway. Readers use
their own connections; in WAL mode they never block the writer nor wait for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from orchestra.errors import ConfigError

READ_POOL_SIZE = 4


def _sqlite_engine(url: str, *, begin: str, pool_size: int, busy_timeout_ms: int) -> AsyncEngine:
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=60)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (SQLAlchemy's documented
        # recipe for SQLite): the "begin" hook below emits the BEGIN we want.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


def check_url(url: str) -> Path:
    """Check that ``url`` names a database this version can use; returns the SQLite file.

    Raises:
        ConfigError: with a message saying what to write instead.
    """
    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigError(f"database.url: {url!r} is not a SQLAlchemy URL") from None
    if parsed.get_backend_name() != "sqlite":
        raise ConfigError(
            f"database.url: {parsed.get_backend_name()!r} is not supported yet; "
            "use a sqlite+aiosqlite:///PATH URL"
        )
    if parsed.get_driver_name() != "aiosqlite":
        raise ConfigError("database.url: use the async driver, sqlite+aiosqlite:///PATH")
    if not parsed.database or parsed.database == ":memory:":
        raise ConfigError(
            "database.url: an in-memory database loses every task on exit; name a file, "
            "e.g. sqlite+aiosqlite:///orchestra.db"
        )
    return Path(parsed.database)


class Database:
    """The database connections of one process.

    Use :meth:`write` for every statement that changes data and :meth:`read` for queries.
    """

    def __init__(self, url: str, *, busy_timeout_ms: int = 5000) -> None:
        self.url = url
        self.path = check_url(url)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = _sqlite_engine(
            url, begin="BEGIN IMMEDIATE", pool_size=1, busy_timeout_ms=busy_timeout_ms
        )
        self._reader = _sqlite_engine(
            url, begin="BEGIN", pool_size=READ_POOL_SIZE, busy_timeout_ms=busy_timeout_ms
        )
        self._write_lock = asyncio.Lock()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; commits on success, rolls back on error."""
        async with self._write_lock, self._writer.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction: one consistent snapshot for every query inside it."""
        async with self._reader.connect() as conn:
            try:
                yield conn
            finally:
                await conn.rollback()

    async def ping(self) -> None:
        """Run a trivial query; raises if the database does not answer."""
        async with self.read() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        """Close every connection."""
        await self._writer.dispose()
        await self._reader.dispose()
