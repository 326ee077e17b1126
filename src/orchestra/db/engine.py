"""The database a URL names, and what every engine offers the rest of storage.

``Database(url)`` opens the engine the URL names: SQLite (``sqlite+aiosqlite:///PATH``, the
default, :mod:`~orchestra.db.sqlite_engine`) or PostgreSQL (``postgresql+psycopg://…``,
:mod:`~orchestra.db.postgres_engine`). Both run the same transaction bodies — synchronous
SQLAlchemy Core on a plain connection — and the same schema, with the same guarantees; what
differs is how a write reaches the database (SQLite has one writer, PostgreSQL many) and how
another process learns of a new task (SQLite: its poll; PostgreSQL: LISTEN/NOTIFY).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestra import logs
from orchestra.db.failures import DatabaseState, WriteHealth
from orchestra.errors import ConfigError, StorageError, StorageUnavailable

log = logs.get("orchestra.db")

T = TypeVar("T")

#: The engines, by the backend name of their URL.
SQLITE = "sqlite"
POSTGRESQL = "postgresql"


def parse_url(url: str) -> URL:
    """``url`` parsed, if it names a database this version can use.

    Raises:
        ConfigError: with a message saying what to write instead.
    """
    try:
        parsed = make_url(url)
    except Exception:
        # Not shown: what made it unreadable is often a password's "@" or "/" (a Secret not
        # percent-encoded), and the message goes to the log.
        scheme = url.partition("://")[0] if "://" in url else ""
        shown = f"{scheme}://… (not shown: it may hold a password)" if scheme else repr(url)
        raise ConfigError(
            f"database.url: {shown} is not a SQLAlchemy URL; percent-encode a password's "
            "special characters (@ %40, / %2F, : %3A, % %25)"
        ) from None
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend == POSTGRESQL:
        if driver != "psycopg":
            raise ConfigError(
                "database.url: use the psycopg (3) driver, postgresql+psycopg://USER@HOST/DB"
            )
        return parsed
    if backend != SQLITE:
        raise ConfigError(
            f"database.url: {backend!r} is not supported; use sqlite+aiosqlite:///PATH or "
            "postgresql+psycopg://USER@HOST/DB"
        )
    if driver != "aiosqlite":
        raise ConfigError("database.url: use the async driver, sqlite+aiosqlite:///PATH")
    if not parsed.database or parsed.database == ":memory:":
        raise ConfigError(
            "database.url: an in-memory database loses every task on exit; name a file, "
            "e.g. sqlite+aiosqlite:///orchestra.db"
        )
    return parsed


def check_url(url: str) -> Path:
    """The SQLite file ``url`` names (see :func:`parse_url`); a leading ``~`` is the user's
    home, as in a shell (not a folder named ``~``).

    Raises:
        ConfigError: the URL is not a usable SQLite URL.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() != SQLITE:
        raise ConfigError(f"database.url: {url!r} does not name a SQLite file")
    return Path(str(parsed.database)).expanduser()


async def settled(future: asyncio.Future[T]) -> T:
    """``future``'s result; a caller cancelled meanwhile does not cut a transaction short: it
    ends (committed or rolled back) before the cancel is raised, so the caller never guesses
    whether it happened."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


class Database:
    """The database connections of one process.

    ``Database(url)`` returns the engine the URL names. Use :meth:`transaction` for every
    statement that changes data, :meth:`read` and :meth:`read_now` for queries.
    """

    #: The engine: :data:`SQLITE` or :data:`POSTGRESQL`.
    dialect: str
    #: The URL it was opened with.
    url: str
    #: The SQLite file; None for a database server.
    path: Path | None
    #: How writes have been going: the latest transaction's outcome.
    writes: WriteHealth
    #: Called on the event loop when writes work again after failing (the workers, which
    #: back off meanwhile, claim at once).
    on_recovered: Callable[[], None] | None
    #: Reads handed to a thread because the database was busy (SQLite's read_now).
    reads_handed_off: int
    #: Transactions asked for in one turn of the event loop commit together, in the order
    #: asked, on one connection: a later one sees what an earlier one wrote (SQLite's group
    #: commit). On PostgreSQL they run side by side on a pool's connections.
    commits_together: bool = False
    #: Other processes learn of this process's commits from the notifications they send
    #: (PostgreSQL's NOTIFY, :mod:`~orchestra.db.notices`); False: they notice commits by
    #: themselves (SQLite's ``data_version``), and a transaction sends nothing.
    notifies: bool = False
    #: :meth:`watch` hears other processes now (PostgreSQL: its LISTEN connection is up).
    listening: bool = False
    #: :meth:`close` has begun: no transaction or read starts any more.
    closed: bool = False

    def __new__(cls, url: str, **options: Any) -> Database:
        if cls is not Database:
            return super().__new__(cls)
        backend = parse_url(url).get_backend_name()
        if backend == POSTGRESQL:
            from orchestra.db.postgres_engine import PostgresDatabase

            return super().__new__(PostgresDatabase)
        from orchestra.db.sqlite_engine import SqliteDatabase

        return super().__new__(SqliteDatabase)

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        #: Health checks that found the database not answering: a line an outage (and a
        #: minute), not one per probe; ``health.database_recovered`` when one answers.
        self.unanswered = logs.Outage(log, "health.database_failed")

    def refuse_when_closed(self) -> None:
        """For the engines, before a transaction or a read starts.

        Raises:
            StorageUnavailable: :meth:`close` has begun (a late writer at a service's stop:
                on SQLite it would use the writer's connection while it is being closed).
        """
        if self.closed:
            raise StorageUnavailable(
                f"the database ({self.where}) is closed: the service is stopping"
            )

    @property
    def where(self) -> str:
        """Where the data is, for messages: the file, or the server and database (never the
        password)."""
        if self.path is not None:
            return str(self.path)
        return server_where(self.url)

    async def transaction(self, work: Callable[[Connection], T], *, small: bool = False) -> T:
        """Run ``work(connection)`` as one write transaction: committed when this returns,
        rolled back when it raises. ``work`` is synchronous (SQLAlchemy Core on a plain
        connection), must only touch the database, and may run more than once (PostgreSQL
        runs it again after a serialization failure). ``small``: a few indexed rows."""
        raise NotImplementedError

    def read(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A read-only transaction: one consistent snapshot for every query inside it.

        Raises:
            StorageError: the database cannot be read now.
        """
        raise NotImplementedError

    async def read_now(self, read: Callable[[Any], T]) -> T:
        """Run ``read(dbapi_connection)`` — a few indexed statements, each read to its end —
        as cheaply as the engine allows (SQLite: on the event loop's own connection). No
        transaction holds them together: each statement is its own snapshot, so a read that
        needs one view of several rows says it in one statement.

        Raises:
            StorageError: the database cannot be read now.
        """
        raise NotImplementedError

    async def ping(self) -> None:
        """Run a trivial query; raises if the database does not answer."""
        raise NotImplementedError

    def free_mb(self) -> float | None:
        """Free space on the database's disk, in MB (None when it cannot be told)."""
        return None

    def replaced(self) -> str | None:
        """What happened to the database's file under this process (deleted, moved, replaced:
        :mod:`orchestra.db.sqlite_file`), or None while it is the one opened."""
        return None

    async def watch(
        self, queued: Callable[[], None], changed: Callable[[Collection[int] | None, bool], None]
    ) -> None:
        """Until cancelled, call ``queued()`` when another process may have queued a task, and
        ``changed(ids, progress)`` when it changed tasks (``ids`` None: which ones is not
        known; ``progress``: the change leaves them running), so that this process's workers
        and waiting requests need not wait for their poll."""
        return None

    async def close(self) -> None:
        """Close every connection."""
        raise NotImplementedError

    async def state(self, min_free_mb: float) -> DatabaseState:
        """Whether reads answer (checked now), whether writes succeed (the latest write's
        outcome: a read cannot tell a full disk), and whether its disk has ``min_free_mb``."""
        try:
            await self.ping()
        except Exception as exc:
            self.unanswered.failed(exc)
            reason = exc.message if isinstance(exc, StorageError) else type(exc).__name__
            return DatabaseState(readable=False, ok=False, detail=f"error: {reason}")
        self.unanswered.succeeded()
        failure = self.writes.failure
        if failure is not None:
            return DatabaseState(readable=True, ok=False, detail=failure.describe())
        replaced = self.replaced()
        if replaced is not None:
            return DatabaseState(readable=True, ok=False, detail=f"error: {replaced}")
        free = self.free_mb()
        if free is not None and free < min_free_mb:
            return DatabaseState(readable=True, ok=False, detail=f"low disk: {free:.0f} MB free")
        return DatabaseState(readable=True, ok=True, detail="ok")


def server_params(url: str) -> dict[str, Any]:
    """libpq's connection parameters for a database server's URL, as SQLAlchemy's dialect
    makes them for its pools: the user part, the host and port, and the query's options; the
    multi-host forms (``?host=h1:p1&host=h2:p2``, ``?host=h1,h2&port=p1,p2``) become libpq's
    comma lists (``host=h1,h2 port=p1,p2``)."""
    parsed = make_url(url)
    _args, params = parsed.get_dialect()().create_connect_args(parsed)
    params.pop("context", None)  # psycopg's type adapters, not a libpq parameter
    return dict(params)


def server_where(url: str) -> str:
    """A database server's URL as messages show it: the server(s) and database, never the
    password (in the user part or ``?password=``) nor any other option."""
    parsed = make_url(url)
    try:
        params = server_params(url)
    except Exception:  # formats mixed: the engine says so at start; name what can be named
        params = {"host": parsed.host, "port": parsed.port}
    hosts = str(params.get("host") or "localhost").split(",")
    ports = str(params.get("port") or "").split(",")
    if len(ports) == 1:  # one port for every host (libpq's rule)
        ports *= len(hosts)
    ports = [p or "5432" for p in [*ports, *[""] * (len(hosts) - len(ports))]]
    if len(hosts) == 1 and hosts[0].startswith("/"):  # a Unix socket's folder
        return (
            f"PostgreSQL database {parsed.database!r} on the socket in {hosts[0]} (port {ports[0]})"
        )
    servers = ",".join(
        f"{host or 'localhost'}:{port}" for host, port in zip(hosts, ports, strict=False)
    )
    return f"postgresql://{servers}/{parsed.database or ''}"
