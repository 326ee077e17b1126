"""PostgreSQL's notifications, sent by the transaction of the change (delivered at commit):
tasks were queued (wake the workers of every process), tasks changed in a way that may end
their attempts (wake whoever waits on them: ``?wait``, event streams), tasks progressed (a
claim, a step: wake the event streams and live views, not a wait for a task's end). SQLite
has none; there :meth:`Database.watch` notices other processes' commits by itself.

Transaction bodies mark what to send (:func:`queued`, :func:`changed`); the engine sends it
with the COMMIT, in one round trip (:func:`send_and_commit`). A payload starts with the
sending process's token (``conn.info["orchestra_token"]``, set by
:class:`~orchestra.db.postgres_engine.PostgresDatabase` on each connection), so a process
skips its own: it has told itself already.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import Connection

QUEUED_CHANNEL = "orchestra_tasks"
CHANGED_CHANNEL = "orchestra_changes"
PROGRESS_CHANNEL = "orchestra_progress"
#: Every channel a process listens on.
CHANNELS = (QUEUED_CHANNEL, CHANGED_CHANNEL, PROGRESS_CHANNEL)
#: PostgreSQL refuses a payload of 8,000 bytes; past this many, "any task may have changed".
MAX_PAYLOAD = 7000
#: The payload's detail for "any task may have changed".
ANY = "*"


_QUEUED = "orchestra_queued"
_CHANGED = "orchestra_changed"
_PROGRESSED = "orchestra_progressed"


def queued(conn: Connection) -> None:
    """On PostgreSQL, wake the workers of every other process at this transaction's commit."""
    if conn.dialect.name == "postgresql":
        conn.info[_QUEUED] = True


def changed(conn: Connection, task_ids: Collection[int], *, progress: bool = False) -> None:
    """On PostgreSQL, tell every other process at this transaction's commit that these tasks
    changed: in a way that may end their attempts, or (``progress``) that leaves them running.
    A task with both in one transaction is told as changed."""
    if conn.dialect.name == "postgresql" and task_ids:
        conn.info.setdefault(_PROGRESSED if progress else _CHANGED, set()).update(task_ids)


def begin(conn: Connection) -> None:
    """Forget what an earlier transaction on this connection was to send."""
    for mark in (_QUEUED, _CHANGED, _PROGRESSED):
        conn.info.pop(mark, None)


def send_and_commit(conn: Connection) -> None:
    """Send what this transaction was to send and commit it, in one round trip: at most one
    notification per channel (:data:`ANY` when the tasks are too many to name), then COMMIT,
    as one simple query (a NOTIFY is delivered at its transaction's commit). A transaction
    with nothing to send is left to commit as usual; psycopg's own COMMIT afterwards finds
    no transaction open and sends nothing."""
    notes: list[tuple[str, str]] = []
    token = conn.info.get("orchestra_token", "")
    if conn.info.pop(_QUEUED, False):
        notes.append((QUEUED_CHANNEL, token))
    ids: set[int] = conn.info.pop(_CHANGED, None) or set()
    progressed: set[int] = (conn.info.pop(_PROGRESSED, None) or set()) - ids
    for channel, group in ((CHANGED_CHANNEL, ids), (PROGRESS_CHANNEL, progressed)):
        if group:
            named = ",".join(str(i) for i in sorted(group))
            detail = named if len(named) <= MAX_PAYLOAD else ANY
            notes.append((channel, f"{token} {detail}"))
    if notes:
        # NOTIFY takes its payload as a literal: a token (hex), task ids, commas or "*".
        sql = "".join(f"NOTIFY {channel}, '{_checked(payload)}'; " for channel, payload in notes)
        # No parameters: psycopg sends it by the simple query protocol, which takes several
        # statements at once (the extended protocol, one).
        raw = conn.connection.driver_connection
        raw.execute(sql + "COMMIT", prepare=False)  # type: ignore[union-attr]


def _checked(payload: str) -> str:
    """``payload``, which must need no quoting in a literal."""
    if "'" in payload or "\\" in payload:
        raise ValueError(f"a notification's payload needs no quotes: {payload!r}")
    return payload


def parse_changed(detail: str) -> list[int] | None:
    """The task ids a change notification names; None for "any task"."""
    if detail.strip() == ANY:
        return None
    return [int(part) for part in detail.split(",") if part.strip().isdigit()]
