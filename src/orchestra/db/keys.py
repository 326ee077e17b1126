"""Queries for API keys. Only a key's SHA-256 is stored, never the key."""

from __future__ import annotations

import unicodedata
from typing import Any, NoReturn

from sqlalchemy import Connection, insert, select, update

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
            InvalidRequest: the name is empty (or only spaces), is not one line of at most
                :data:`MAX_NAME` characters without spaces at its ends, or is another key's
                id (``keys revoke`` takes both).
            ConflictError: a key (even a revoked one) already has this name.
        """
        if not name.strip():
            raise InvalidRequest("a key needs a name: who or what it is for")
        _check_name(name)
        row, token = _new_row(name, scope)

        def work(conn: Connection) -> ApiKey | bool:
            owner = conn.execute(select(api_keys).where(api_keys.c.id == name)).first()
            if owner is not None:
                return ApiKey(owner.id, owner.name, owner.scope, owner.created_at)
            if _name_taken(conn, name):
                return False
            conn.execute(insert(api_keys).values(row))
            return True

        done = await self.db.transaction(work)
        if isinstance(done, ApiKey):
            _refuse_name(f"is the id of another key ({done.id}, named {done.name!r})")
        if not done:
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
        """Revoke one key, by id or name (only by id with ``by_id``); it stops working within
        the service's refresh time. A string that is a key's id, revoked or not, names that
        key alone, never a key named like it (a key named like another's id, from before
        names were checked: both were revoked, and revoking an id twice revoked the other);
        names are unique.

        Raises:
            NotFoundError: no key with that name or id is active.
        """
        now = iso_now()
        owner = select(api_keys.c.id).where(api_keys.c.id == name_or_id)

        def work(conn: Connection) -> Any:
            by_its_id = by_id or conn.execute(owner).first() is not None
            match = api_keys.c.id if by_its_id else api_keys.c.name
            stmt = (
                update(api_keys)
                .where(match == name_or_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
                .returning(*_SHOWN)
            )
            return conn.execute(stmt).first()

        r = await self.db.transaction(work)
        if r is None:
            raise NotFoundError(f"no active key named {name_or_id!r}")
        return ApiKey(r.id, r.name, r.scope, r.created_at, now)


#: The columns of a key that are shown (never its digest).
_SHOWN = (api_keys.c.id, api_keys.c.name, api_keys.c.scope, api_keys.c.created_at)
#: The longest name a key may have.
MAX_NAME = 100
#: The kinds of character a name may not hold: control and format characters (a newline, a
#: tab, a right-to-left override that shows a name as another), line and paragraph
#: separators, surrogates (bytes a terminal could not decode), private and unassigned ones.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
#: Format characters that join what a person reads as one symbol (👩‍💻), allowed.
_JOINERS = frozenset({"\u200c", "\u200d"})


def _check_name(name: str) -> None:
    """Refuse a name that is not a short line of text: ``keys list`` prints it in a column
    and ``keys revoke`` takes it as typed.

    Raises:
        InvalidRequest: naming the field ``name``.
    """
    if any(unicodedata.category(c) in _UNPRINTABLE and c not in _JOINERS for c in name):
        _refuse_name("must be one line of printable text")
    if len(name) > MAX_NAME:
        _refuse_name(f"must be at most {MAX_NAME} characters, not {len(name)}")
    if name != name.strip():
        _refuse_name("must not begin or end with a space")


def _refuse_name(problem: str) -> NoReturn:
    raise InvalidRequest(f"name: {problem}", [FieldProblem("name", problem)])


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
