"""Batches: one template run over every row of a dataset (JSONL or CSV), each row a task.

The upload is read as a stream, row by row: each row's parameters are checked as a submit's
are (:meth:`TaskService.prepare`), and the rows go to the store in chunks of :data:`CHUNK`, one
transaction each, so memory stays flat however many rows come. A refused row is recorded with
its row and line number and the others go on; an ``atomic`` batch is checked whole first (the
valid rows wait in a temporary file) and queues nothing when one row is refused.

Rows are queued in the batch lane, below every single task (:mod:`orchestra.db.batches`), so a
large batch does not starve interactive work. Results come back in input order, as JSON lines
or as CSV with a result object spread over columns.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from orchestra import logs, metrics
from orchestra.batch_input import TURN_SECONDS, InputRow, csv_rows, jsonl_rows
from orchestra.batch_lease import CUT_KEPT, CUT_NOTE, held, lease_end
from orchestra.batch_model import Batch, BatchNotFound, BatchOptions, TooManyRows, Uploaded
from orchestra.batch_progress import Progress as Progress
from orchestra.batch_progress import progress_of
from orchestra.bulk import BulkOutcome, BulkService
from orchestra.db import batches as db
from orchestra.db.batch_uploads import mark_loaded
from orchestra.db.batches import LANE, BatchStore, FailedRow, ResultRow, RowRefused, RowTask
from orchestra.domain import ANONYMOUS_SCOPE, TaskStatus, iso, now, storable_id
from orchestra.errors import (
    ConflictError,
    FieldProblem,
    InvalidParams,
    InvalidRequest,
    OrchestraError,
    TemplateNotFound,
)
from orchestra.owners import process_id
from orchestra.tasks import SubmitTask, TaskService, check_model
from orchestra.templating.model import Template
from orchestra.wire.batches import RowProblem as RowProblem

#: Rows per transaction of an upload. Every other write (a claim, a step, a single task's
#: submit) waits for the one being written: 500 rows held them for 50-100 ms, and a single
#: task submitted during an upload waited that long to be claimed; 50 rows, a few ms.
CHUNK = 50
#: Rows per read of the results, and per retry's statement.
PAGE = 500
#: Most rows one batch may have.
MAX_ROWS = 1_000_000
#: Refused rows an upload's answer lists (all of them are in the results).
SHOWN_PROBLEMS = 100
#: Most columns a CSV of results spreads a result object over (the rest stay in ``result``).
MAX_RESULT_COLUMNS = 200


@dataclass
class _Reading:
    """What reading an upload found so far: the rows read, how many were refused, and the
    first :data:`SHOWN_PROBLEMS` refused ones."""

    total: int = 0
    refused: int = 0
    problems: list[RowProblem] = field(default_factory=list)

    def take(self, item: RowTask | RowProblem) -> None:
        """Count one row read."""
        self.total += 1
        if isinstance(item, RowProblem):
            self.refused += 1
            if len(self.problems) < SHOWN_PROBLEMS:
                self.problems.append(item)


#: The statuses of the rows a retry may queue again.
RETRYABLE = (TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)
_encode = msgspec.json.Encoder(order="sorted").encode
log = logs.get("orchestra.batches")


# -- the service ------------------------------------------------------------------------------


class BatchService:
    """What the API can do with batches; built per request from the runtime's parts."""

    def __init__(
        self,
        store: BatchStore,
        tasks: TaskService,
        bulk: BulkService,
        *,
        lease_seconds: float,
    ) -> None:
        self.store = store
        self.tasks = tasks
        self.bulk = bulk
        #: How long an upload holds its batch between renewals (:mod:`orchestra.batch_lease`).
        self.lease_seconds = lease_seconds

    async def upload(
        self, opts: BatchOptions, chunks: AsyncIterator[bytes], *, key_id: str | None = None
    ) -> Uploaded:
        """Read a batch's rows from ``chunks`` and queue a task for each valid one.

        Raises:
            TemplateNotFound: no such template.
            InvalidRequest: an atomic batch with a refused row (each listed, with its row
                and line numbers), or a body that cannot be read at all.
            ConflictError: the idempotency key made a batch with other options.
            PayloadTooLarge: one row over the body limit, or over :data:`MAX_ROWS` rows.
        """
        check_model(opts.model)  # the batch's, not each row's
        scope = key_id or ANONYMOUS_SCOPE
        template = await self._template(opts, scope)
        max_line = self.tasks.limits.max_body_bytes
        reader = (
            csv_rows(chunks, max_line, template)
            if opts.format == "csv"
            else jsonl_rows(chunks, max_line)
        )
        checked = self._checked(opts, template, reader)
        if opts.atomic:
            with tempfile.TemporaryFile() as spool:
                reading = await self._spool(checked, spool)
                if not reading.total:
                    raise _no_rows()
                if reading.refused:
                    raise InvalidParams(
                        f"{reading.refused} row(s) refused; an atomic batch queues none",
                        [
                            FieldProblem(f"row {p.row} (line {p.line}): {f.field}", f.message)
                            for p in reading.problems
                            for f in p.fields or [FieldProblem("row", p.message)]
                        ],
                    )
                spool.seek(0)
                batch, created = await self._open(opts, template, scope)
                async with held(self.store, batch.id, self._lease(opts)):
                    await self._load(batch.id, _replay(spool))
        else:
            # The first row before the batch: a body that cannot be read at all makes none.
            first = await anext(checked, None)
            if first is None:
                raise _no_rows()
            batch, created = await self._open(opts, template, scope)
            try:
                async with held(self.store, batch.id, self._lease(opts)):
                    reading = await self._load(batch.id, _chain(first, checked))
            except Exception as exc:  # a client gone midway too (ClientGone)
                # Nobody can finish it: no key to send the rest with, or past the row cap.
                # (Closed once its lease is no longer renewed, which would open it again.)
                if opts.idempotency_key is None or _past_the_cap(exc):
                    await self._close_cut(batch.id, exc)
                raise
            except asyncio.CancelledError:  # the service stops: its HTTP drain has ended
                if opts.idempotency_key is None:  # its 503 says what is kept, not "resend"
                    stopped = OrchestraError("the service stopped before the upload ended")
                    await self._close_cut(batch.id, stopped)
                    CUT_NOTE.set(f"{stopped.message}; do not send it again whole")
                raise
        finished = Batch.of(
            await self.store.db.transaction(lambda c: mark_loaded(c, batch.id, iso(now())))
        )
        log.info(
            "batch.loaded",
            batch_id=batch.id,
            rows=finished.rows,
            invalid=finished.invalid,
            created=created,
        )
        return Uploaded(
            batch=finished,
            created=created,
            read=reading.total,
            refused=reading.refused,
            problems=reading.problems,
        )

    async def _template(self, opts: BatchOptions, scope: str) -> Template:
        """The template version the rows are checked and queued with: the one the batch began
        with when its key resumes it (the template may have changed since: the rows ran on
        two versions), else the one asked for (None: the current).

        Raises:
            TemplateNotFound: no such template (or version; a deleted template resumes no
                batch).
            ConflictError: the resumed batch's version is no longer available.
        """
        kept = None
        if opts.idempotency_key is not None:
            kept = await self.store.by_key(scope, opts.idempotency_key)
        if kept is None or kept["request_hash"] != opts.fingerprint():  # new (or a 409)
            return await self.tasks.template(opts.template, opts.template_version)
        await self.tasks.template(opts.template)  # still offered: a deleted one resumes none
        version = int(kept["template_version"])
        try:
            return await self.tasks.template(opts.template, version, exact=True)
        except TemplateNotFound as exc:
            gone = f"its batch's template version {version} is no longer available"
            rows = int(kept["row_count"])
            state = (
                f"loaded with {rows:,} row{'' if rows == 1 else 's'}"
                if kept["status"] == "loaded"
                else "loading: its rows so far run"
            )
            raise ConflictError(
                f"the Idempotency-Key resumes batch {kept['id']} ({state}), but {gone}, so it "
                "takes no more rows; a new batch needs another key",
                fields=[FieldProblem("Idempotency-Key", gone)],
            ) from exc

    async def _close_cut(self, batch_id: int, error: Exception) -> None:
        """An upload failed midway that nobody can finish (no idempotency key to send the rest
        with, or too many rows; a body that stops being UTF-8, a client gone): the batch is
        closed with the rows read before, which run, and the error (one of ours, which its
        caller reads) says so."""
        kept = Batch.of(
            await self.store.db.transaction(lambda c: mark_loaded(c, batch_id, iso(now())))
        )
        told = error.message if isinstance(error, OrchestraError) else type(error).__name__
        log.warning("batch.upload_cut", batch_id=batch_id, rows=kept.rows, error=told)
        what = (
            f"batch {batch_id} keeps the {kept.rows} "
            f"row{'' if kept.rows == 1 else 's'} read before "
            f"(POST /api/v1/batches/{batch_id}/cancel stops them)"
        )
        # Said by the answer: an error of ours in its message; a bug's 500 in its own words.
        CUT_KEPT.set(f"{what}; do not send it again whole")
        if isinstance(error, OrchestraError):
            error.message = f"{error.message}; {what}"
            error.args = (error.message,)

    def _lease(self, opts: BatchOptions) -> float | None:
        """How long the upload holds its batch between renewals (:mod:`~orchestra.batch_lease`):
        a keyless batch is closed once its upload's process died; one with a key waits, still
        ``loading``, for its client to send the upload again."""
        return None if opts.idempotency_key else self.lease_seconds

    async def _checked(
        self, opts: BatchOptions, template: Template, rows: AsyncIterator[InputRow]
    ) -> AsyncIterator[RowTask | RowProblem]:
        """Each row checked as a submit is: a task to queue, or why not.

        Checking is CPU work on the event loop, and a body arrives faster than it is checked:
        every :data:`TURN_SECONDS` the check steps aside for one turn of the loop, so that a
        single task submitted meanwhile is not kept waiting behind a chunk of rows."""
        turn = time.perf_counter()
        async for row in rows:
            if time.perf_counter() - turn > TURN_SECONDS:
                await asyncio.sleep(0)
                turn = time.perf_counter()
            if row.row > MAX_ROWS:
                why = f"has more than {MAX_ROWS:,} rows (a batch's most)"
                raise TooManyRows(f"body: {why}", [FieldProblem("body", why)])
            if row.params is None:
                yield RowProblem(row.row, row.line, row.problem or "cannot be read")
                continue
            sub = SubmitTask(
                template=template.name,
                params=row.params,
                template_version=template.version,
                priority=opts.priority,
                model=opts.model,
                max_attempts=opts.max_attempts,
                timeout=opts.timeout,
            )
            try:
                new = await self.tasks.prepare(sub, template=template)
            except InvalidRequest as exc:
                yield RowProblem(row.row, row.line, exc.message, exc.fields)
                continue
            lane = msgspec.structs.replace(new, priority=opts.priority - LANE)
            yield RowTask(row.row, row.line, lane)

    async def _spool(self, checked: AsyncIterator[RowTask | RowProblem], spool: Any) -> _Reading:
        """Write the valid rows to ``spool`` (one JSON line each); the refused ones counted."""
        reading = _Reading()
        async for item in checked:
            reading.take(item)
            if not isinstance(item, RowProblem):
                spool.write(msgspec.json.encode(item) + b"\n")
        return reading

    async def _open(self, opts: BatchOptions, template: Template, scope: str) -> tuple[Batch, bool]:
        """The batch row: a new one, or the one this idempotency key made (to resume)."""
        values = {
            "template": template.name,
            "template_version": template.version,
            "model": opts.model,
            "priority": opts.priority,
            "options": _encode(
                {"max_attempts": opts.max_attempts, "timeout": opts.timeout}
            ).decode(),
            "atomic": int(opts.atomic),
            "status": "loading",
            "upload_expires_at": lease_end(self._lease(opts)),
            "upload_owner": None if self._lease(opts) is None else process_id(),
            "idempotency_key": opts.idempotency_key,
            "idempotency_scope": scope,
            "request_hash": opts.fingerprint(),
            "created_at": iso(now()),
        }
        row = await self.store.db.transaction(lambda c: db.create(c, values), small=True)
        if row is not None:
            return Batch.of(row), True
        key = opts.idempotency_key or ""
        existing = await self.store.db.transaction(lambda c: db.by_key(c, scope, key))
        if existing is None or existing["request_hash"] != values["request_hash"]:
            raise ConflictError(
                f"Idempotency-Key {key!r}: already used for a batch with other options",
                fields=[
                    FieldProblem("Idempotency-Key", "already used for a batch with other options")
                ],
            )
        if existing["template_version"] != template.version:  # two first uploads at once,
            # the template changed between them: sent again, this one takes the batch's
            raise ConflictError(
                f"batch {existing['id']} of this Idempotency-Key began with template version "
                f"{existing['template_version']} while this upload read version "
                f"{template.version}: send it again",
                fields=[FieldProblem("Idempotency-Key", "its batch began with another version")],
            )
        return Batch.of(existing), False

    async def _load(self, batch_id: int, items: AsyncIterator[RowTask | RowProblem]) -> _Reading:
        """Store rows in chunks of :data:`CHUNK`, one transaction each; a chunk is written
        while the next one is read and checked (at most one chunk waits in memory). When the
        body fails to be read (an error of ours), the rows read before it are stored too."""
        reading = _Reading()
        valid: list[RowTask] = []
        refused: list[RowRefused] = []
        writing: asyncio.Task[None] | None = None
        try:
            try:
                async for item in items:
                    reading.take(item)
                    if isinstance(item, RowProblem):
                        refused.append(RowRefused(item.row, item.line, _refusal(item)))
                    else:
                        valid.append(item)
                    if len(valid) + len(refused) >= CHUNK:
                        if writing is not None:
                            await writing
                        writing = asyncio.create_task(self._store_chunk(batch_id, valid, refused))
                        valid, refused = [], []
            except Exception:  # the body failed (ours, or a client gone): keep what was read
                if writing is not None:
                    await writing
                    writing = None
                await self._store_chunk(batch_id, valid, refused)
                raise
            if writing is not None:
                await writing
                writing = None
            await self._store_chunk(batch_id, valid, refused)
        finally:
            if writing is not None and not writing.done():
                writing.cancel()
        return reading

    async def _store_chunk(
        self, batch_id: int, valid: list[RowTask], refused: list[RowRefused]
    ) -> None:
        if not valid and not refused:
            return
        at = iso(now())
        queued = await self.store.db.transaction(
            lambda c: db.add_rows(c, batch_id, valid, refused, at)
        )
        if queued:
            for _ in queued:
                metrics.task_submitted(valid[0].task.template)
            self.tasks.feed.wake()
            self.tasks.scheduler.notify()

    async def get(self, batch_id: int) -> Batch:
        """A batch.

        Raises:
            BatchNotFound: no batch has this id.
        """
        row = await self.store.get(batch_id) if storable_id(batch_id) else None
        if row is None:
            raise BatchNotFound(f"no batch with id {batch_id}")
        return Batch.of(row)

    async def progress(self, batch_id: int) -> Progress:
        """A batch's rows by status, the share finished and an ETA at the finishing rate."""
        batch = await self.get(batch_id)
        return progress_of(batch, await self.store.tally(batch_id))

    async def page(self, limit: int = 50, before: int | None = None) -> list[Progress]:
        """Batches newest first, each with its progress (one grouped read for the page)."""
        batches = [Batch.of(r) for r in await self.store.page(limit, before)]
        tallies = await self.store.tallies([b.id for b in batches])
        return [progress_of(b, tallies[b.id]) for b in batches]

    async def failures(self, progress: Progress, limit: int = 10) -> list[FailedRow]:
        """The first ``limit`` failed rows of the batch ``progress`` is about (refused at
        upload, or whose task failed), in row order, each with its error; none read when its
        counts have no failure."""
        if not (progress.counts["failed"] or progress.counts["invalid"]):
            return []
        return await self.store.first_failures(progress.batch.id, limit)

    async def cancel(self, batch_id: int) -> BulkOutcome:
        """Cancel every queued or running row of the batch (running ones are asked to stop):
        the queued rows first, a page at a time, then the running ones (a stopped row's slot
        would claim a queued one, to be stopped in turn), with the queued ones again (one
        running in the first pass and queued again since, by a retry, ran again)."""
        await self.get(batch_id)
        await self.store.db.transaction(lambda c: db.mark_cancelled(c, batch_id, iso(now())))
        cancel = self.bulk.cancel_tasks
        acted: set[int] = set()  # the first pass's: not counted twice (one claimed meanwhile)
        queued = await self._walk(batch_id, (TaskStatus.QUEUED.value,), cancel, acted)
        both = (TaskStatus.QUEUED.value, TaskStatus.RUNNING.value)
        outcome = queued.plus(await self._walk(batch_id, both, cancel, skip=acted))
        log.info("batch.bulk", batch_id=batch_id, action="cancel", changed=outcome.changed)
        return outcome

    async def retry(
        self, batch_id: int, statuses: Iterable[str] = (TaskStatus.FAILED.value,)
    ) -> BulkOutcome:
        """Queue the batch's rows in ``statuses`` again: failed ones (the default), cancelled
        ones (to resume a cancelled batch: it is no longer cancelled, and rows its upload
        stores from then on are queued), or both.

        Raises:
            BatchNotFound: no batch has this id.
            InvalidRequest: a status other than failed or cancelled.
        """
        wanted = tuple(sorted({str(s) for s in statuses}))
        wrong = [s for s in wanted if s not in RETRYABLE]
        if wrong or not wanted:
            problem = "each must be failed or cancelled"
            raise InvalidRequest(f"statuses: {problem}", [FieldProblem("statuses", problem)])
        await self.get(batch_id)
        if TaskStatus.CANCELLED.value in wanted:  # resumed: no longer cancelled
            await self.store.db.transaction(lambda c: db.clear_cancelled(c, batch_id))
        outcome = await self._walk(batch_id, wanted, self.bulk.retry_tasks)
        log.info("batch.bulk", batch_id=batch_id, action="retry", changed=outcome.changed)
        return outcome

    async def _walk(
        self,
        batch_id: int,
        statuses: tuple[str, ...],
        act: Callable[[Iterable[int]], Awaitable[BulkOutcome]],
        acted: set[int] | None = None,
        *,
        skip: Collection[int] = (),
    ) -> BulkOutcome:
        """``act`` on the batch's tasks in ``statuses`` (but ``skip``), :data:`PAGE` at a
        time, in row order; the ids acted on are added to ``acted``."""
        outcome = BulkOutcome()
        after = 0
        while True:
            pairs = await self.store.task_ids_after(batch_id, statuses, after, PAGE)
            if not pairs:
                break
            ids = [task_id for _, task_id in pairs if task_id not in skip]
            if ids:
                outcome = outcome.plus(await act(ids))
            if acted is not None:
                acted.update(ids)
            after = pairs[-1][0]
        return outcome

    async def results(self, batch_id: int) -> AsyncIterator[list[ResultRow]]:
        """The batch's rows in input order, :data:`PAGE` per read."""
        await self.get(batch_id)
        return self._pages(batch_id)

    async def _pages(self, batch_id: int) -> AsyncIterator[list[ResultRow]]:
        after = 0
        while True:
            page = await self.store.results_after(batch_id, after, PAGE)
            if not page:
                return
            yield page
            after = page[-1].row


def _past_the_cap(error: Exception) -> bool:
    """Whether the upload stopped at :data:`MAX_ROWS` (sending it again stops there again)."""
    return isinstance(error, TooManyRows)


def _no_rows() -> InvalidRequest:
    problem = "has no rows (CSV: a header, then one record per row; JSON lines: an object a line)"
    return InvalidRequest(f"body: {problem}", [FieldProblem("body", problem)])


def _refusal(problem: RowProblem) -> str:
    return _encode(
        {"type": "invalid_params", "message": problem.message, "fields": problem.fields}
    ).decode()


async def _replay(spool: Any) -> AsyncIterator[RowTask]:
    """The spooled valid rows of an atomic batch, as they were checked."""
    for line in spool:
        yield msgspec.json.decode(line, type=RowTask)


async def _chain(
    first: RowTask | RowProblem | None, rest: AsyncIterator[RowTask | RowProblem]
) -> AsyncIterator[RowTask | RowProblem]:
    """``first``, then ``rest``."""
    if first is None:
        return
    yield first
    async for item in rest:
        yield item
