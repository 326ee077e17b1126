"""The batch operations' calls (:class:`~orchestra.client.core.Call`, as every operation's):
an upload streamed from a file, an iterable or bytes, a batch's progress, cancel, retry, and
its results read line by line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestra.client.core import TRANSFER_TIMEOUT, Call, _as, _encode, _given, _nothing
from orchestra.wire.batches import ActionOut, BatchList, ProgressOut, UploadOut

#: Bytes read from a dataset file at a time.
CHUNK = 64 * 1024
#: The formats a file's suffix names.
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def create_batch(
    template: str,
    rows: Path | bytes | Iterable[Mapping[str, Any]],
    data_format: str | None,
    idempotency_key: str | None,
    options: Mapping[str, Any],
    on_sent: Callable[[int], None] | None = None,
) -> Call[UploadOut]:
    """POST /api/v1/batches: ``rows`` are a CSV or JSON-lines file (read as it is sent, so a
    file of any size takes constant memory; its format from its suffix, .csv, .jsonl or
    .ndjson, else ``data_format``: ValueError without), that text (JSON lines unless
    ``data_format``), or parameters to send as JSON lines (one-shot, so not retried).
    ``options``: template_version, model, priority, max_attempts, timeout, atomic.
    ``on_sent`` hears the size of each piece of a file as it goes (a progress bar); a file
    sent again (its connection broke) is heard only past where the first sending got."""
    body: Callable[[], Iterator[bytes]] | None = None
    content: bytes | None = None
    replayable = True
    if isinstance(rows, Path):
        data_format = data_format or SUFFIXES.get(rows.suffix.lower())
        if data_format is None:
            raise ValueError(
                f"{rows}: the format of a file named {rows.suffix or 'without a suffix'!r} is "
                "not known; pass data_format='csv' or 'jsonl'"
            )
        path = rows
        counted = 0  # the furthest a sending reached: a resend's bytes are not heard twice

        def body() -> Iterator[bytes]:
            nonlocal counted
            at = 0
            with path.open("rb") as file:
                while chunk := file.read(CHUNK):
                    at += len(chunk)
                    if on_sent is not None and at > counted:
                        on_sent(at - counted)
                        counted = at
                    yield chunk

    elif isinstance(rows, bytes):
        content = rows
    else:
        data_format, replayable = "jsonl", False
        lines = (_encode(r) + b"\n" for r in rows)
        body = lambda: lines  # noqa: E731
    params = _given({"template": template, "format": data_format or "jsonl", **options})
    for key, value in params.items():
        if isinstance(value, bool):
            params[key] = str(value).lower()
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return Call(
        "POST",
        "/api/v1/batches",
        _as(UploadOut),
        params=params,
        content=content,
        body=body,
        replayable=replayable,
        headers=headers,
        ok=frozenset({200, 201}),
        timeout=TRANSFER_TIMEOUT,
        idempotent=idempotency_key is not None,  # a resent upload resumes
    )


def get_batch(batch_id: int) -> Call[ProgressOut]:
    return Call("GET", f"/api/v1/batches/{batch_id}", _as(ProgressOut))


def batches_page(limit: int, cursor: str | None) -> Call[BatchList]:
    params = _given({"limit": limit, "cursor": cursor})
    return Call("GET", "/api/v1/batches", _as(BatchList), params=params)


def cancel_batch(batch_id: int) -> Call[ActionOut]:
    return Call("POST", f"/api/v1/batches/{batch_id}/cancel", _as(ActionOut))


def retry_batch(batch_id: int, statuses: Sequence[str] = ("failed",)) -> Call[ActionOut]:
    """POST …/retry: the rows in ``statuses`` (failed, cancelled) queued again; one status
    may be given as a plain string."""
    params = {"statuses": [statuses] if isinstance(statuses, str) else list(statuses)}
    return Call("POST", f"/api/v1/batches/{batch_id}/retry", _as(ActionOut), params=params)


def batch_results(batch_id: int, data_format: str = "jsonl") -> Call[None]:
    """GET …/results as JSON lines (read line by line) or CSV, in input order."""
    return Call(
        "GET",
        f"/api/v1/batches/{batch_id}/results",
        _nothing,
        params={"format": data_format},
        timeout=TRANSFER_TIMEOUT,
    )


def results_format(path: Path, data_format: str | None) -> str:
    """The format results are saved to ``path`` in: ``data_format``, else CSV for a .csv
    file and JSON lines for any other."""
    return data_format or ("csv" if path.suffix.lower() == ".csv" else "jsonl")


def result_row(line: str) -> dict[str, Any] | None:
    """A results line as ``{"row", "line", "status", "result", "error"}`` (None: blank)."""
    if not line.strip():
        return None
    row: dict[str, Any] = json.loads(line)
    return row
