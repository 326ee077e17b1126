"""``orchestra tasks``: look at and act on the tasks of a running server, over its REST API."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import click

from orchestra.cli_common import (
    client_for,
    config_option,
    json_option,
    say,
    say_none,
    to_json,
    url_option,
)
from orchestra.domain import TaskStatus, iso_now

if TYPE_CHECKING:
    from orchestra.wire.events import TaskEvent
    from orchestra.wire.schemas import TaskSummaryOut

#: The most tasks one page of ``GET /api/v1/tasks`` holds.
PAGE = 500
#: The largest ``tasks list --limit``: more than any list (a billion).
MAX_LIMIT = 1_000_000_000


@click.group()
def tasks() -> None:
    """Look at and act on tasks of a running server."""


def _task_line(t: TaskSummaryOut) -> str:
    took = f"{t.duration_ms / 1000:.2f}s" if t.duration_ms is not None else "-"
    version = f"{t.template} v{t.template_version}"
    line = f"{t.id:<6} {t.status:<9} {version:<24} {t.created_at}  {took:>7}"
    if t.next_run_at is not None and t.next_run_at > iso_now():
        line += f"  due {t.next_run_at}"  # delayed, or waiting for its retry
    if t.error is not None:
        line += f"  {t.error.type}: {t.error.message}"
    return line


def _once(given: tuple[str, ...], option: str) -> str | None:
    """An option given at most once: the last of several was kept without a word."""
    if len(given) > 1:
        raise click.BadParameter(f"is given {len(given)} times; give it once", param_hint=option)
    return given[0] if given else None


@tasks.command("list")
@click.option(
    "--status",
    type=click.Choice([s.value for s in TaskStatus]),
    multiple=True,  # to refuse a second one: click keeps the last in silence
    callback=lambda _ctx, _param, given: _once(given, "--status"),
    help="Only tasks in this status (one).",
)
@click.option("--template", help="Only tasks of this template.")
@click.option(
    "--limit",
    type=click.IntRange(min=1, max=MAX_LIMIT),  # a larger one was islice's traceback
    default=20,
    show_default=True,
    help="At most this many.",
)
@json_option
@url_option
@config_option
def tasks_list(
    status: str | None,
    template: str | None,
    limit: int,
    as_json: bool,
    url: str | None,
    config_path: str | None,
) -> None:
    """The newest tasks, newest first: id, status, template and version, created, how long
    the last attempt took, when a delayed (or retrying) task is due, and the error of a
    failed one."""
    with client_for(url, config_path) as client:
        listed = client.list_tasks(status=status, template=template, page_size=min(limit, PAGE))
        shown = list(itertools.islice(listed, limit + 1))
    if not shown:
        say_none("tasks")
    for item in shown[:limit]:
        say(item, _task_line, as_json)
    if len(shown) > limit:
        click.echo(f"(the {limit} newest; --limit for more)", err=True)


@tasks.command("show")
@click.argument("task_id", type=int)
@url_option
@config_option
def tasks_show(task_id: int, url: str | None, config_path: str | None) -> None:
    """Print a task as JSON."""
    with client_for(url, config_path) as client:
        task = client.get_task(task_id)
    click.echo(to_json(task, indent=2))


def _event_line(event: TaskEvent) -> str:
    detail = {k: v for k, v in event.data.items() if k != "type"}
    return f"{event.seq:<4} {event.time}  {event.type:<18} {to_json(detail)}"


@tasks.command("events")
@click.argument("task_id", type=int)
@click.option("--after", type=click.IntRange(min=0), default=0, help="Only events after this seq.")
@json_option
@url_option
@config_option
def tasks_events(
    task_id: int, after: int, as_json: bool, url: str | None, config_path: str | None
) -> None:
    """Print a task's events as they happen (its past ones first); stops when the task has
    finished. A dropped connection (the server restarted) is resumed after the last event
    printed, for up to a minute."""
    with client_for(url, config_path) as client:
        for event in client.task_events(task_id, after):
            say(event, _event_line, as_json)


def _act(
    action: str, task_id: int, as_json: bool, url: str | None, config_path: str | None
) -> None:
    """Cancel or retry a task, and print what it is now (``--json``: the whole task)."""
    with client_for(url, config_path) as client:
        task = client.cancel(task_id) if action == "cancel" else client.retry(task_id)
    say(task, lambda t: f"task {t.id} {t.status}", as_json)


@tasks.command("cancel")
@click.argument("task_id", type=int)
@json_option
@url_option
@config_option
def tasks_cancel(task_id: int, as_json: bool, url: str | None, config_path: str | None) -> None:
    """Cancel a queued or running task."""
    _act("cancel", task_id, as_json, url, config_path)


@tasks.command("retry")
@click.argument("task_id", type=int)
@json_option
@url_option
@config_option
def tasks_retry(task_id: int, as_json: bool, url: str | None, config_path: str | None) -> None:
    """Queue a failed or cancelled task again."""
    _act("retry", task_id, as_json, url, config_path)
