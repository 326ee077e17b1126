"""/api/v1/batches: run a template over every row of a dataset, follow it, collect results.

The upload's body is the data itself (JSON lines or CSV, read as a stream); what every row
shares (template, model, priority, options) comes in the query.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import InternalServerException
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.response import Stream

from orchestra.api import idempotency
from orchestra.api.openapi import errors
from orchestra.api.runtime import Runtime
from orchestra.api.schemas import NUMBER
from orchestra.api.scope import location
from orchestra.auth import Caller
from orchestra.batch_model import BatchOptions, Format
from orchestra.batch_output import results_stream
from orchestra.batches import BatchService
from orchestra.domain import first_page
from orchestra.errors import ClientGone, FieldProblem, InvalidRequest
from orchestra.wire.batches import ActionOut as ActionOut
from orchestra.wire.batches import BatchList as BatchList
from orchestra.wire.batches import BatchOut as BatchOut
from orchestra.wire.batches import BatchSummaryOut as BatchSummaryOut
from orchestra.wire.batches import ProgressOut as ProgressOut
from orchestra.wire.batches import UploadOut as UploadOut

_encode = msgspec.json.Encoder().encode
#: Content types an upload's format is read from (``?format=`` wins).
_FORMATS: dict[str, Format] = {
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/json-lines": "jsonl",
    "application/x-jsonlines": "jsonl",
    "text/csv": "csv",
}
#: The upload's body in the OpenAPI document (the handler reads it raw, so Litestar cannot).
_UPLOAD_BODY = RequestBody(
    description="The dataset as UTF-8 text, read as a stream (no size limit; each row is "
    "capped by [limits] max_body_bytes). Its format comes from ?format=, else from "
    "Content-Type: text/csv, or one of application/x-ndjson, application/jsonl, "
    "application/json-lines, application/x-jsonlines for JSON lines.",
    required=True,
    content={
        "text/csv": OpenAPIMediaType(
            schema=Schema(
                type=OpenAPIType.STRING,
                description="A header naming the template's parameters, then one record per "
                "row (a quoted cell may span lines; an empty cell takes the default).",
            ),
            example='text,n\nalpha,1\n"two\nlines",2\n',
        ),
        **{
            media: OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.STRING,
                    description="One JSON object of parameters a line (blank lines "
                    'skipped), e.g. {"text": "alpha", "n": 1}',
                ),
            )
            for media in ("application/x-ndjson", "application/jsonl")
        },
    },
)


@dataclasses.dataclass
class UploadOperation(Operation):
    """The upload's operation in the OpenAPI document, with its body: the handler reads the
    body raw, as a stream, so Litestar has nothing to describe it from."""

    def __post_init__(self) -> None:
        self.request_body = _UPLOAD_BODY


@dataclasses.dataclass
class ResultsOperation(Operation):
    """The results' operation in the OpenAPI document: a 200 is JSON lines or CSV (Litestar
    documents the route's one media type)."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            ok.content["text/csv"] = OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.STRING,
                    description="A header (row, line, status, error, result, then a "
                    "result.<key> column per key of the result objects), then a record per row.",
                )
            )


def provide(runtime: NamedDependency[Runtime]) -> BatchService:
    """The batch service, from the runtime's store, task service and bulk actions."""
    return runtime.batches


def _upload_format(given: Format | None, content_type: str) -> Format:
    if given is not None:
        return given
    found = _FORMATS.get(content_type.split(";")[0].strip().lower())
    if found is None:
        problem = "send ?format=jsonl or csv, or Content-Type application/x-ndjson or text/csv"
        raise InvalidRequest(f"format: {problem}", [FieldProblem("format", problem)])
    return found


class BatchController(Controller):
    """Batches: a template run over every row of a dataset."""

    path = "/api/v1/batches"
    tags = ["batches"]
    dependencies = {"batches": Provide(provide, sync_to_thread=False)}  # noqa: RUF012

    @post(
        "/",
        opt={"scope": "submit"},
        status_code=201,
        summary="Run a template over a dataset",
        request_max_body_size=None,  # read as a stream, row by row; rows are capped instead
        operation_class=UploadOperation,
        responses={
            200: ResponseSpec(
                UploadOut,
                description="The batch this idempotency key made (resumed: rows it lacked added)",
                generate_examples=False,
            ),
            **errors(400, 404, 409, 413, 422, 507),
        },
    )
    async def create(
        self,
        request: Request[Caller, Any, Any],
        batches: NamedDependency[BatchService],
        template: Annotated[
            str, QueryParameter(min_length=1, max_length=255, description="The template's name.")
        ],
        template_version: Annotated[
            int | None, QueryParameter(ge=1, le=2**53, description="Run this version.")
        ] = None,
        model: Annotated[
            str | None,
            QueryParameter(min_length=1, max_length=255, description="Model for every row."),
        ] = None,
        priority: Annotated[
            int, QueryParameter(ge=-1000, le=1000, description="Orders batches among themselves.")
        ] = 0,
        max_attempts: Annotated[
            int | None, QueryParameter(ge=1, le=100, description="Attempts per row.")
        ] = None,
        timeout: Annotated[
            float | None, QueryParameter(gt=0, le=86_400, description="Seconds per attempt.")
        ] = None,
        atomic: Annotated[
            bool, QueryParameter(description="Refuse the whole batch on one bad row.")
        ] = False,
        format: Annotated[
            Literal["jsonl", "csv"] | None,
            QueryParameter(description="The body's format (else from Content-Type)."),
        ] = None,
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(
                name=idempotency.HEADER,
                description=f"{idempotency.HEADER_DESCRIPTION} Resumes the same batch.",
            ),
        ] = None,
    ) -> Response[UploadOut]:
        """Read the body's rows (JSON lines, or CSV with a header naming the parameters) and
        queue a task for each valid one. 201 with the new batch; 200 when the idempotency key
        made it before (rows it already has are skipped: a resumed upload). A refused row is
        listed with its row and line numbers and the others go on; with ``atomic=true`` one
        refused row refuses the batch (422, each refused row listed; nothing queued)."""
        idempotency.sent_once(request.headers)
        opts = BatchOptions(
            template=template,
            format=_upload_format(format, request.headers.get("content-type", "")),
            template_version=template_version,
            model=model,
            priority=priority,
            max_attempts=max_attempts,
            timeout=timeout,
            atomic=atomic,
            idempotency_key=idempotency.header_key(idempotency_key),
        )
        uploaded = await batches.upload(opts, _body(request), key_id=request.user.key_id)
        body = UploadOut(
            BatchOut.of(uploaded.batch), uploaded.read, uploaded.refused, uploaded.problems
        )
        return Response(
            body,
            status_code=201 if uploaded.created else 200,
            headers={"Location": location(request, f"{self.path}/{uploaded.batch.id}")},
        )

    @get("/", summary="List batches", responses=errors(400))
    async def list_batches(
        self,
        batches: NamedDependency[BatchService],
        limit: Annotated[int, QueryParameter(ge=1, le=500, description="Page size.")] = 50,
        cursor: Annotated[
            str | None,
            QueryParameter(pattern=NUMBER, description="next_cursor of the previous page."),
        ] = None,
    ) -> BatchList:
        """Batches, newest first, each with its rows by status, the share finished and an
        ETA (as its progress has them)."""
        found = await batches.page(limit + 1, None if cursor is None else int(cursor))
        page, last = first_page(found, limit)
        return BatchList(
            items=[BatchSummaryOut.of_progress(p) for p in page],
            next_cursor=str(last.batch.id) if last else None,
        )

    @get("/{batch_id:int}", summary="A batch's progress", responses=errors(400, 404))
    async def get_batch(
        self, batch_id: FromPath[int], batches: NamedDependency[BatchService]
    ) -> ProgressOut:
        """The batch, its rows by status, the share finished and an ETA."""
        return ProgressOut.of(await batches.progress(batch_id))

    @post(
        "/{batch_id:int}/cancel",
        status_code=200,
        opt={"scope": "submit"},
        summary="Cancel a batch",
        responses=errors(400, 404, 507),
    )
    async def cancel(
        self, batch_id: FromPath[int], batches: NamedDependency[BatchService]
    ) -> ActionOut:
        """Cancel the batch's queued rows; running ones are asked to stop."""
        return ActionOut.of(await batches.cancel(batch_id))

    @post(
        "/{batch_id:int}/retry",
        status_code=200,
        opt={"scope": "submit"},
        summary="Retry a batch's failed (or cancelled) rows",
        responses=errors(400, 404, 507),
    )
    async def retry(
        self,
        batch_id: FromPath[int],
        batches: NamedDependency[BatchService],
        statuses: Annotated[
            list[Literal["failed", "cancelled"]] | None,
            QueryParameter(
                description="The rows to queue again, by their task's status (repeat to give "
                "both; default failed). cancelled resumes a cancelled batch."
            ),
        ] = None,
    ) -> ActionOut:
        """Queue the batch's failed rows again; with ``statuses=cancelled`` (or both), its
        cancelled rows too."""
        return ActionOut.of(await batches.retry(batch_id, statuses or ("failed",)))

    @get(
        "/{batch_id:int}/results",
        summary="A batch's results, in input order",
        media_type="application/x-ndjson",
        responses=errors(400, 404),
        operation_class=ResultsOperation,
    )
    async def results(
        self,
        request: Request[Caller, Any, Any],
        batch_id: FromPath[int],
        batches: NamedDependency[BatchService],
        format: Annotated[
            Literal["jsonl", "csv"] | None,
            QueryParameter(description="jsonl or csv (else from Accept; default jsonl)."),
        ] = None,
    ) -> Stream:
        """Each row: ``row``, ``status`` (a task's, ``invalid`` or ``deleted``), ``result``
        and ``error``. CSV spreads a result object over columns (``result.<key>``)."""
        accept = request.headers.get("accept", "")
        chosen = format or ("csv" if "text/csv" in accept else "jsonl")
        return await results_stream(batches, batch_id, chosen)


async def _body(request: Request[Caller, Any, Any]) -> AsyncIterator[bytes]:
    """An upload's body as it arrives; a client gone before its end is a
    :class:`~orchestra.errors.ClientGone` (Litestar raises its 500 exception)."""
    try:
        async for chunk in request.stream():
            yield chunk
    except InternalServerException as exc:
        if exc.detail != "client disconnected prematurely":  # "stream consumed": a bug of ours
            raise
        raise ClientGone("the client went away before the upload ended") from None
