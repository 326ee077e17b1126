"""The asyncio client: each method sends one of :mod:`orchestra.client.core`'s calls with
``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx

from orchestra.client import batch_calls, core, schedule_calls, webhook_calls
from orchestra.client.core import Call, Registered, RetryPolicy
from orchestra.client.errors import ClientClosed, ClientError, ConnectionFailed
from orchestra.client.follow import TASK_FINISHED, Follow, Poll, ReconnectPolicy
from orchestra.domain import TaskStatus
from orchestra.lines import aiter_lines
from orchestra.schedules import ScheduleSpec
from orchestra.wire.batches import ActionOut, BatchSummaryOut, ProgressOut, UploadOut
from orchestra.wire.events import FeedEvent, TaskEvent
from orchestra.wire.schedules import ScheduleOut
from orchestra.wire.schemas import (
    HealthOut,
    ModelsOut,
    TaskOut,
    TaskSummaryOut,
    TemplateOut,
    ValidationOut,
)
from orchestra.wire.tasks import SubmitTask
from orchestra.wire.webhooks import DeliveryOut, WebhookCreated, WebhookOut

T = TypeVar("T")


#: A call through a connection opened on an event loop that has closed since.
LOOP_CLOSED = (
    "this AsyncClient kept a connection made on an event loop that has closed since (each "
    "asyncio.run() ends its own): make the client inside the loop that uses it, or keep one loop"
)


class AsyncClient:
    """An asyncio client of an Orchestra service.

    Args:
        url: The service's base URL (default: ORCHESTRA_URL, else http://127.0.0.1:8000).
        api_key: Sent as ``Authorization: Bearer`` (default: ORCHESTRA_API_KEY).
        timeout: Seconds for each request (long polls and event streams set their own).
        stream_timeout: Seconds an event stream may stay silent before it fails with
            :class:`~orchestra.client.errors.ConnectionFailed` (the server sends a heartbeat
            every 15 s while nothing happens).
        retry: How 429 and 503 answers are tried again.
        reconnect: How an event stream that drops (the service restarted) is opened again
            after its last event (``ReconnectPolicy(window=0)``: never).
        sleep: What waits between tries and reconnects (tests pass their own).
        transport: An httpx transport to send through instead of the network.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        stream_timeout: float = core.STREAM_SILENCE,
        retry: RetryPolicy | None = None,
        reconnect: ReconnectPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = core.base_url(url)
        self.retry_policy = retry or RetryPolicy()
        self.reconnect_policy = reconnect or ReconnectPolicy()
        self._stream_timeout = core.stream_timeout(stream_timeout)
        self._sleep = sleep
        #: Whether the service has answered this client: a wait whose first poll cannot
        #: connect then waits out a restart, rather than taking it for a wrong URL.
        self._answered = False
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=core.auth_headers(api_key),
            timeout=timeout,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # -- sending -----------------------------------------------------------------------------

    async def _open(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        """Send ``call``, again after a 429 or 503 as the policy allows, or after its
        connection broke if it may be sent twice (``Call.resendable``); the final answer (an
        error answer's body read, a streamed one's not)."""
        if self._http.is_closed:
            raise ClientClosed()
        tries, broke = 0, False  # broke: a try's connection broke after the request went out
        while True:
            tries += 1
            try:
                body = None if call.body is None else _chunks(call.body())
                response = await self._http.send(call.request(self._http, body), stream=stream)
                self._answered = True
                if response.status_code in call.ok and stream:
                    return response
                await response.aread()
            except (httpx.TransportError, RuntimeError) as exc:
                if self._http.is_closed:  # closed meanwhile (another thread, a shutdown)
                    raise ClientClosed() from exc
                if isinstance(exc, RuntimeError):
                    if "Event loop is closed" in str(exc):  # a kept connection's loop ended
                        raise ClientError(LOOP_CLOSED) from exc
                    raise
                resend = core.resend_delay(self.retry_policy, tries, call, exc, broke_before=broke)
                if resend is None:
                    failed = core.connection_failed(self.url, call, exc, broke_before=broke)
                    raise failed from exc
                broke = broke or isinstance(exc, core.BROKEN)
                await self._sleep(resend)
                continue
            delay = core.retry_delay(self.retry_policy, tries, call, response)
            if delay is None:
                if response.status_code not in call.ok:
                    raise core.error_of(response)
                return response
            await self._sleep(delay)

    async def _send(self, call: Call[T]) -> T:
        return core.answer(call, await self._open(call))

    async def _follow(
        self, follow: Follow, task_id: int | None = None
    ) -> AsyncIterator[core.SseMessage]:
        """The stream's events over as many connections as it takes: one that drops is
        opened again after the last event seen (:mod:`orchestra.client.follow`); ``task_id``:
        the task whose stream it is (asked after an answer that ended without an event)."""
        while True:
            try:
                call = replace(follow.call(), timeout=self._stream_timeout)
                response = await self._open(call, stream=True)
            except ClientError as exc:
                await self._sleep(follow.retry_in(exc))
                continue
            follow.opened()
            reader = core.SseReader()
            over: bool | None = False
            dropped: ClientError
            try:
                async for line in aiter_lines(response):
                    follow.heard(line)
                    message = reader.line(line)
                    if message is not None:
                        follow.seen(message)
                        yield message
            except httpx.TimeoutException as exc:  # silent for stream_timeout: given up
                raise ConnectionFailed(self.url, str(exc) or type(exc).__name__, cut=True) from exc
            except httpx.TransportError as exc:
                dropped = ConnectionFailed(self.url, str(exc) or type(exc).__name__, cut=True)
            else:
                over = follow.over()
                if over:
                    return
                dropped = ConnectionFailed(self.url, "the stream ended early")
            finally:
                await response.aclose()
            if over is None and task_id is not None:  # ended without an event: is it over?
                try:
                    if core.finished(await self.get_task(task_id)):
                        follow.last_look()
                        continue
                except ClientError as exc:  # a 401 (a key revoked) is raised by retry_in
                    dropped = exc
            await self._sleep(follow.retry_in(dropped))

    # -- tasks -------------------------------------------------------------------------------

    async def submit(
        self,
        task: SubmitTask | str,
        params: Mapping[str, Any] | None = None,
        **options: Unpack[core.SubmitOptions],
    ) -> TaskOut:
        """Submit a task: a :class:`~orchestra.wire.tasks.SubmitTask`, or a template's name with
        its params and the other fields as keywords (``priority``, ``model``, ``delay``,
        ``idempotency_key`` …: :class:`~orchestra.client.core.SubmitOptions`)."""
        return await self._send(core.submit(core.submission(task, params, options)))

    async def get_task(self, task_id: int) -> TaskOut:
        """The task with its steps and attempts."""
        return await self._send(core.get_task(task_id))

    async def wait(self, task_id: int, timeout: float | None = None) -> TaskOut:
        """The task once it is finished (long polls of at most a minute each), or as it is
        after ``timeout`` seconds (None: wait as long as it takes). A restart of the service
        meanwhile is waited out, as an event stream's is (``reconnect``'s window), also when
        it begins the wait: unless this client was never answered (a wrong URL fails at
        once)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = Poll(self.url, self.reconnect_policy, reached=self._answered)
        while True:
            left = core.MAX_WAIT if deadline is None else deadline - time.monotonic()
            try:
                task = await self._send(core.get_task(task_id, left, core.wait_margin(self._http)))
            except ClientError as exc:  # the service restarting: polled again, as a stream
                await self._sleep(poll.retry_in(exc, deadline))
                continue
            poll.answered()
            if core.finished(task) or left <= 0:
                return task

    async def cancel(self, task_id: int) -> TaskOut:
        """Cancel a queued or running task (Conflict when it had finished)."""
        return await self._send(core.cancel(task_id))

    async def retry(self, task_id: int) -> TaskOut:
        """Queue a failed or cancelled task again (Conflict for any other status)."""
        return await self._send(core.retry(task_id))

    async def list_tasks(
        self,
        *,
        status: TaskStatus | str | None = None,
        template: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[TaskSummaryOut]:
        """Every task (of ``status``, of ``template``), newest first, a page at a time."""
        async for item in self._pages(
            lambda cursor: core.tasks_page(status, template, page_size, cursor)
        ):
            yield item

    async def task_events(self, task_id: int, after: int = 0) -> AsyncIterator[TaskEvent]:
        """The task's events (after the ``seq`` ``after``) as they happen, ending after
        ``task.finished``; a dropped connection is resumed after the last event seen."""
        follow = Follow(
            self.url,
            lambda position: core.task_events(task_id, position or 0),
            after,
            self.reconnect_policy,
            end=TASK_FINISHED,
        )
        async for message in self._follow(follow, task_id):
            yield core.task_event(message)

    async def events(
        self,
        *,
        template: str | None = None,
        types: str | Iterable[str] | None = None,
        after: int | None = None,
    ) -> AsyncIterator[FeedEvent]:
        """Every task's events (of ``template``, of ``types``) as they happen, without end;
        from after the event ``id`` ``after`` (0: every event kept; None: the next one); a
        dropped connection is resumed after the last event seen."""
        chosen = None if types is None else core.words(types)  # read once: each reconnect
        follow = Follow(
            self.url,
            lambda position: core.feed(template, chosen, position),
            after,
            self.reconnect_policy,
            end=None,
        )
        async for message in self._follow(follow):
            yield core.feed_event(message)

    # -- templates ---------------------------------------------------------------------------

    async def list_templates(self) -> list[TemplateOut]:
        """Every template offered for new tasks, at its current version."""
        return await self._send(core.list_templates())

    async def get_template(self, name: str, version: int | None = None) -> TemplateOut:
        """A template (its current version, or ``version``)."""
        return await self._send(core.get_template(name, version))

    async def template_versions(self, name: str) -> list[TemplateOut]:
        """Every version of a template, oldest first."""
        return await self._send(core.template_versions(name))

    async def validate_template(self, source: str | bytes | Path) -> ValidationOut:
        """Check YAML (text, or a file) as a template: every problem, with positions."""
        return await self._send(core.validate_template(core.yaml_text(source)))

    async def register_template(self, source: str | bytes | Path) -> Registered:
        """Register YAML (text, or a file) as its template's next version (Unprocessable,
        with ``problems``, when it is invalid)."""
        return await self._send(core.register_template(core.yaml_text(source)))

    async def delete_template(self, name: str) -> None:
        """Stop offering a registered template for new tasks."""
        await self._send(core.delete_template(name))

    async def reload_templates(self) -> list[TemplateOut]:
        """Make the service read its template folders again."""
        return await self._send(core.reload_templates())

    # -- schedules ---------------------------------------------------------------------------

    async def create_schedule(
        self, spec: ScheduleSpec | None = None, **fields: Unpack[schedule_calls.ScheduleFields]
    ) -> ScheduleOut:
        """Make a schedule: a :class:`~orchestra.schedules.ScheduleSpec`, or its fields."""
        return await self._send(
            schedule_calls.create_schedule(spec or schedule_calls.spec_of(fields))
        )

    async def list_schedules(self, page_size: int = 100) -> list[ScheduleOut]:
        """Every schedule, by name (read ``page_size`` at a time)."""
        return [s async for s in self._pages(lambda c: schedule_calls.schedules_page(page_size, c))]

    async def _pages(self, page: Callable[[str | None], core.Call[Any]]) -> AsyncIterator[Any]:
        """The items of every page of a list, a page at a time, following ``next_cursor``
        to the last."""
        cursor: str | None = None
        while True:
            got = await self._send(page(cursor))
            for item in got.items:
                yield item
            if got.next_cursor is None:
                return
            cursor = got.next_cursor

    async def get_schedule(self, ref: str | int) -> ScheduleOut:
        """A schedule (by name or id) with its next and latest ticks."""
        return await self._send(schedule_calls.get_schedule(ref))

    async def update_schedule(
        self, ref: str | int, **changes: Unpack[schedule_calls.ScheduleFields]
    ) -> ScheduleOut:
        """Change the fields given (``enabled=False`` pauses; ``cron=None`` clears it)."""
        return await self._send(
            schedule_calls.update_schedule(ref, schedule_calls.changes_of(changes))
        )

    async def delete_schedule(self, ref: str | int) -> None:
        """Delete a schedule; the tasks it made stay."""
        await self._send(schedule_calls.delete_schedule(ref))

    async def run_schedule(self, ref: str | int) -> TaskOut:
        """Submit the task a tick of the schedule would, now (not a tick: its next tick
        stays); paused or not."""
        return await self._send(schedule_calls.run_schedule(ref))

    # -- webhooks ----------------------------------------------------------------------------

    async def create_webhook(
        self,
        url: str,
        event_types: str | Iterable[str] | None = None,
        template: str | None = None,
        *,
        enabled: bool = True,
    ) -> WebhookCreated:
        """Subscribe ``url`` to task events; the answer holds the signing secret, once.
        ``enabled=False`` creates it paused (no deliveries until it is enabled)."""
        body = webhook_calls.new_webhook(url, event_types, template, enabled)
        return await self._send(webhook_calls.create_webhook(body))

    async def list_webhooks(self, page_size: int = 100) -> list[WebhookOut]:
        """Every subscription, oldest first, without secrets (read ``page_size`` at a time)."""
        return [w async for w in self._pages(lambda c: webhook_calls.webhooks_page(page_size, c))]

    async def get_webhook(self, webhook_id: int) -> WebhookOut:
        """One subscription."""
        return await self._send(webhook_calls.get_webhook(webhook_id))

    async def update_webhook(
        self, webhook_id: int, **changes: Unpack[webhook_calls.WebhookFields]
    ) -> WebhookOut:
        """Change the fields given: ``url``, ``event_types``, ``template`` (None: every
        template), ``enabled`` (False: no deliveries are made, pending ones wait)."""
        return await self._send(webhook_calls.update_webhook(webhook_id, changes))

    async def roll_webhook_secret(
        self, webhook_id: int, overlap: float = 86400.0
    ) -> WebhookCreated:
        """A new signing secret (shown this once); for ``overlap`` seconds deliveries are
        signed with the old one too, so receivers can move over meanwhile."""
        return await self._send(webhook_calls.roll_webhook_secret(webhook_id, overlap))

    async def delete_webhook(self, webhook_id: int) -> None:
        """Delete a subscription and its deliveries."""
        await self._send(webhook_calls.delete_webhook(webhook_id))

    async def webhook_deliveries(
        self, webhook_id: int, page_size: int = 50
    ) -> AsyncIterator[DeliveryOut]:
        """A subscription's deliveries, newest first, a page at a time."""
        async for item in self._pages(
            lambda cursor: webhook_calls.deliveries_page(webhook_id, page_size, cursor)
        ):
            yield item

    async def redeliver(self, webhook_id: int, delivery_id: int) -> DeliveryOut:
        """Send a delivery again now, with the same id and body; the delivery, queued."""
        return await self._send(webhook_calls.redeliver(webhook_id, delivery_id))

    async def callback_secret(self) -> str:
        """The secret that signs deliveries to tasks' ``callback_url``."""
        return await self._send(webhook_calls.callback_secret())

    # -- batches ---------------------------------------------------------------------------

    async def create_batch(
        self,
        template: str,
        rows: Path | bytes | Iterable[Mapping[str, Any]] | AsyncIterable[Mapping[str, Any]],
        *,
        data_format: str | None = None,
        idempotency_key: str | None = None,
        on_sent: Callable[[int], None] | None = None,
        **options: Unpack[batch_calls.BatchOptions],
    ) -> UploadOut:
        """Run ``template`` over every row: a CSV or JSON-lines file (streamed; its format from
        its suffix unless ``data_format`` says), that text as bytes, or an iterable or async
        iterable of parameter dicts (every row encoded on the loop before the upload starts).
        ``options``: ``template_version``, ``model``, ``priority``,
        ``max_attempts``, ``timeout``, ``atomic``. The same ``idempotency_key`` again resumes
        the batch (rows it has are skipped). ``on_sent`` hears the size of each piece of a
        file (or of the encoded rows) as it is sent (a progress bar).

        Raises:
            ValueError: a row JSON cannot carry (UnsendableValue: nothing is sent), or a
                file's format is not known.
            TypeError: rows of the wrong kind (a str, a dict; a row that is not a dict, or one
                holding a value JSON has no form for), or a keyword that is no option."""
        batch_calls.options_query(options)  # a keyword that is no option: before any row
        given = await batch_calls.spooled_async(rows) if isinstance(rows, AsyncIterable) else rows
        with batch_calls.create_batch(
            template, given, data_format, idempotency_key, options, on_sent
        ) as call:
            return await self._send(call)

    async def get_batch(self, batch_id: int) -> ProgressOut:
        """A batch's progress: its rows by status, the share finished, an ETA."""
        return await self._send(batch_calls.get_batch(batch_id))

    async def list_batches(self, page_size: int = 100) -> AsyncIterator[BatchSummaryOut]:
        """Every batch, newest first, with its rows by status and progress, a page at a
        time."""
        async for item in self._pages(lambda c: batch_calls.batches_page(page_size, c)):
            yield item

    async def cancel_batch(self, batch_id: int) -> ActionOut:
        """Cancel a batch's queued rows; running ones are asked to stop."""
        return await self._send(batch_calls.cancel_batch(batch_id))

    async def retry_batch(
        self, batch_id: int, *, statuses: Sequence[str] = ("failed",)
    ) -> ActionOut:
        """Queue a batch's rows in ``statuses`` again: its failed ones (the default), its
        cancelled ones (``("cancelled",)``: resume a cancelled batch), or both."""
        return await self._send(batch_calls.retry_batch(batch_id, statuses))

    async def batch_results(self, batch_id: int) -> AsyncIterator[dict[str, Any]]:
        """Each row's ``row``, ``line``, ``status``, ``result`` and ``error``, in input order,
        read as they arrive."""
        response = await self._open(batch_calls.batch_results(batch_id), stream=True)
        try:
            async for line in aiter_lines(response):
                row = batch_calls.result_row(line)
                if row is not None:
                    yield row
        except httpx.TransportError as exc:
            raise ConnectionFailed(self.url, str(exc) or type(exc).__name__, cut=True) from exc
        finally:
            await response.aclose()

    async def save_batch_results(
        self, batch_id: int, path: Path | str, *, data_format: str | None = None
    ) -> None:
        """Write a batch's results to ``path``, in input order: CSV for a .csv file (a result
        object's keys spread over ``result.<key>`` columns), else JSON lines, unless
        ``data_format`` says. Through ``<path>.part``: a cut download leaves no ``path``."""
        path = batch_calls.results_path(path)
        call = batch_calls.batch_results(batch_id, batch_calls.results_format(path, data_format))
        partial = path.with_name(path.name + ".part")
        response = await self._open(call, stream=True)
        try:
            with partial.open("wb") as out:
                async for chunk in response.aiter_bytes():
                    out.write(chunk)
        except httpx.TransportError as exc:
            raise ConnectionFailed(self.url, str(exc) or type(exc).__name__, cut=True) from exc
        finally:
            await response.aclose()
        partial.replace(path)

    # -- the service -------------------------------------------------------------------------

    async def health(self, check_now: bool = False) -> HealthOut:
        """Whether the service and what it depends on answer (``check_now``: the providers
        and the database checked first, else as last checked; a provider's details need a
        ``read`` key once keys exist)."""
        return await self._send(core.health(check_now))

    async def models(self, check_now: bool = False) -> ModelsOut:
        """Every model name with its fallback chain and the entry that would serve it now,
        and every provider with its availability and models (``check_now``: checked first)."""
        return await self._send(core.models(check_now))


async def _chunks(body: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A streamed body for httpx.AsyncClient (which takes only async iterators)."""
    for chunk in body:
        yield chunk
