"""``orchestra schedules``: the schedules of a running server, over its REST API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from orchestra.cli_common import client_for, config_option, param_values, say_none, url_option

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
@url_option
@config_option
def schedules_list(url: str | None, config_path: str | None) -> None:
    """Every schedule: id, name, template, timing, next tick (or paused), source."""
    with client_for(url, config_path) as client:
        found = client.list_schedules()
    if not found:
        say_none("schedules")
    for item in found:
        click.echo(_schedule_line(item))


@schedules.command("create")
@click.argument("name")
@click.argument("template")
@click.option("--cron", help='5 fields, e.g. "30 2 * * *" (in --timezone).')
@click.option("--every", help='A duration: "2s", "5m", "1h30m", "1d".')
@click.option("--timezone", default="UTC", show_default=True, help="IANA zone of --cron.")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE", help="Repeatable.")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--model", help="Use this model instead of the template's.")
@click.option("--overlap", type=click.Choice(["skip", "allow"]), default="skip", show_default=True)
@click.option(
    "--catch-up", type=click.Choice(["none", "latest"]), default="none", show_default=True
)
@click.option("--paused", is_flag=True, help="Create it paused.")
@url_option
@config_option
def schedules_create(
    name: str,
    template: str,
    cron: str | None,
    every: str | None,
    timezone: str,
    params: tuple[str, ...],
    priority: int,
    model: str | None,
    overlap: str,
    catch_up: str,
    paused: bool,
    url: str | None,
    config_path: str | None,
) -> None:
    """Make a schedule of TEMPLATE named NAME (give --cron or --every)."""
    fields: dict[str, Any] = {
        "name": name,
        "template": template,
        "timezone": timezone,
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
    click.echo(_schedule_line(created))


def _a_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A schedule's name or id, not empty (it made a request to another route: "Method Not
    Allowed")."""
    if not value.strip():
        raise click.BadParameter("give a schedule's name or id")
    return value


def _set_enabled(ref: str, enabled: bool, url: str | None, config_path: str | None) -> None:
    with client_for(url, config_path) as client:
        changed = client.update_schedule(ref, enabled=enabled)
    click.echo(_schedule_line(changed))


@schedules.command("pause")
@click.argument("ref", metavar="NAME_OR_ID", callback=_a_name)
@url_option
@config_option
def schedules_pause(ref: str, url: str | None, config_path: str | None) -> None:
    """Stop a schedule's ticks (its next tick is forgotten)."""
    _set_enabled(ref, False, url, config_path)


@schedules.command("resume")
@click.argument("ref", metavar="NAME_OR_ID", callback=_a_name)
@url_option
@config_option
def schedules_resume(ref: str, url: str | None, config_path: str | None) -> None:
    """Start a paused schedule again, from its next tick after now."""
    _set_enabled(ref, True, url, config_path)


@schedules.command("run")
@click.argument("ref", metavar="NAME_OR_ID", callback=_a_name)
@url_option
@config_option
def schedules_run(ref: str, url: str | None, config_path: str | None) -> None:
    """Submit the schedule's task now (not a tick: its next tick stays); print its id."""
    with client_for(url, config_path) as client:
        task = client.run_schedule(ref)
    click.echo(task.id)


@schedules.command("delete")
@click.argument("ref", metavar="NAME_OR_ID", callback=_a_name)
@url_option
@config_option
def schedules_delete(ref: str, url: str | None, config_path: str | None) -> None:
    """Delete a schedule; the tasks it made stay."""
    with client_for(url, config_path) as client:
        client.delete_schedule(ref)
    click.echo(f"schedule {ref} deleted")
