"""Dashboard sessions: which API key a browser logged in with, until when.

The cookie holds a random token; the table holds only its SHA-256, the key's id and the
expiry, so neither a copy of the database nor of a backup lets anyone make a session. Logging
out deletes the row; revoking the key ends the session at its next request (the key is looked
up among the active ones each time).
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import Connection, delete, insert, select

from orchestra.auth import digest
from orchestra.db.engine import Database
from orchestra.db.tables import ui_sessions
from orchestra.domain import iso, now


class SessionStore:
    """Sessions of the dashboard, in the database every process shares."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, key_id: str, hours: float) -> str:
        """A new session for the key ``key_id``, lasting ``hours``; returns its token (the
        cookie's value). Expired sessions are deleted on the way."""
        token = secrets.token_urlsafe(32)
        at = now()
        row = {
            "digest": digest(token),
            "key_id": key_id,
            "created_at": iso(at),
            "expires_at": iso(at + timedelta(hours=hours)),
        }

        def work(conn: Connection) -> None:
            conn.execute(delete(ui_sessions).where(ui_sessions.c.expires_at < iso(at)))
            conn.execute(insert(ui_sessions).values(row))

        await self.db.transaction(work)
        return token

    async def key_id(self, token: str | None) -> str | None:
        """The key a session token stands for; None when there is no such session or it
        has expired."""
        if not token:
            return None
        query = select(ui_sessions.c.key_id).where(
            ui_sessions.c.digest == digest(token), ui_sessions.c.expires_at > iso(now())
        )
        async with self.db.read() as conn:
            found = (await conn.execute(query)).scalar_one_or_none()
        return None if found is None else str(found)

    async def end(self, token: str | None) -> None:
        """Delete a session (logging out)."""
        if token:
            stmt = delete(ui_sessions).where(ui_sessions.c.digest == digest(token))
            await self.db.transaction(lambda conn: conn.execute(stmt))
