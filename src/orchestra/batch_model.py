"""What a batch is: its options, its stored row, and what an upload answers."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

from orchestra.errors import NotFoundError, PayloadTooLarge
from orchestra.wire.batches import RowProblem

#: The formats a batch's rows may come in (and its results go out in).
Format = Literal["jsonl", "csv"]
_encode = msgspec.json.Encoder(order="sorted").encode


class BatchNotFound(NotFoundError):
    """No batch has this id."""

    code = "batch_not_found"


class TooManyRows(PayloadTooLarge):
    """An upload went past the most rows a batch may have (sending it again, with its
    idempotency key too, stops there again)."""


class BatchOptions(msgspec.Struct, frozen=True):
    """What every row of a batch shares (the query of ``POST /api/v1/batches``)."""

    template: str
    format: Format
    template_version: int | None = None
    model: str | None = None
    priority: int = 0
    max_attempts: int | None = None
    timeout: float | None = None
    atomic: bool = False
    idempotency_key: str | None = None

    def fingerprint(self) -> str:
        """What an idempotency key is checked against first: the options (the file's rows are
        compared as they come, with the rows the batch has: ``db.batches.add_rows``)."""
        shared = msgspec.structs.replace(self, idempotency_key=None)
        return hashlib.sha256(_encode(shared)).hexdigest()


class Batch(msgspec.Struct, frozen=True):
    """A batch as stored."""

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
    def of(cls, row: dict[str, Any]) -> Batch:
        """From a ``batches`` row."""
        options = msgspec.json.decode(row["options"])
        return cls(
            id=row["id"],
            template=row["template"],
            template_version=row["template_version"],
            model=row["model"],
            priority=row["priority"],
            max_attempts=options.get("max_attempts"),
            timeout=options.get("timeout"),
            atomic=bool(row["atomic"]),
            status=row["status"],
            rows=row["row_count"],
            invalid=row["invalid_count"],
            created_at=row["created_at"],
            loaded_at=row["loaded_at"],
            cancelled_at=row["cancelled_at"],
        )


class Uploaded(msgspec.Struct, frozen=True):
    """What an upload did: the batch, whether this request created it, how many rows it
    read and refused, and the first refused rows."""

    batch: Batch
    created: bool
    read: int
    refused: int
    problems: list[RowProblem]
