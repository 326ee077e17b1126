"""An upload's lease on its batch (:mod:`orchestra.db.batches`): the request reading a keyless
batch's rows renews it every ``lease_seconds / 3`` while it reads, however slowly the body
comes; a process that dies mid-upload renews it no more, and once it lapses any process's
reaper closes the batch with the rows stored (:func:`reap_lost_uploads`), as the request does
when its upload fails. A batch with an idempotency key holds none: cut, it stays ``loading``
until its client sends the upload again with the key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from orchestra import logs
from orchestra.db import batches as db
from orchestra.db.batches import BatchStore
from orchestra.domain import iso, now
from orchestra.errors import StorageError

log = logs.get("orchestra.batches")


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
    renewer = asyncio.create_task(_keep(store, batch_id, lease_seconds))
    try:
        yield
    finally:
        # A renewal still being written is harmless: it only touches a batch still loading.
        renewer.cancel()


async def _keep(store: BatchStore, batch_id: int, lease_seconds: float) -> None:
    while True:
        await asyncio.sleep(lease_seconds / 3)
        if not await _renew(store, batch_id, lease_seconds):
            return


async def _renew(store: BatchStore, batch_id: int, lease_seconds: float) -> bool:
    """Renew the lease; False once the batch is no longer loading (nothing more to hold). A
    refused write is logged and tried again at the next turn."""
    until = iso(now() + timedelta(seconds=lease_seconds))
    try:
        return await store.db.transaction(
            lambda conn: db.renew_upload(conn, batch_id, until), small=True
        )
    except StorageError as exc:
        log.warning("batch.upload_renew_failed", batch_id=batch_id, error=exc.message)
    except Exception:
        log.exception("batch.upload_renew_failed", batch_id=batch_id)
    return True


async def reap_lost_uploads(store: BatchStore) -> None:
    """Close the batches whose upload's lease lapsed (the process reading it died): each is
    ``loaded`` with the rows stored, which run as any others."""
    for batch in await store.reap_uploads(iso(now())):
        log.warning(
            "batch.upload_lost",
            batch_id=batch["id"],
            rows=batch["row_count"],
            invalid=batch["invalid_count"],
            reason="its upload stopped renewing its lease: the process reading it died",
        )
