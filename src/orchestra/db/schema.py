"""Creating and upgrading the schema at startup; the version is recorded in the database.

Each migration (:mod:`~orchestra.db.migrations`) is explicit SQL, applied once, in order,
inside one write transaction together with the row that records it. Add new ones at the end;
never edit one that has shipped. ``tables.py`` describes the resulting schema for queries, and
a test checks that a database migrated from empty matches it exactly.

PostgreSQL runs the same migrations, in the same order and with the same numbers. Their SQL is
written for SQLite; :func:`~orchestra.db.portable.portable_ddl` gives PostgreSQL its own
words for the three types that differ (an id that grows by itself, 64-bit integers,
double-precision floats), and where a
migration cannot be said in both (migration 5's triggers), it has a PostgreSQL twin.
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import Connection, func, select
from sqlalchemy.exc import DBAPIError

from orchestra import logs
from orchestra.db import strangers
from orchestra.db.engine import Database
from orchestra.db.migrations import LATEST as LATEST
from orchestra.db.migrations import MIGRATIONS as MIGRATIONS
from orchestra.db.portable import portable_ddl
from orchestra.db.sqlite_checkpoint import truncate_log
from orchestra.db.tables import schema_version
from orchestra.domain import iso_now
from orchestra.errors import ConfigError

log = logs.get("orchestra.db")

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL PRIMARY KEY,
    applied_at TEXT NOT NULL
)
"""


#: The lock every process takes on PostgreSQL before it reads the version, so that processes
#: starting together migrate one after the other (SQLite's BEGIN IMMEDIATE does the same).
_MIGRATION_LOCK = 0x6F726368  # "orch"


def current_version(conn: Connection) -> int:
    """The schema version recorded in the database (0 for an empty database)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
    conn.exec_driver_sql(portable_ddl(_VERSION_TABLE, conn.dialect.name))
    return int(conn.execute(select(func.max(schema_version.c.version))).scalar() or 0)


async def newer_than_known(db: Database) -> int | None:
    """The schema version recorded in the database when a newer Orchestra has upgraded it
    past :data:`LATEST` since this process started (a rolling upgrade); None otherwise. A
    plain read: no lock, nothing created.

    Raises:
        StorageError: the database cannot be read now.
    """
    async with db.read() as conn:
        found = (await conn.execute(select(func.max(schema_version.c.version)))).scalar()
    version = int(found or 0)
    return version if version > LATEST else None


async def upgrade(db: Database) -> int:
    """Bring the database to the latest schema; returns the version it is at.

    A migration is logged when it starts (``database.migrating``: it can take minutes on a
    large database) and ends (``database.migrated``, with its duration). On SQLite, the
    write-ahead log it leaves (as large as what it wrote) is then emptied into the file.

    Raises:
        ConfigError: the database was written by a newer Orchestra, or holds another
            program's tables (:mod:`~orchestra.db.strangers`).
    """

    place: dict[str, int] = {}  # where the migrations stood when one failed

    def work(conn: Connection) -> None:
        place.clear()
        version = place["from"] = current_version(conn)
        refused = strangers.refusal(conn, db.where) if version == 0 else None
        if refused:
            raise ConfigError(refused)
        if version > LATEST:
            raise ConfigError(
                f"{db.where}: schema version {version} is newer than this Orchestra "
                f"understands ({LATEST}); upgrade Orchestra"
            )
        if version < LATEST:
            place["began_ns"] = time.monotonic_ns()
            log.info("database.migrating", where=db.where, from_version=version, to_version=LATEST)
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            place["to"] = number
            migration(conn)
            conn.execute(schema_version.insert().values(version=number, applied_at=iso_now()))

    try:
        await db.transaction(work)
    except DBAPIError as exc:  # what the engine's retries did not get past
        said = str(exc.orig or exc).strip().splitlines()[0]
        if "from" not in place:  # its version could not be read: not Orchestra's table?
            raise ConfigError(
                f"{db.where}: cannot read the schema version ({said}): does its "
                "schema_version table belong to another program?"
            ) from None
        if "to" not in place:  # no migration was run: its check, or the commit, failed
            raise ConfigError(
                f"{db.where}: the schema (version {place['from']}) could not be checked: {said}"
            ) from None
        raise ConfigError(
            f"{db.where}: the migration to schema version {place['to']} failed: {said}; "
            f"the database is unchanged, still at schema version {place['from']}"
        ) from None
    if "to" in place:
        log.info(
            "database.migrated",
            where=db.where,
            from_version=place["from"],
            to_version=LATEST,
            duration_ms=round((time.monotonic_ns() - place["began_ns"]) / 1e6, 1),
        )
        if db.path is not None:
            await asyncio.to_thread(truncate_log, db.path)
    return LATEST
