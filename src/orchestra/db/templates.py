"""Queries for templates registered through the API. Versions are immutable rows."""

from __future__ import annotations

import msgspec
from sqlalchemy import Connection, insert, select, update

from orchestra.db.engine import Database
from orchestra.db.tables import templates
from orchestra.domain import iso_now


class StoredTemplate(msgspec.Struct, frozen=True):
    """One registered version of a template, as stored."""

    name: str
    version: int
    body: str
    created_at: str
    deleted_at: str | None = None


class Registered(msgspec.Struct, frozen=True):
    """The outcome of a registration: the version, and whether this call created it."""

    version: int
    created: bool


class TemplateStore:
    """Registered templates in the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def all_versions(self) -> list[StoredTemplate]:
        """Every registered version of every template, by name then version."""
        query = select(templates).order_by(templates.c.name, templates.c.version)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [StoredTemplate(r.name, r.version, r.body, r.created_at, r.deleted_at) for r in rows]

    async def register(self, name: str, body: str, body_hash: str) -> Registered:
        """Store ``body`` as the next version of ``name``, unless the latest live version has
        the same body (then that version is returned, not created)."""
        latest = (
            select(templates.c.version, templates.c.body_hash, templates.c.deleted_at)
            .where(templates.c.name == name)
            .order_by(templates.c.version.desc())
            .limit(1)
        )

        def work(conn: Connection) -> Registered:
            row = conn.execute(latest).one_or_none()
            if row is not None and row.body_hash == body_hash and row.deleted_at is None:
                return Registered(version=row.version, created=False)
            version = 1 if row is None else row.version + 1
            conn.execute(
                insert(templates).values(
                    name=name,
                    version=version,
                    body=body,
                    body_hash=body_hash,
                    created_at=iso_now(),
                )
            )
            return Registered(version=version, created=True)

        return await self.db.transaction(work)

    async def delete(self, name: str) -> int:
        """Mark every live version of ``name`` deleted; returns how many."""
        stmt = (
            update(templates)
            .where(templates.c.name == name, templates.c.deleted_at.is_(None))
            .values(deleted_at=iso_now())
        )
        return await self.db.transaction(lambda conn: conn.execute(stmt).rowcount)
