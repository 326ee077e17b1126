"""The tasks table (filters, keyset pages, bulk actions) and a task's own page (live)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import FromPath, FromQuery
from litestar.response import Redirect, ServerSentEvent, ServerSentEventMessage, Template
from markupsafe import escape

from orchestra.api.scope import runtime_of
from orchestra.bulk import Action
from orchestra.domain import TaskFilter, TaskStatus, as_utc, now
from orchestra.errors import FieldProblem, InvalidRequest
from orchestra.event_types import EventType
from orchestra.web.access import live_stream
from orchestra.web.forms import whole
from orchestra.web.notices import (
    ACTIONS,
    NOTICE_COOKIE,
    notice_cookie,
    notice_text,
    notice_value,
)
from orchestra.web.overview import seen_of
from orchestra.web.render import links, page
from orchestra.web.views import until, visible

PAGE_SIZE = 50
#: The time range presets of the filter form.
SINCE = {"15m": 15, "1h": 60, "24h": 24 * 60, "7d": 7 * 24 * 60, "30d": 30 * 24 * 60}
#: The bulk actions.
ELIGIBLE = ACTIONS


def _action(value: object) -> Action:
    """A bulk action the request names.

    Raises:
        InvalidRequest: it names none of :data:`ELIGIBLE`.
    """
    if value not in ELIGIBLE:
        raise InvalidRequest("action must be cancel or retry", [FieldProblem("action", "")])
    return cast(Action, value)


_FILTER_KEYS = ("status", "template", "model", "since", "from", "to", "q")
#: A comment alone: with a ``data:`` line (Litestar's default) the browser would dispatch an
#: empty message event.
KEEPALIVE = ServerSentEventMessage(comment="keep-alive", data=None)


class Filters(msgspec.Struct, frozen=True):
    """The filter form's values as given (for links and the form), and the filter they mean."""

    given: dict[str, str]
    filter: TaskFilter


def _time(text: str, field: str) -> datetime:
    """A time from the filter form, in UTC (a time without a zone is taken as UTC)."""
    try:
        return as_utc(datetime.fromisoformat(text)).astimezone(UTC)
    except ValueError:
        raise InvalidRequest(
            f"{field}: {text!r} is not a date and time", [FieldProblem(field, "not a time")]
        ) from None
    except OverflowError:  # within a day of year 1 or 9999, in UTC
        raise InvalidRequest(
            f"{field}: {text!r} is out of range", [FieldProblem(field, "out of range")]
        ) from None


def _absolute(moment: datetime) -> str:
    """``moment`` as the filter form's UTC fields show it, to the second."""
    return moment.astimezone(UTC).replace(tzinfo=None, microsecond=0).isoformat()


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
    if "since" in given:
        if given["since"] not in SINCE:
            # Never ignored: a bulk action's confirmation would then cover every task.
            allowed = ", ".join(SINCE)
            raise InvalidRequest(
                f"since: {given['since']!r} is not one of {allowed}",
                [FieldProblem("since", f"one of {allowed}")],
            )
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


def _blank_fields(query: Any) -> dict[str, list[str]] | None:
    """The query without its empty fields, when it has any (a submitted filter form sends
    every field); None when it has none."""
    pairs = list(query.multi_items())
    kept = [(k, v) for k, v in pairs if str(v).strip()]
    if len(kept) == len(pairs):
        return None
    clean: dict[str, list[str]] = {}
    for key, value in kept:
        clean.setdefault(key, []).append(value)
    return clean


class TaskPages(Controller):
    """Tasks: the table, bulk actions, one task."""

    path = "/tasks"

    async def _table(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        runtime = runtime_of(request.scope)
        found = filters_of(request.query_params)
        cursor = request.query_params.get("cursor")
        before = whole(cursor, "cursor") if cursor else None
        # The counts first: a change while the rows are read is one the live stream tells.
        changes = await runtime.dashboard.changes()
        result = await runtime.dashboard.page(found.filter, limit=PAGE_SIZE, before=before)
        return {
            "seen": seen_of(changes),
            "rows": result.items,
            "next_cursor": result.next_cursor,
            "given": found.given,
            "first_page": before is None,
            "now": now(),
            # A text search no index serves would run again on every change.
            "live": before is None and "q" not in found.given,
            "templates": [t.name for t in runtime.catalog.all()],
            "since_options": list(SINCE),
        }

    @get("/", name="ui.tasks")
    async def tasks(self, request: Request[Any, Any, Any]) -> Template | Redirect:
        """The table, filtered, newest first; live on the first page unless searching. An
        address with empty fields is sent on to the same one without them."""
        clean = _blank_fields(request.query_params)
        if clean is not None:
            return Redirect(links(request).ui("/tasks", **clean), status_code=303)
        flashed = request.cookies.get(NOTICE_COOKIE)
        return page(
            request,
            "tasks.html",
            section="tasks",
            notice=notice_text(flashed),
            cookies=[notice_cookie(request, "")] if flashed is not None else None,
            **await self._table(request),
        )

    @get("/rows")
    async def rows(self, request: Request[Any, Any, Any]) -> Template:
        """The table's rows alone (what the live view swaps in)."""
        return page(request, "_task_rows.html", **await self._table(request))

    @get("/confirm")
    async def confirm(self, request: Request[Any, Any, Any], action: FromQuery[str]) -> Template:
        """Ask before applying ``action`` to every task matching the filter, stating how many."""
        chosen = _action(action)
        found = filters_of(request.query_params)
        flt, fixed = found.filter, {k: v for k, v in found.given.items() if k != "since"}
        if flt.created_from is not None:
            # A "since" becomes the time it means now, so the action acts on the tasks counted.
            fixed["from"] = _absolute(flt.created_from)
            flt = msgspec.structs.replace(flt, created_from=_time(fixed["from"], "from"))
        confirmation = await runtime_of(request.scope).bulk.confirmation(flt, chosen)
        return page(
            request,
            "confirm.html",
            section="tasks",
            action=action,
            count=confirmation.count,
            given=found.given,
            hidden={**fixed, "upto": str(confirmation.upto)},
        )

    @post("/bulk", opt={"scope": "submit"}, status_code=303)
    async def bulk(self, request: Request[Any, Any, Any]) -> Redirect:
        """Cancel or retry the selected tasks, or every task matching the filter up to the
        newest task when it was confirmed (``upto``)."""
        form = await request.form()
        action = _action(form.get("action"))
        bulk = runtime_of(request.scope).bulk
        found = filters_of(form)
        if form.get("scope") == "matching":
            ceiling = str(form.get("upto") or "")
            upto = whole(ceiling, "upto", least=0) if ceiling else None
            if action == "cancel":
                outcome = await bulk.cancel_matching(found.filter, upto)
            else:
                outcome = await bulk.retry_matching(found.filter, upto)
        else:
            ids = [whole(str(v), "id") for v in form.getall("id", [])]
            if not ids:
                raise InvalidRequest("select at least one task", [FieldProblem("id", "none")])
            if action == "cancel":
                outcome = await bulk.cancel_tasks(ids)
            else:
                outcome = await bulk.retry_tasks(ids)
        return Redirect(
            links(request).ui("/tasks", **found.given),
            status_code=303,
            cookies=[notice_cookie(request, notice_value(action, outcome))],
        )

    @get("/bulk")
    async def bulk_page(self, request: Request[Any, Any, Any]) -> Redirect:
        """No page of its own (a reload or Back after a bulk action lands here): the tasks."""
        return Redirect(links(request).ui("/tasks"), status_code=303)

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
        self, request: Request[Any, Any, Any], task_id: FromPath[int], after: FromQuery[str] = "0"
    ) -> ServerSentEvent:
        """The task's streamed text as ``tokens`` events (HTML text, to append), and a
        ``refresh`` event on any other change and once more at the end. Resumes after
        Last-Event-ID."""
        tasks = runtime_of(request.scope).tasks
        resume = request.headers.get("last-event-id")
        if resume:
            start = whole(resume, "Last-Event-ID", least=0)
        else:
            start = whole(after, "after", least=0)
        await tasks.get(task_id)  # 404 before the stream starts

        async def stream() -> AsyncIterator[ServerSentEventMessage]:
            async for event in tasks.follow(task_id, start):
                if event is None:
                    yield KEEPALIVE
                elif event.type == EventType.STEP_TOKENS:
                    text = str(escape(visible(event.data.get("text", ""))))
                    yield ServerSentEventMessage(event="tokens", data=text, id=str(event.seq))
                else:
                    yield ServerSentEventMessage(
                        event="refresh", data=event.type, id=str(event.seq)
                    )
            if runtime_of(request.scope).feed.closing:
                return  # the service stops, the task goes on: the browser reconnects
            # Finished. One more refresh, always: a page that read its task running just
            # before it finished follows from its last event and is told nothing else, and a
            # page whose refresh failed tries again when its stream reconnects. (A finished
            # task's page has no stream.)
            yield ServerSentEventMessage(event="refresh", data="finished")
            # The page swaps the live part away, which closes the stream. Ending it here
            # instead would make the browser report an error and reconnect.
            async for _ in runtime_of(request.scope).feed.heartbeats():
                yield KEEPALIVE

        return live_stream(request, stream())

    @get("/{task_id:int}/cancel")
    async def cancel_page(
        self, request: Request[Any, Any, Any], task_id: FromPath[int]
    ) -> Redirect:
        """No page of its own: the task's."""
        return Redirect(links(request).ui(f"/tasks/{task_id}"), status_code=303)

    @get("/{task_id:int}/retry")
    async def retry_page(self, request: Request[Any, Any, Any], task_id: FromPath[int]) -> Redirect:
        """No page of its own: the task's."""
        return Redirect(links(request).ui(f"/tasks/{task_id}"), status_code=303)

    @post("/{task_id:int}/cancel", opt={"scope": "submit"}, status_code=303)
    async def cancel(self, request: Request[Any, Any, Any], task_id: FromPath[int]) -> Redirect:
        """Cancel the task, then show it."""
        await runtime_of(request.scope).tasks.cancel(task_id)
        return Redirect(links(request).ui(f"/tasks/{task_id}"), status_code=303)

    @post("/{task_id:int}/retry", opt={"scope": "submit"}, status_code=303)
    async def retry(self, request: Request[Any, Any, Any], task_id: FromPath[int]) -> Redirect:
        """Queue the task again, then show it."""
        await runtime_of(request.scope).tasks.retry(task_id)
        return Redirect(links(request).ui(f"/tasks/{task_id}"), status_code=303)


async def _detail(request: Request[Any, Any, Any], task_id: int) -> dict[str, Any]:
    live = await runtime_of(request.scope).tasks.live(task_id)
    task = live.task
    running = [s.id for s in task.steps if s.status.value == "running"]
    prompt = sum(s.usage.prompt_tokens or 0 for s in task.steps if s.usage)
    completion = sum(s.usage.completion_tokens or 0 for s in task.steps if s.usage)
    return {
        "task": task,
        # A queued task not due yet: delayed, or waiting to retry.
        "due_in": until(task.next_run_at, now()),
        "streamed": visible(live.streamed),
        "streaming_step": running[0] if running else None,
        "last_seq": live.after,
        "tokens": (prompt, completion),
    }
