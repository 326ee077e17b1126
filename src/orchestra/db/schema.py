"""Creating and upgrading the schema at startup; the version is recorded in the database.

Each migration is a function of a connection, applied once, in order, inside one write
transaction together with the row that records it. Add new ones at the end; never edit one
that has shipped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from orchestra.db.engine import Database
from orchestra.db.tables import metadata, schema_version
from orchestra.domain import iso_now
from orchestra.errors import ConfigError

Migration = Callable[[AsyncConnection], Awaitable[None]]


async def _v1_initial(conn: AsyncConnection) -> None:
    await conn.run_sync(metadata.create_all)


MIGRATIONS: list[Migration] = [_v1_initial]
LATEST = len(MIGRATIONS)


async def current_version(conn: AsyncConnection) -> int:
    """The schema version recorded in the database (0 for an empty database)."""
    has_table = await conn.run_sync(lambda sync: sync.dialect.has_table(sync, schema_version.name))
    if not has_table:
        return 0
    return int((await conn.execute(select(func.max(schema_version.c.version)))).scalar() or 0)


async def upgrade(db: Database) -> int:
    """Bring the database to the latest schema; returns the version it is at.

    Raises:
        ConfigError: the database was written by a newer Orchestra.
    """
    async with db.write() as conn:
        version = await current_version(conn)
        if version > LATEST:
            raise ConfigError(
                f"{db.path}: schema version {version} is newer than this Orchestra "
                f"understands ({LATEST}); upgrade Orchestra"
            )
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            await migration(conn)
            await conn.execute(schema_version.insert().values(version=number, applied_at=iso_now()))
    return LATEST
