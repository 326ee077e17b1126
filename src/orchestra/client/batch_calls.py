"""The batch operations' calls (:class:`~orchestra.client.core.Call`, as every operation's):
an upload streamed from a file, an iterable or bytes, a batch's progress, cancel, retry, and
its results read line by line."""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, TypedDict

from orchestra.client.core import (
    RETRY_STATUSES,
    TRANSFER_TIMEOUT,
    Call,
    _as,
    _given,
    _nothing,
    page_size,
)
from orchestra.client.errors import UnsendableValue
from orchestra.client.json_body import encode
from orchestra.wire.batches import ActionOut, BatchList, ProgressOut, UploadOut

#: Bytes read from a dataset file at a time.
CHUNK = 64 * 1024
#: Bytes of rows from an iterable kept in memory before they are spooled to disk.
SPOOLED = 8 * 1024 * 1024
#: The formats a file's suffix names.
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class BatchOptions(TypedDict, total=False):
    """The options of a batch besides its template and rows, as keywords of
    ``create_batch`` (:class:`~orchestra.wire.batches.BatchOut` says what each means).
    ``timeout`` takes seconds or a ``timedelta``."""

    template_version: int | None
    model: str | None
    priority: int
    max_attempts: int | None
    timeout: float | timedelta | None
    atomic: bool


def options_query(options: Mapping[str, Any]) -> dict[str, Any]:
    """A batch's options as its query values.

    Raises:
        TypeError: a keyword that is no option (a misspelt one was dropped without a word).
    """
    for name in options:
        if name not in BatchOptions.__annotations__:
            raise TypeError(f"create_batch() got an unexpected keyword argument {name!r}")
    query: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, timedelta):
            value = value.total_seconds()
        query[name] = str(value).lower() if isinstance(value, bool) else value
    return query


class EncodedRows:
    """Rows already encoded as JSON lines into a spool (:func:`spooled_async`: an async
    iterable's, read on the loop); :func:`create_batch` sends it and closes it."""

    def __init__(self, spool: IO[bytes]) -> None:
        self.spool = spool


@contextmanager
def create_batch(
    template: str,
    rows: Path | bytes | Iterable[Mapping[str, Any]] | EncodedRows,
    data_format: str | None,
    idempotency_key: str | None,
    options: Mapping[str, Any],
    on_sent: Callable[[int], None] | None = None,
) -> Iterator[Call[UploadOut]]:
    """POST /api/v1/batches, for the ``with`` block that sends it: ``rows`` are a CSV or
    JSON-lines file (read as it is sent, so a file of any size takes constant memory; its
    format from its suffix, .csv, .jsonl or .ndjson, else ``data_format``: ValueError
    without), that text (JSON lines unless ``data_format``), or parameters to send as JSON
    lines (every row encoded before the upload starts, so that a row JSON cannot carry
    raises UnsendableValue naming it and nothing is sent; the encoded rows are dropped when
    the block ends). ``options``: template_version, model, priority, max_attempts, timeout,
    atomic. ``on_sent`` hears the size of each piece of a file or of rows as it goes (a
    progress bar); a body sent again (its connection broke) is heard only past where the
    first sending got.

    Without ``idempotency_key`` a 503 is not tried again: the service keeps the rows it read
    before it failed (its message names the batch), and a second sending would queue them
    twice. With one, a second sending resumes the batch.
    """
    query = options_query(options)  # before a row is read
    body: Callable[[], Iterator[bytes]] | None = None
    content: bytes | None = None
    spool: IO[bytes] | None = None
    if isinstance(rows, Path):
        path = rows
        data_format = data_format or SUFFIXES.get(rows.suffix.lower())
        if data_format is None:
            raise ValueError(
                f"{rows}: the format of a file named {rows.suffix or 'without a suffix'!r} is "
                "not known; pass data_format='csv' or 'jsonl'"
            )
        body = _heard(lambda: _file_pieces(path), on_sent)
    elif isinstance(rows, bytes):
        content = rows
    elif isinstance(rows, EncodedRows):
        data_format, spool = "jsonl", rows.spool
        encoded = spool
        body = _heard(lambda: _spool_pieces(encoded), on_sent)
    elif isinstance(rows, (str, bytearray, memoryview, Mapping)) or not isinstance(rows, Iterable):
        raise TypeError(
            f"rows must be a Path, bytes or an iterable of parameter dicts, not "
            f"{type(rows).__name__} (a file: Path(...); its text: bytes; one row: [row])"
        )
    else:
        data_format = "jsonl"
        spool = _spooled(rows)
        kept = spool
        body = _heard(lambda: _spool_pieces(kept), on_sent)
    params = _given({"template": template, "format": data_format or "jsonl", **query})
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    try:
        yield Call(
            "POST",
            "/api/v1/batches",
            _as(UploadOut),
            params=params,
            content=content,
            body=body,
            headers=headers,
            ok=frozenset({200, 201}),
            timeout=TRANSFER_TIMEOUT,
            idempotent=idempotency_key is not None,  # a resent upload resumes
            retried=RETRY_STATUSES if idempotency_key else frozenset({429}),
        )
    finally:
        if spool is not None:
            spool.close()


def _spooled(rows: Iterable[Mapping[str, Any]]) -> IO[bytes]:
    """``rows`` as JSON lines, every one encoded (and checked) before anything is sent: a
    row JSON cannot carry found midway would cut an upload whose first rows the service
    keeps, in a batch the caller never learns of. Kept in memory up to :data:`SPOOLED`
    bytes, beyond on disk, so the upload can also be sent again.

    Raises:
        UnsendableValue: a row JSON cannot carry, named by its number (from 1, as the service
            numbers rows) and its place in the row.
    """
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOLED)
    try:
        for number, row in enumerate(rows, 1):
            _write_row(spool, number, row)
    except BaseException:  # that, the caller's iterable failing, a type msgspec refuses
        spool.close()
        raise
    return spool


async def spooled_async(rows: AsyncIterable[Mapping[str, Any]]) -> EncodedRows:
    """:func:`_spooled` for an async iterable: its rows encoded as they come (on the loop),
    every one before anything is sent.

    Raises:
        UnsendableValue: a row JSON cannot carry, named by its number and its place.
        TypeError: a row that is not a dict.
    """
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOLED)
    try:
        number = 0
        async for row in rows:
            number += 1
            _write_row(spool, number, row)
    except BaseException:
        spool.close()
        raise
    return EncodedRows(spool)


def _write_row(spool: IO[bytes], number: int, row: object) -> None:
    """Row ``number`` (from 1, as the service numbers rows) as a JSON line."""
    if not isinstance(row, Mapping):
        raise TypeError(f"row {number} is a {type(row).__name__}, not a dict of params")
    try:
        spool.write(encode(row, root="the row") + b"\n")
    except UnsendableValue as exc:
        raise UnsendableValue(f"row {number}: {exc}") from None
    except TypeError as exc:  # a value of a type JSON has no form for (msgspec's words)
        raise TypeError(f"row {number}: {exc}") from None


def _pieces(file: IO[bytes]) -> Iterator[bytes]:
    while piece := file.read(CHUNK):
        yield piece


def _file_pieces(path: Path) -> Iterator[bytes]:
    with path.open("rb") as file:
        yield from _pieces(file)


def _spool_pieces(spool: IO[bytes]) -> Iterator[bytes]:
    spool.seek(0)
    yield from _pieces(spool)


def _heard(
    pieces: Callable[[], Iterator[bytes]], on_sent: Callable[[int], None] | None
) -> Callable[[], Iterator[bytes]]:
    """A body sent from its start on each call, ``on_sent`` hearing the size of each piece;
    a body sent again (its connection broke) is heard only past where the first got."""
    counted = 0

    def body() -> Iterator[bytes]:
        nonlocal counted
        at = 0
        for piece in pieces():
            at += len(piece)
            if on_sent is not None and at > counted:
                on_sent(at - counted)
                counted = at
            yield piece

    return body


def get_batch(batch_id: int) -> Call[ProgressOut]:
    return Call("GET", f"/api/v1/batches/{batch_id}", _as(ProgressOut))


def batches_page(limit: int, cursor: str | None) -> Call[BatchList]:
    params = _given({"limit": page_size(limit), "cursor": cursor})
    return Call("GET", "/api/v1/batches", _as(BatchList), params=params)


def cancel_batch(batch_id: int) -> Call[ActionOut]:
    return Call("POST", f"/api/v1/batches/{batch_id}/cancel", _as(ActionOut))


def retry_batch(batch_id: int, statuses: Sequence[str] = ("failed",)) -> Call[ActionOut]:
    """POST …/retry: the rows in ``statuses`` (failed, cancelled) queued again; one status
    may be given as a plain string."""
    params = {"statuses": [statuses] if isinstance(statuses, str) else list(statuses)}
    if not params["statuses"]:  # no value in the query: the service's default, failed
        raise ValueError("statuses is empty: name the rows to queue again (failed, cancelled)")
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


def results_path(path: Path | str) -> Path:
    """Where results are saved: ``path``, a ``Path`` or a string, as ``open`` takes."""
    return Path(path)


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
