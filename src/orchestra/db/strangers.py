"""What a database holds besides Orchestra's schema: another program's tables, which a first
migration refuses; and the schema version recorded, read without writing anything (for the
commands that must not migrate a database, as the keys commands).

A first start on a database that is not empty would mix Orchestra's tables in with another
program's (on SQLite, whose file is meant to be Orchestra's alone), or fail on a table name
both use with a traceback (``table tasks already exists``). Either way the start is refused
with the tables named.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, inspect, select

from orchestra.db.engine import Database
from orchestra.db.tables import metadata, schema_version

#: What Orchestra's own migrations make besides its tables.
_OWN = {"schema_version", "sqlite_sequence", "sqlite_stat1", "sqlite_stat4"}


def refusal(conn: Connection, where: str) -> str | None:
    """Why a database at schema version 0 cannot be made Orchestra's, or None.

    On SQLite any table is refused (the file is meant for Orchestra alone); on PostgreSQL,
    whose database other programs may share, only tables named as Orchestra's own are."""
    found = set(inspect(conn).get_table_names()) - _OWN
    if conn.dialect.name == "postgresql":
        found &= set(metadata.tables)
    if not found:
        return None
    names = ", ".join(sorted(found)[:10]) + (", …" if len(found) > 10 else "")
    if conn.dialect.name == "postgresql":
        return (
            f"{where}: tables named as Orchestra's already exist and were not made by it "
            f"({names}); give Orchestra a database (or a schema) of its own"
        )
    return (
        f"{where}: the file holds tables that are not Orchestra's ({names}); Orchestra keeps "
        "a database file of its own: name a new file in database.url"
    )


async def recorded_version(db: Database) -> int:
    """The schema version recorded in ``db`` (0: none, not an Orchestra database yet), read
    without creating or changing anything."""
    async with db.read() as conn:
        if not await conn.run_sync(lambda c: inspect(c).has_table("schema_version")):
            return 0
        found = await conn.execute(select(func.max(schema_version.c.version)))
        return int(found.scalar() or 0)
