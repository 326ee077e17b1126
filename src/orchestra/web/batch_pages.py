"""Batches: the list (each with its progress), one batch (its rows by status, its first failed
rows with their errors, cancel, retry the failed rows, the results to download)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, Stream, Template

from orchestra.api.scope import runtime_of
from orchestra.batch_output import error_text, results_stream
from orchestra.batches import Progress
from orchestra.bulk import BulkOutcome
from orchestra.db.batches import FailedRow
from orchestra.domain import TaskStatus, first_page
from orchestra.web.forms import whole
from orchestra.web.notices import NOTICE_COOKIE, notice_cookie, notice_text, notice_value
from orchestra.web.render import links, page
from orchestra.web.views import duration

#: Batches on one page of the list.
PAGE_SIZE = 25
#: Failed rows a batch's page shows (the results download has them all).
FAILURES_SHOWN = 10
#: Rows per second between a live batch page's refreshes (see :func:`refresh_seconds`).
ROWS_PER_SECOND = 20_000
#: The status of an answer that tells htmx to stop polling (a batch with nothing to follow).
STOP_POLLING = 286


def refresh_seconds(rows: int) -> int:
    """How often a live batch page fetches its body again, in seconds: 2, or one per
    :data:`ROWS_PER_SECOND` rows when that is more, up to a minute (its counts are read over
    every row, so a bigger batch is read less often)."""
    return max(2, min(60, rows // ROWS_PER_SECOND))


def _eta(seconds: float | None) -> str | None:
    """The time left in words, or None when unknown."""
    return None if seconds is None else duration(seconds * 1000)


def _error_text(row: FailedRow) -> str:
    """A failed row's error as one line (as the CSV download's error cell has it)."""
    if row.error is None:
        return ""
    try:
        return error_text(msgspec.json.decode(row.error))
    except msgspec.DecodeError:
        return row.error


class BatchPages(Controller):
    """Batches: read by anyone who may read; cancelled and retried with the submit scope."""

    path = "/batches"

    @get("/", name="ui.batches")
    async def batches(
        self, request: Request[Any, Any, Any], before: FromQuery[str] = ""
    ) -> Template:
        """Batches, newest first, each with its progress (``before``: older than that id)."""
        older_than = whole(before, "before") if before else None
        found = await runtime_of(request.scope).batches.page(PAGE_SIZE + 1, older_than)
        shown, last = first_page(found, PAGE_SIZE)
        return page(
            request,
            "batches.html",
            section="batches",
            rows=[{"p": p, "eta": _eta(p.eta_seconds), "so_far": _so_far(p)} for p in shown],
            older=last.batch.id if last else None,
            paged=older_than is not None,
        )

    @get("/{batch_id:int}", name="ui.batch")
    async def batch(self, request: Request[Any, Any, Any], batch_id: FromPath[int]) -> Template:
        """A batch: what its rows share, its rows by status, its first failed rows; live
        while rows are queued or running."""
        context = await _batch(request, batch_id)
        flashed = request.cookies.get(NOTICE_COOKIE)
        return page(
            request,
            "batch.html",
            section="batches",
            refresh_seconds=refresh_seconds(max(context["b"].rows, context["so_far"])),
            notice=notice_text(flashed),
            cookies=[notice_cookie(request, "")] if flashed is not None else None,
            **context,
        )

    @get("/{batch_id:int}/body")
    async def body(self, request: Request[Any, Any, Any], batch_id: FromPath[int]) -> Template:
        """A batch's page without its frame (what the live page swaps in); once nothing is
        left to follow, with status 286, htmx's "stop polling"."""
        context = await _batch(request, batch_id)
        status = 200 if context["live"] else STOP_POLLING
        return page(request, "_batch_body.html", status_code=status, **context)

    @get("/{batch_id:int}/results")
    async def results(
        self,
        batch_id: FromPath[int],
        request: Request[Any, Any, Any],
        format: FromQuery[Literal["jsonl", "csv"]] = "jsonl",
    ) -> Stream:
        """Every row's outcome, in input order: CSV or JSON lines (as the API's results)."""
        return await results_stream(runtime_of(request.scope).batches, batch_id, format)

    @get(["/{batch_id:int}/cancel", "/{batch_id:int}/retry"])
    async def form_page(self, request: Request[Any, Any, Any], batch_id: FromPath[int]) -> Redirect:
        """No page of their own (the forms POST): the batch's page."""
        return Redirect(links(request).ui(f"/batches/{batch_id}"), status_code=303)

    @post("/{batch_id:int}/cancel", opt={"scope": "submit"}, status_code=303)
    async def cancel(self, request: Request[Any, Any, Any], batch_id: FromPath[int]) -> Redirect:
        """Cancel the batch's queued rows; running ones are asked to stop."""
        done = await runtime_of(request.scope).batches.cancel(batch_id)
        return _done(request, batch_id, "cancel", done)

    @post("/{batch_id:int}/retry", opt={"scope": "submit"}, status_code=303)
    async def retry(self, request: Request[Any, Any, Any], batch_id: FromPath[int]) -> Redirect:
        """Queue the batch's failed rows again."""
        done = await runtime_of(request.scope).batches.retry(batch_id)
        return _done(request, batch_id, "retry", done)


def _so_far(progress: Progress) -> int:
    """The rows a batch still uploading has queued so far (its row count comes at the end)."""
    return sum(progress.counts[s.value] for s in TaskStatus)


async def _batch(request: Request[Any, Any, Any], batch_id: int) -> dict[str, Any]:
    """What a batch's page shows."""
    service = runtime_of(request.scope).batches
    progress = await service.progress(batch_id)
    failures = await service.failures(progress, FAILURES_SHOWN)
    counts, batch = progress.counts, progress.batch
    return {
        "p": progress,
        "b": batch,
        "so_far": _so_far(progress),
        "live": bool(counts["queued"] or counts["running"] or batch.status == "loading"),
        "eta": _eta(progress.eta_seconds),
        "failures": [{"row": f, "error": _error_text(f)} for f in failures],
    }


def _done(
    request: Request[Any, Any, Any], batch_id: int, action: str, outcome: BulkOutcome
) -> Redirect:
    """Back to the batch's page, which says once what the action did."""
    return Redirect(
        links(request).ui(f"/batches/{batch_id}"),
        status_code=303,
        cookies=[notice_cookie(request, notice_value(action, outcome))],
    )
