"""The cache of model answers, stored: one ``model_cache`` row per call's key.

The key is made above (:mod:`orchestra.llm.cache`): a SHA-256 of everything that decides the
answer. Here only rows: the answer as JSON, who gave it and when it was stored. An entry older
than the TTL is never used; expired entries and those beyond the size cap are deleted oldest
first (``ix_model_cache_created``), in bounded batches, so the table stays near its cap.

A lookup is one indexed statement on the cheapest read path the engine has
(:meth:`~orchestra.db.engine.Database.read_now`: SQLite's event-loop connection). A write is
one ``INSERT … ON CONFLICT DO NOTHING``: two workers that answered the same call at once both
succeed, the first answer stays, and PostgreSQL may run the body again without harm. Expired
entries and those beyond the cap are deleted by :meth:`CacheStore.evict`, which the cache
runs every so many writes, not in each (it walks the cap's worth of the index).
"""

from __future__ import annotations

from typing import Any

import msgspec
from sqlalchemy import Connection, delete, func, select

from orchestra.db.engine import Database
from orchestra.db.prepared import insert_for
from orchestra.db.tables import model_cache
from orchestra.domain import Usage

_c = model_cache.c

#: The lookup, in each engine's placeholders: a fresh entry of the key.
_LOOKUP = {
    "sqlite": "SELECT answer FROM model_cache WHERE key = ? AND created_at >= ?",
    "postgresql": "SELECT answer FROM model_cache WHERE key = %s AND created_at >= %s",
}


class CachedAnswer(msgspec.Struct, frozen=True):
    """A model's answer as the cache keeps it."""

    text: str
    #: The model as the provider named it in its answer.
    model: str
    #: The provider (its name in [providers]) that answered.
    provider: str
    usage: Usage = msgspec.field(default_factory=Usage)


_decode = msgspec.json.Decoder(CachedAnswer).decode
_encode = msgspec.json.encode


def _fetch(conn: Any, sql: str, params: tuple[str, str]) -> Any:
    rows = conn.execute(sql, params).fetchall()
    return rows[0][0] if rows else None


class CacheStore:
    """The ``model_cache`` table."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lookup = _LOOKUP["postgresql" if db.dialect == "postgresql" else "sqlite"]

    async def get(self, key: str, fresh_since: str) -> CachedAnswer | None:
        """The answer stored under ``key`` at or after ``fresh_since`` (an ISO time as
        stored), or None."""
        sql = self._lookup
        found = await self.db.read_now(lambda conn: _fetch(conn, sql, (key, fresh_since)))
        if found is None:
            return None
        return _decode(found.encode() if isinstance(found, str) else found)

    async def put(self, key: str, answer: CachedAnswer, *, at: str) -> None:
        """Store ``answer`` under ``key`` (an answer stored already stays): one indexed
        insert, the cheapest write there is."""
        row = {
            "key": key,
            "provider": answer.provider,
            "model": answer.model,
            "answer": _encode(answer).decode(),
            "created_at": at,
        }

        def work(conn: Connection) -> None:
            insert = insert_for(conn)(model_cache).values(row)
            conn.execute(insert.on_conflict_do_nothing(index_elements=["key"]))

        await self.db.transaction(work, small=True)

    async def evict(self, *, expired_before: str, max_entries: int, limit: int) -> int:
        """Delete up to ``limit`` entries stored before ``expired_before``, then up to
        ``limit`` of the oldest beyond the newest ``max_entries``; returns how many.

        Finding the entries beyond the cap walks ``max_entries`` index entries, so this is
        not a small transaction: it runs off the event loop (SQLite's writer thread)."""

        def work(conn: Connection) -> int:
            expired = (
                select(_c.key)
                .where(_c.created_at < expired_before)
                .order_by(_c.created_at)
                .limit(limit)
            )
            gone = conn.execute(delete(model_cache).where(_c.key.in_(expired))).rowcount
            beyond = (
                select(_c.key)
                .order_by(_c.created_at.desc())  # the index's order: no sort
                .limit(limit)
                .offset(max_entries)
            )
            return int(gone + conn.execute(delete(model_cache).where(_c.key.in_(beyond))).rowcount)

        return await self.db.transaction(work)

    async def count(self) -> int:
        """How many answers are stored (fresh or not)."""
        async with self.db.read() as conn:
            return int(
                (await conn.execute(select(func.count()).select_from(model_cache))).scalar_one()
            )

    async def clear(self) -> int:
        """Delete every stored answer; returns how many."""
        return int(
            await self.db.transaction(lambda conn: conn.execute(delete(model_cache)).rowcount)
        )
