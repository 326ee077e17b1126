"""``orchestra schedules``: the schedules of a running server, over its REST API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from orchestra.cli_common import (
    client_for,
    config_option,
    json_option,
    param_values,
    say,
    say_none,
    url_option,
)

if TYPE_CHECKING:
    from orchestra.api.schedules import ScheduleOut
    from orchestra.client import Client


@click.group()
def schedules() -> None:
    """Schedules of a running server: tasks submitted on a cron expression or every so often."""


def _params(client: Client, template: str, params: tuple[str, ...]) -> dict[str, Any]:
    """-p NAME=VALUE options as the template's parameters (each in its declared type)."""
    return param_values(params, client.get_template(template).parameters)


def _schedule_line(s: ScheduleOut) -> str:
    when = f"cron {s.cron!r} {s.timezone}" if s.cron else f"every {s.every}"
    state = f"next {s.next_fire_at}" if s.enabled else "paused"
    return f"{s.id:<4} {s.name:<24} {s.template:<16} {when:<32} {state}  ({s.source})"


@schedules.command("list")
@json_option
@url_option
@config_option
def schedules_list(as_json: bool, url: str | None, config_path: str | None) -> None:
    """Every schedule: id, name, template, timing, next tick (or paused), source."""
    with client_for(url, config_path) as client:
        found = client.list_schedules()
    if not found:
        say_none("schedules")
    for item in found:
        say(item, _schedule_line, as_json)


@schedules.command("create")
@click.argument("name")
@click.argument("template")
@click.option("--cron", help='5 fields, e.g. "30 2 * * *" (in --timezone).')
@click.option("--every", help='A duration: "2s", "5m", "1h30m", "1d".')
@click.option("--timezone", help="IANA zone of --cron.  [default: UTC]")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE", help="Repeatable.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--model", help="Use this model instead of the template's.")
@click.option("--overlap", type=click.Choice(["skip", "allow"]), default="skip", show_default=True)
@click.option(
    "--catch-up", type=click.Choice(["none", "latest"]), default="none", show_default=True
)
@click.option("--paused", is_flag=True, help="Create it paused.")
@json_option
@url_option
@config_option
def schedules_create(
    name: str,
    template: str,
    cron: str | None,
    every: str | None,
    timezone: str | None,
    params: tuple[str, ...],
    priority: int,
    model: str | None,
    overlap: str,
    catch_up: str,
    paused: bool,
    as_json: bool,
    url: str | None,
    config_path: str | None,
) -> None:
    """Make a schedule of TEMPLATE named NAME (give --cron or --every)."""
    if (cron is None) == (every is None):  # the server's 400 exited 1, as a failed task
        raise click.UsageError("give --cron or --every (one of them)")
    if timezone is not None and every is not None:  # taken, and meaning nothing
        raise click.BadParameter(
            "is the zone of --cron; an --every schedule ticks at its interval in any zone",
            param_hint="--timezone",
        )
    fields: dict[str, Any] = {
        "name": name,
        "template": template,
        "timezone": timezone or "UTC",
        "priority": priority,
        "overlap": overlap,
        "catch_up": catch_up,
        "enabled": not paused,
    }
    for key, value in (("cron", cron), ("every", every), ("model", model)):
        if value is not None:
            fields[key] = value
    with client_for(url, config_path) as client:
        fields["params"] = _params(client, template, params)
        created = client.create_schedule(**fields)
    say(created, _schedule_line, as_json)


def _a_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A schedule's name or id, not empty (it made a request to another route: "Method Not
    Allowed")."""
    if not value.strip():
        raise click.BadParameter("give a schedule's name or id")
    return value


def _set_enabled(
    ref: str, enabled: bool, as_json: bool, url: str | None, config_path: str | None
) -> None:
    with client_for(url, config_path) as client:
        changed = client.update_schedule(ref, enabled=enabled)
    say(changed, _schedule_line, as_json)


@schedules.command("pause")
@click.argument("ref", metavar="NAME_OR_ID", callback=_a_name)
@json_option
@url_option
@config_option
def schedules_pause(ref: str, as_json: bool, url: str | None, config_path: str | None) -> None:
    """Stop a schedule's ticks (its next tick is forgotten)."""
    _set_enabled(ref, False, as_json, url, config_path)


@schedules.command("resume")
@click.argument("ref", metavar="NAME_OR_ID", callback=_a_name)
@json_option
@url_option
@config_option
def schedules_resume(ref: str, as_json: bool, url: str | None, config_path: str | None) -> None:
    """Start a paused schedule again, from its next tick after now."""
    _set_enabled(ref, True, as_json, url, config_path)


@schedules.command("run")
@click.argument("ref", metavar="NAME_OR_ID", callback=_a_name)
@json_option
@url_option
@config_option
def schedules_run(ref: str, as_json: bool, url: str | None, config_path: str | None) -> None:
    """Submit the schedule's task now (not a tick: its next tick stays); print its id
    (``--json``: the task)."""
    with client_for(url, config_path) as client:
        task = client.run_schedule(ref)
    say(task, lambda t: str(t.id), as_json)


@schedules.command("delete")
@click.argument("ref", metavar="NAME_OR_ID", callback=_a_name)
@url_option
@config_option
def schedules_delete(ref: str, url: str | None, config_path: str | None) -> None:
    """Delete a schedule; the tasks it made stay."""
    with client_for(url, config_path) as client:
        client.delete_schedule(ref)
    click.echo(f"schedule {ref} deleted")
