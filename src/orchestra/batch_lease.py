"""An upload's lease on its batch (:mod:`orchestra.db.batches`): the request reading a keyless
batch's rows renews it every ``lease_seconds / 3`` while it reads, however slowly the body
comes; a process that dies mid-upload renews it no more, and once it lapses the reaper of
any process with workers closes the batch with the rows stored (:func:`reap_lost_uploads`),
as the request does when its upload fails. A batch with an idempotency key holds none: cut,
it stays ``loading`` until its client sends the upload again with the key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

from orchestra import logs
from orchestra.db.batches import BatchStore
from orchestra.domain import iso, now
from orchestra.errors import StorageError
from orchestra.owners import dead_among

log = logs.get("orchestra.batches")

#: The batches whose uploads this process reads now: alive, whatever their leases say (the
#: wall clock jumped forward: a laptop woke from sleep, a clock was stepped), as a process
#: knows its own tasks are (:func:`reap_lost_uploads` leaves them be).
_HELD: set[int] = set()
#: What a keyless upload cut by the service's stop left (its batch, with the rows read), for
#: the stop's 503 to say instead of "send it again" (which made a second batch of them all).
CUT_NOTE: ContextVar[str | None] = ContextVar("batch_cut_note", default=None)
#: What an upload cut midway by a bug left (its batch, with the rows read, in words), for
#: the 500 to say: "internal error" alone, and its client would send it all again as a
#: second batch.
CUT_KEPT: ContextVar[str | None] = ContextVar("batch_cut_kept", default=None)


def lease_end(lease_seconds: float | None) -> str | None:
    """When a lease taken now lapses, as stored (None: no lease)."""
    return None if lease_seconds is None else iso(now() + timedelta(seconds=lease_seconds))


@asynccontextmanager
async def held(
    store: BatchStore, batch_id: int, lease_seconds: float | None
) -> AsyncIterator[None]:
    """Hold the batch's upload lease (taken when the batch was made) while the body runs,
    renewed in the background until it ends; ``lease_seconds`` None: the batch holds none."""
    if lease_seconds is None:
        yield
        return
    _HELD.add(batch_id)
    renewer = asyncio.create_task(
        _keep(store, batch_id, lease_seconds), name=f"orchestra-upload-lease-{batch_id}"
    )
    try:
        yield
    finally:
        _HELD.discard(batch_id)
        # Ended before the upload closes its batch: a renewal written after would open it
        # again. (A renewal under way is not cut short by the cancel: it ends first.)
        renewer.cancel()
        await asyncio.wait([renewer])


async def _keep(store: BatchStore, batch_id: int, lease_seconds: float) -> None:
    """Renew every third of the lease; a renewal that failed is tried again sooner."""
    wait = lease_seconds / 3
    while True:
        await asyncio.sleep(wait)
        renewed = await _renew(store, batch_id, lease_seconds)
        if renewed == "gone":
            return
        if renewed == "reopened":
            log.warning(
                "batch.upload_reopened",
                batch_id=batch_id,
                reason="a reaper closed the batch while its upload ran (its lease lapsed: "
                "the process stalled, or could not write); its upload goes on",
            )
        wait = lease_seconds / 3 if renewed else lease_seconds / 12


async def _renew(store: BatchStore, batch_id: int, lease_seconds: float) -> str | None:
    """Renew the lease (:meth:`~orchestra.db.batches.BatchStore.renew_upload`): ``held``,
    ``reopened`` or ``gone``; None when the write was refused (logged; tried again sooner)."""
    until = iso(now() + timedelta(seconds=lease_seconds))
    try:
        return await store.renew_upload(batch_id, until)
    except StorageError as exc:
        log.warning("batch.upload_renew_failed", batch_id=batch_id, error=exc.message)
    except Exception:
        log.exception("batch.upload_renew_failed", batch_id=batch_id)
    return None


async def close_dead_uploads(store: BatchStore, me: str) -> None:
    """Close the batches whose uploads a process on this machine known dead read
    (:func:`~orchestra.owners.known_dead`: a restart after a crash), at once rather than
    when their leases lapse; ``me``: the caller's own name."""
    for owner, pid in dead_among(await store.upload_owners(me.split(":", 1)[0]), me):
        for batch in await store.close_uploads_of(owner, iso(now())):
            _lost(batch, f"the process reading its upload is gone (pid {pid})")


async def reap_lost_uploads(store: BatchStore) -> None:
    """Close the batches whose upload's lease lapsed (the process reading it died, or could
    not write for a lease), but those this process reads: each is ``loaded`` with the rows
    stored, which run as any others."""
    for batch in await store.reap_uploads(iso(now()), keep=sorted(_HELD)):
        _lost(
            batch,
            "its upload stopped renewing its lease (its process died, or could not write to "
            "the database)",
        )


def _lost(batch: dict[str, Any], reason: str) -> None:
    """Say that ``batch`` (its row) was closed for an upload that died, and why."""
    log.warning(
        "batch.upload_lost",
        batch_id=batch["id"],
        rows=batch["row_count"],
        invalid=batch["invalid_count"],
        reason=reason,
    )
