"""Secrets the service makes for itself and keeps in the database (so that every process
sharing the database uses the same ones): the key that signs dashboard sessions."""

from __future__ import annotations

import secrets

from sqlalchemy import Connection, select
from sqlalchemy.dialects.sqlite import insert

from orchestra.db.engine import Database
from orchestra.db.tables import service_secrets
from orchestra.domain import iso_now


async def service_secret(db: Database, name: str) -> str:
    """The secret called ``name``, made (256 random bits) the first time it is asked for.

    Two processes asking at once get the same one: the insert does nothing when a row exists,
    and both read the row that won.
    """

    def work(conn: Connection) -> str:
        conn.execute(
            insert(service_secrets)
            .values(name=name, value=secrets.token_urlsafe(32), created_at=iso_now())
            .on_conflict_do_nothing(index_elements=["name"])
        )
        value = conn.execute(
            select(service_secrets.c.value).where(service_secrets.c.name == name)
        ).scalar_one()
        return str(value)

    return await db.transaction(work)
