"""Queries for API keys. Only a key's SHA-256 is stored, never the key."""

from __future__ import annotations

from sqlalchemy import Connection, insert, or_, select, update

from orchestra.auth import ApiKey, Scope, digest, new_token
from orchestra.db.engine import Database
from orchestra.db.tables import api_keys
from orchestra.domain import iso_now
from orchestra.errors import ConflictError, FieldProblem, InvalidRequest, NotFoundError


class KeyStore:
    """API keys in the database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, name: str, scope: Scope) -> tuple[ApiKey, str]:
        """Make a key; returns it and the token, which is shown once and never stored.

        Raises:
            InvalidRequest: the name is empty (or only spaces).
            ConflictError: a key (even a revoked one) already has this name.
        """
        if not name.strip():
            raise InvalidRequest("a key needs a name: who or what it is for")
        row, token = _new_row(name, scope)

        def work(conn: Connection) -> bool:
            if _name_taken(conn, name):
                return False
            conn.execute(insert(api_keys).values(row))
            return True

        if not await self.db.transaction(work):
            raise ConflictError(
                f"a key named {name!r} exists already",
                fields=[FieldProblem("name", "is taken by another key")],
            )
        return ApiKey(row["id"], name, scope, row["created_at"]), token

    async def create_if_none_active(self, name: str, scope: Scope) -> tuple[ApiKey, str] | None:
        """Make a key only if no key is active; returns it and its token, or None.

        The check and the insert are one transaction, so two services starting together on
        one database make one key between them. Revoked keys do not count. When a revoked
        key holds ``name`` already, the new key is named ``<name>-<its id>``.
        """
        row, token = _new_row(name, scope)
        active = select(api_keys.c.id).where(api_keys.c.revoked_at.is_(None)).limit(1)

        def work(conn: Connection) -> str | None:
            if conn.execute(active).first() is not None:
                return None
            chosen = f"{name}-{row['id']}" if _name_taken(conn, name) else name
            conn.execute(insert(api_keys).values({**row, "name": chosen}))
            return chosen

        chosen = await self.db.transaction(work)
        if chosen is None:
            return None
        return ApiKey(row["id"], chosen, scope, row["created_at"]), token

    async def all(self) -> list[ApiKey]:
        """Every key, revoked ones too, oldest first."""
        query = select(
            api_keys.c.id,
            api_keys.c.name,
            api_keys.c.scope,
            api_keys.c.created_at,
            api_keys.c.revoked_at,
        ).order_by(api_keys.c.created_at)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [ApiKey(r.id, r.name, r.scope, r.created_at, r.revoked_at) for r in rows]

    async def active_digests(self) -> dict[str, tuple[str, ApiKey]]:
        """Keys not revoked, by id: (digest, key)."""
        query = select(api_keys).where(api_keys.c.revoked_at.is_(None))
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return {r.id: (r.digest, ApiKey(r.id, r.name, r.scope, r.created_at)) for r in rows}

    async def revoke(self, name_or_id: str, *, by_id: bool = False) -> ApiKey:
        """Revoke a key by name or id (only by id with ``by_id``: a key may be named like
        another key's id); it stops working within the service's refresh time.

        Raises:
            NotFoundError: no key with that name or id is active.
        """
        now = iso_now()
        match = (
            api_keys.c.id == name_or_id
            if by_id
            else or_(api_keys.c.name == name_or_id, api_keys.c.id == name_or_id)
        )
        stmt = (
            update(api_keys)
            .where(match, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=now)
            .returning(api_keys.c.id, api_keys.c.name, api_keys.c.scope, api_keys.c.created_at)
        )
        rows = await self.db.transaction(lambda conn: conn.execute(stmt).all())
        if not rows:
            raise NotFoundError(f"no active key named {name_or_id!r}")
        r = rows[0]
        return ApiKey(r.id, r.name, r.scope, r.created_at, now)


def _new_row(name: str, scope: Scope) -> tuple[dict[str, str], str]:
    """A new key's row (its digest, never the token) and the token to hand out once."""
    key_id, token = new_token()
    row = {
        "id": key_id,
        "name": name,
        "scope": scope,
        "digest": digest(token),
        "created_at": iso_now(),
    }
    return row, token


def _name_taken(conn: Connection, name: str) -> bool:
    """Whether a key, revoked or not, has this name (names stay unique forever)."""
    return conn.execute(select(api_keys.c.id).where(api_keys.c.name == name)).first() is not None
