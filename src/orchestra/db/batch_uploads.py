"""A batch's upload in the database: its lease while its rows are read, and its close.

**An upload's lease.** While its rows are read, a batch is ``loading``; a keyless one's
``upload_expires_at`` is renewed by the request reading them (:func:`renew_upload`), however
slowly its body comes. A process that dies mid-upload renews it no more: once it lapses, any
process's reaper closes the batch with the rows stored (:func:`close_lost_uploads`), as the
request does when its upload fails. Its rows ran all along. A batch with an idempotency key
has no lease: cut, it stays ``loading`` until its client sends the upload again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Select, func, select, update

from orchestra.db import bulk
from orchestra.db.tables import batch_rows, batches


def mark_loaded(conn: Connection, batch_id: int, at: str) -> dict[str, Any]:
    """The upload ended: count the batch's rows and refused rows, and mark it ``loaded``.
    Returns the batch."""
    total, invalid = conn.execute(
        select(
            func.count(),
            func.count(batch_rows.c.error),
        ).where(batch_rows.c.batch_id == batch_id)
    ).one()
    row = (
        conn.execute(
            update(batches)
            .where(batches.c.id == batch_id)
            .values(
                status="loaded",
                row_count=total,
                invalid_count=invalid,
                loaded_at=func.coalesce(batches.c.loaded_at, at),
                upload_expires_at=None,
                upload_owner=None,
            )
            .returning(*batches.c)
        )
        .mappings()
        .one()
    )
    return dict(row)


def renew_upload(conn: Connection, batch_id: int, until: str) -> str:
    """The batch's upload is alive (its request asks, while it reads): hold it until
    ``until``. Returns ``held``; or ``reopened`` when a reaper had closed it (its lease lapsed
    while the process stalled): it is ``loading`` again, its tally dropped, so that nobody
    takes a batch whose rows still come for finished; ``gone`` when there is no such batch."""
    held = conn.execute(
        update(batches)
        .where(batches.c.id == batch_id, batches.c.status == "loading")
        .values(upload_expires_at=until)
    )
    if held.rowcount:
        return "held"
    reopened = conn.execute(
        update(batches)
        .where(batches.c.id == batch_id, batches.c.status == "loaded")
        .values(status="loading", upload_expires_at=until, loaded_at=None)
    )
    if not reopened.rowcount:
        return "gone"
    bulk.unsettle(conn, batches.c.id == batch_id)
    return "reopened"


def close_uploads_of(conn: Connection, owner: str, at: str) -> list[dict[str, Any]]:
    """Close the loading batches whose uploads process ``owner`` read, known dead now, as
    :func:`close_lost_uploads` closes those whose lease lapsed. Returns them."""
    return _close(conn, select(batches.c.id).where(batches.c.upload_owner == owner), at)


def close_lost_uploads(
    conn: Connection, at: str, keep: Sequence[int] = (), limit: int = 100
) -> list[dict[str, Any]]:
    """Close the batches whose upload's lease lapsed before ``at`` (its process died), but
    those in ``keep`` (the reaping process's own uploads): each is marked ``loaded`` with the
    rows stored (:func:`mark_loaded`). Their rows are locked, and those locked skipped
    (PostgreSQL), so two reapers never close the same batch. Returns the batches closed."""
    lost = (
        select(batches.c.id)
        .where(batches.c.upload_expires_at < at, batches.c.idempotency_key.is_(None))
        .order_by(batches.c.upload_expires_at)
        .limit(limit)
    )
    if keep:
        lost = lost.where(batches.c.id.not_in(list(keep)))
    return _close(conn, lost, at)


def _close(conn: Connection, chosen: Select[Any], at: str) -> list[dict[str, Any]]:
    """Mark ``loaded`` the loading batches ``chosen`` selects (their ids), each with the rows
    stored (:func:`mark_loaded`); their rows locked, those locked elsewhere skipped."""
    ids = chosen.where(batches.c.status == "loading").with_for_update(skip_locked=True)
    return [mark_loaded(conn, batch_id, at) for batch_id in conn.execute(ids).scalars().all()]
