"""Queries for templates: those registered through the API (versions are immutable rows), and
the file template versions that tasks were queued with."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from sqlalchemy import Connection, insert, select, tuple_, update

from orchestra.db.engine import Database
from orchestra.db.prepared import insert_for
from orchestra.db.tables import file_template_versions, tasks, templates
from orchestra.domain import ACTIVE, iso_now


class StoredTemplate(msgspec.Struct, frozen=True):
    """One registered version of a template, as stored."""

    name: str
    version: int
    body: str
    created_at: str
    deleted_at: str | None = None


class StoredFileVersion(msgspec.Struct, frozen=True):
    """A version of a file template, as stored for the tasks queued with it."""

    name: str
    version: int
    body: str
    body_hash: str
    origin: str


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

    async def keep_file_versions(self, versions: Sequence[StoredFileVersion]) -> None:
        """Store file template versions for the tasks queued with them, in one transaction
        (once per body; a body stored already is marked stored now, so that a file changed
        back to an earlier body without a new version counts as the latest again)."""
        if not versions:
            return
        at = iso_now()
        rows = [{**msgspec.structs.asdict(v), "stored_at": at} for v in versions]

        def store(conn: Connection) -> None:
            insert = insert_for(conn)(file_template_versions)
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["name", "version", "body_hash"],
                    set_={"stored_at": insert.excluded.stored_at},
                ),
                rows,
            )

        await self.db.transaction(store)

    async def pinned_file_versions(self) -> list[StoredFileVersion]:
        """The stored file template versions that queued or running tasks pinned, the latest
        stored body of each version first (a file may change without its version changing)."""
        unfinished = select(tasks.c.template, tasks.c.template_version).where(
            tasks.c.status.in_(sorted(s.value for s in ACTIVE))
        )
        f = file_template_versions.c
        query = (
            select(f.name, f.version, f.body, f.body_hash, f.origin)
            .where(tuple_(f.name, f.version).in_(unfinished))
            .order_by(f.stored_at.desc())
        )
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [StoredFileVersion(r.name, r.version, r.body, r.body_hash, r.origin) for r in rows]
