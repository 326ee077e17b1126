"""The tasks table (filters, keyset pages, bulk actions) and a task's own page (live)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, ServerSentEvent, ServerSentEventMessage, Template
from markupsafe import escape

from orchestra.domain import Task, TaskFilter, TaskStatus, now
from orchestra.errors import FieldProblem, InvalidRequest
from orchestra.web.render import bounded, is_htmx, links, page

PAGE_SIZE = 50
#: Seconds between keep-alive comments on a finished task's stream.
KEEPALIVE_SECONDS = 15.0
#: The time range presets of the filter form.
SINCE = {"15m": 15, "1h": 60, "24h": 24 * 60, "7d": 7 * 24 * 60, "30d": 30 * 24 * 60}
#: The bulk actions.
ELIGIBLE = ("cancel", "retry")
_FILTER_KEYS = ("status", "template", "model", "since", "from", "to", "q")


class Filters(msgspec.Struct, frozen=True):
    """The filter form's values as given (for links and the form), and the filter they mean."""

    given: dict[str, str]
    filter: TaskFilter


def _time(text: str, field: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"{field}: {text!r} is not a date and time", [FieldProblem(field, "not a time")]
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def filters_of(query: Any) -> Filters:
    """The task filter a query string (or a submitted form) describes.

    Raises:
        InvalidRequest: a value is not one the filter takes (a status word, a time).
    """
    given = {k: str(query.get(k) or "").strip() for k in _FILTER_KEYS}
    given = {k: v for k, v in given.items() if v}
    status = None
    if "status" in given:
        try:
            status = TaskStatus(given["status"])
        except ValueError:
            raise InvalidRequest(
                f"status: {given['status']!r} is not a task status",
                [FieldProblem("status", "not a task status")],
            ) from None
    created_from = _time(given["from"], "from") if "from" in given else None
    if "since" in given and given["since"] in SINCE:
        created_from = now() - timedelta(minutes=SINCE[given["since"]])
    created_to = _time(given["to"], "to") if "to" in given else None
    return Filters(
        given=given,
        filter=TaskFilter(
            status=status,
            template=given.get("template"),
            model=given.get("model"),
            created_from=created_from,
            created_to=created_to,
            text=given.get("q"),
        ),
    )


async def _eligible_count(runtime: Any, flt: TaskFilter, action: str) -> int:
    """How many tasks matching ``flt`` the action would change."""
    if action == "cancel":
        count: int = await runtime.bulk.count_cancellable(flt)
    else:
        count = await runtime.bulk.count_retryable(flt)
    return count


def _notice(query: Any) -> str:
    done, count = query.get("done"), query.get("n", "0")
    if done in ("cancel", "retry") and str(count).isdigit():
        verb = "Cancelled" if done == "cancel" else "Queued again"
        return f"{verb}: {int(count)} task{'s' if int(count) != 1 else ''}."
    return ""


class TaskPages(Controller):
    """Tasks: the table, bulk actions, one task."""

    path = "/tasks"

    async def _table(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        runtime = request.app.state.runtime
        found = filters_of(request.query_params)
        cursor = request.query_params.get("cursor")
        before = int(cursor) if cursor and cursor.isdigit() else None
        result = await runtime.dashboard.page(found.filter, limit=PAGE_SIZE, before=before)
        return {
            "rows": result.items,
            "next_cursor": result.next_cursor,
            "given": found.given,
            "first_page": before is None,
            "templates": [t.name for t in runtime.catalog.all()],
            "since_options": list(SINCE),
        }

    @get("/", name="ui.tasks")
    async def tasks(self, request: Request[Any, Any, Any]) -> Template:
        """The table, filtered, newest first; live on the first page."""
        return page(
            request,
            "tasks.html",
            section="tasks",
            notice=_notice(request.query_params),
            **await self._table(request),
        )

    @get("/rows")
    async def rows(self, request: Request[Any, Any, Any]) -> Template:
        """The table's rows alone (what the live view swaps in)."""
        return page(request, "_task_rows.html", **await self._table(request))

    @get("/confirm")
    async def confirm(self, request: Request[Any, Any, Any], action: FromQuery[str]) -> Template:
        """Ask before applying ``action`` to every task matching the filter, stating how many."""
        if action not in ELIGIBLE:
            raise InvalidRequest("action must be cancel or retry", [FieldProblem("action", "")])
        found = filters_of(request.query_params)
        count = await _eligible_count(request.app.state.runtime, found.filter, action)
        return page(
            request, "confirm.html", section="tasks", action=action, count=count, given=found.given
        )

    @post("/bulk", opt={"scope": "submit"}, status_code=303)
    async def bulk(self, request: Request[Any, Any, Any]) -> Redirect:
        """Cancel or retry the selected tasks, or every task matching the filter."""
        form = await request.form()
        action = form.get("action")
        if action not in ELIGIBLE:
            raise InvalidRequest("action must be cancel or retry", [FieldProblem("action", "")])
        bulk = request.app.state.runtime.bulk
        found = filters_of(form)
        if form.get("scope") == "matching":
            if action == "cancel":
                outcome = await bulk.cancel_matching(found.filter)
            else:
                outcome = await bulk.retry_matching(found.filter)
        else:
            ids = [int(v) for v in form.getall("id", []) if str(v).isdigit()]
            if not ids:
                raise InvalidRequest("select at least one task", [FieldProblem("id", "none")])
            if action == "cancel":
                outcome = await bulk.cancel_tasks(ids)
            else:
                outcome = await bulk.retry_tasks(ids)
        return Redirect(
            links(request).ui("/tasks", done=action, n=outcome.changed, **found.given),
            status_code=303,
        )

    @get("/{task_id:int}", name="ui.task")
    async def task(self, request: Request[Any, Any, Any], task_id: FromPath[int]) -> Template:
        """One task: params, result, steps (with prompts), attempts; live while it runs."""
        context = await _detail(request, task_id)
        return page(request, "task.html", section="tasks", **context)

    @get("/{task_id:int}/body")
    async def body(self, request: Request[Any, Any, Any], task_id: FromPath[int]) -> Template:
        """The task page's content alone (swapped in when the task changes)."""
        return page(request, "_task_body.html", **await _detail(request, task_id))

    @get("/{task_id:int}/live")
    async def live(
        self, request: Request[Any, Any, Any], task_id: FromPath[int], after: FromQuery[int] = 0
    ) -> ServerSentEvent:
        """The task's streamed text as ``tokens`` events (HTML text, to append), and a
        ``refresh`` event on any other change. Resumes after Last-Event-ID."""
        tasks = request.app.state.runtime.tasks
        resume = request.headers.get("last-event-id", "")
        if resume.isdigit():
            after = int(resume)
        await tasks.get(task_id)  # 404 before the stream starts

        async def stream() -> AsyncIterator[ServerSentEventMessage]:
            async for event in tasks.follow(task_id, after):
                if event is None:
                    yield ServerSentEventMessage(comment="keep-alive")
                elif event.type == "step.tokens":
                    text = str(escape(event.data.get("text", "")))
                    yield ServerSentEventMessage(event="tokens", data=text, id=str(event.seq))
                else:
                    yield ServerSentEventMessage(
                        event="refresh", data=event.type, id=str(event.seq)
                    )
            # Finished: the page swaps the live part away, which closes the stream. Ending it
            # here instead would make the browser report an error and reconnect.
            while True:
                await asyncio.sleep(KEEPALIVE_SECONDS)
                yield ServerSentEventMessage(comment="keep-alive")

        return ServerSentEvent(bounded(stream()), headers={"cache-control": "no-store"})

    @post("/{task_id:int}/cancel", opt={"scope": "submit"}, status_code=303)
    async def cancel(self, request: Request[Any, Any, Any], task_id: FromPath[int]) -> Redirect:
        """Cancel the task, then show it."""
        await request.app.state.runtime.tasks.cancel(task_id)
        return Redirect(links(request).ui(f"/tasks/{task_id}"), status_code=303)

    @post("/{task_id:int}/retry", opt={"scope": "submit"}, status_code=303)
    async def retry(self, request: Request[Any, Any, Any], task_id: FromPath[int]) -> Redirect:
        """Queue the task again, then show it."""
        await request.app.state.runtime.tasks.retry(task_id)
        return Redirect(links(request).ui(f"/tasks/{task_id}"), status_code=303)


async def _detail(request: Request[Any, Any, Any], task_id: FromPath[int]) -> dict[str, Any]:
    runtime = request.app.state.runtime
    task: Task = await runtime.tasks.get(task_id)
    streamed, last_seq = await _streamed(runtime, task)
    running = [s.id for s in task.steps if s.status.value == "running"]
    prompt = sum(s.usage.prompt_tokens or 0 for s in task.steps if s.usage)
    completion = sum(s.usage.completion_tokens or 0 for s in task.steps if s.usage)
    return {
        "task": task,
        "streamed": streamed,
        "streaming_step": running[0] if running else None,
        "last_seq": last_seq,
        "tokens": (prompt, completion),
        "htmx": is_htmx(request),
    }


async def _streamed(runtime: Any, task: Task) -> tuple[str, int]:
    """The text streamed so far by the step now running, and the last event's number."""
    if task.finished:
        return "", 0  # nothing streams any more: the page is not live
    store = runtime.tasks.store
    running = next((s.id for s in task.steps if s.status.value == "running"), None)
    pieces: list[str] = []
    seq = 0
    while True:
        batch = await store.events_after(task.id, seq)
        if not batch:
            break
        for event in batch:
            seq = event.seq
            if event.type == "step.started" and event.data.get("step") == running:
                pieces = []
            elif event.type == "step.tokens" and event.data.get("step") == running:
                pieces.append(str(event.data.get("text", "")))
        await asyncio.sleep(0)
    return "".join(pieces), seq
