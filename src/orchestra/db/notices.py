"""PostgreSQL's notifications, sent inside the transaction of the change (delivered at commit):
tasks were queued (wake the workers of every process), tasks changed (wake whoever waits on
them: ``?wait``, event streams). SQLite has none; there :meth:`Database.watch` notices other
processes' commits by itself.

A payload starts with the sending process's token (``conn.info["orchestra_token"]``, set by
:class:`~orchestra.db.postgres_engine.PostgresDatabase` on each connection), so a process
skips its own: it has told itself already.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import Connection

QUEUED_CHANNEL = "orchestra_tasks"
CHANGED_CHANNEL = "orchestra_changes"
#: PostgreSQL refuses a payload of 8,000 bytes; past this many, "any task may have changed".
MAX_PAYLOAD = 7000
#: The payload's detail for "any task may have changed".
ANY = "*"


def _send(conn: Connection, channel: str, detail: str = "") -> None:
    token = conn.info.get("orchestra_token", "")
    payload = f"{token} {detail}" if detail else token
    raw = conn.connection.driver_connection
    raw.execute("SELECT pg_notify(%s, %s)", (channel, payload))  # type: ignore[union-attr]


def queued(conn: Connection) -> None:
    """On PostgreSQL, wake the workers of every other process at this transaction's commit
    (identical notifications in one transaction arrive as one)."""
    if conn.dialect.name == "postgresql":
        _send(conn, QUEUED_CHANNEL)


def changed(conn: Connection, task_ids: Collection[int]) -> None:
    """On PostgreSQL, tell every other process at this transaction's commit that these tasks
    changed (:data:`ANY` when they are too many to name)."""
    if conn.dialect.name != "postgresql" or not task_ids:
        return
    named = ",".join(str(i) for i in task_ids)
    _send(conn, CHANGED_CHANNEL, named if len(named) <= MAX_PAYLOAD else ANY)


def parse_changed(detail: str) -> list[int] | None:
    """The task ids a change notification names; None for "any task"."""
    if detail.strip() == ANY:
        return None
    return [int(part) for part in detail.split(",") if part.strip().isdigit()]
