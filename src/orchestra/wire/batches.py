"""The answers of ``/api/v1/batches``: a batch, its upload's outcome, its progress, what a
cancel or retry did. (Its results are JSON lines or CSV, not a struct.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from orchestra.errors import FieldProblem

if TYPE_CHECKING:  # the service's types, for the constructors only
    from orchestra.batch_model import Batch
    from orchestra.batch_progress import Progress
    from orchestra.bulk import BulkOutcome


class RowProblem(msgspec.Struct, frozen=True):
    """Why a row was refused: its row number (1: the first data row), the line it starts on,
    and each bad field."""

    row: int
    line: int
    message: str
    fields: list[FieldProblem] = msgspec.field(default_factory=list)


class BatchOut(msgspec.Struct, frozen=True):
    """A batch: what its rows share and how its upload went. ``status``: ``loading`` while
    its rows are being read, then ``loaded``. Its rows' tasks are queued with priority
    ``priority - 2001`` (the batch lane, below every single task) and show ``priority``."""

    id: int
    template: str
    template_version: int
    model: str | None
    priority: int
    max_attempts: int | None
    timeout: float | None
    atomic: bool
    status: str
    rows: int
    invalid: int
    created_at: str
    loaded_at: str | None
    cancelled_at: str | None

    @classmethod
    def of(cls, batch: Batch) -> BatchOut:
        return cls(**msgspec.structs.asdict(batch))


class UploadOut(msgspec.Struct, frozen=True):
    """An upload's outcome: the batch, the rows read and refused, the first refused rows."""

    batch: BatchOut
    read: int
    refused: int
    problems: list[RowProblem]


class ProgressOut(msgspec.Struct, frozen=True):
    """Rows by status, the share finished (0 to 1) and the seconds left (None: unknown)."""

    batch: BatchOut
    counts: dict[str, int]
    finished: int
    progress: float
    eta_seconds: float | None

    @classmethod
    def of(cls, p: Progress) -> ProgressOut:
        return cls(BatchOut.of(p.batch), p.counts, p.finished, p.progress, p.eta_seconds)


class BatchSummaryOut(BatchOut, frozen=True):
    """A batch as the list shows it: the batch, with its rows by status, the share finished
    (0 to 1) and the seconds left (None: unknown), as its progress has them."""

    counts: dict[str, int]
    finished: int
    progress: float
    eta_seconds: float | None

    @classmethod
    def of_progress(cls, p: Progress) -> BatchSummaryOut:
        return cls(
            **msgspec.structs.asdict(p.batch),
            counts=p.counts,
            finished=p.finished,
            progress=p.progress,
            eta_seconds=p.eta_seconds,
        )


class BatchList(msgspec.Struct, frozen=True):
    """A page of batches, newest first, each with its progress; ``next_cursor`` gives the
    next page."""

    items: list[BatchSummaryOut]
    next_cursor: str | None


class ActionOut(msgspec.Struct, frozen=True):
    """What a cancel or retry did: rows changed, rows asked to stop, rows left alone."""

    changed: int
    stopping: int
    skipped: int

    @classmethod
    def of(cls, outcome: BulkOutcome) -> ActionOut:
        return cls(outcome.changed, outcome.stopping, outcome.skipped)
