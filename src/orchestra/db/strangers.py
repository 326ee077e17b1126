"""Tables a database held before Orchestra first migrated it: another program's.

A first start on a database that is not empty would mix Orchestra's tables in with another
program's (on SQLite, whose file is meant to be Orchestra's alone), or fail on a table name
both use with a traceback (``table tasks already exists``). Either way the start is refused
with the tables named.
"""

from __future__ import annotations

from sqlalchemy import Connection, inspect

from orchestra.db.tables import metadata

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
