"""A batch's progress: its rows by status, the share finished and the time left."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import msgspec

from orchestra.db.batches import Tally
from orchestra.domain import TaskStatus, as_utc

if TYPE_CHECKING:
    from orchestra.batch_model import Batch

#: The statuses of a finished row's task.
_TERMINAL = (TaskStatus.SUCCEEDED.value, TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)


class Progress(msgspec.Struct, frozen=True):
    """A batch's rows by status (``invalid``: refused at upload; ``deleted``: its task was
    removed by retention), the share finished, and the seconds left at the finishing rate
    so far (None until some rows have finished)."""

    batch: Batch
    counts: dict[str, int]
    finished: int
    progress: float
    eta_seconds: float | None


#: The most a batch still loading (and not cancelled) shows as its progress: its rows so far
#: may all be done, but more may come.
LOADING_SHARE = 0.99


def progress_of(batch: Batch, tally: Tally) -> Progress:
    """A batch's progress from its tasks' tally: rows by status (with the refused and the
    deleted ones), the share finished, and the seconds left at the finishing rate so far."""
    # Every status, 0 when no row is in it (a caller reads counts["failed"] as it is).
    counts = {status.value: 0 for status in TaskStatus} | dict(tally.counts)
    tasks = sum(counts.values())
    loaded = batch.status == "loaded"
    counts["invalid"] = batch.invalid
    # Rows are counted once the upload is done: until then, its tasks so far are the rows.
    counts["deleted"] = max(0, batch.rows - batch.invalid - tasks) if loaded else 0
    finished = sum(counts[s] for s in _TERMINAL)
    wanted = batch.rows - batch.invalid if loaded else tasks
    left = counts["queued"] + counts["running"]
    # A deleted row's task had finished (retention removes finished tasks only); a loaded
    # batch with no valid row has nothing left to do.
    done = finished + counts["deleted"]
    share = done / wanted if wanted else float(loaded)
    eta = None
    if finished and tally.first_started and tally.last_finished:
        span = _seconds(tally.first_started, tally.last_finished)
        if span > 0:
            eta = round(left / (finished / span), 3)
    if not loaded and batch.cancelled_at is None:  # more rows may come to run: short of
        # done, and how long is not known (a cancelled batch's later rows are cancelled)
        share = min(share, LOADING_SHARE)
        eta = eta if left else None
    elif not left:
        eta = 0.0
    return Progress(batch, counts, finished, round(share, 6), eta)


def _seconds(start: str, end: str) -> float:
    return (
        as_utc(datetime.fromisoformat(end)) - as_utc(datetime.fromisoformat(start))
    ).total_seconds()
