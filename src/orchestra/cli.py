"""The ``orchestra`` command. ``serve`` is the default; the others talk to a server or read
templates locally."""

from __future__ import annotations

from orchestra import cli_start  # first: Ctrl-C while the rest loads (see it)

# isort: split
import errno
import json
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec

from orchestra import lean_imports  # noqa: F401  # before httpx and structlog: see it

# isort: split
from orchestra import __version__, logs
from orchestra.auth import ApiKey
from orchestra.cli_batch import batch
from orchestra.cli_common import (
    DEFAULT_TIMEOUT,
    CliError,
    client_for,
    config_option,
    given_path,
    json_option,
    param_values,
    say,
    settings_of,
    shown,
    to_json,
    url_option,
)
from orchestra.cli_keys import keys
from orchestra.cli_schedules import schedules
from orchestra.cli_tasks import tasks
from orchestra.config import Settings
from orchestra.errors import OrchestraError, TemplateError
from orchestra.event_types import EventType

if TYPE_CHECKING:
    from orchestra.client import Client


def _template_failure(exc: TemplateError) -> click.ClickException:
    from orchestra.supervisor import startup_message

    return click.ClickException(startup_message(exc))


def _build() -> str:
    """Which build this is: ``git describe``, baked in as package data by the single binary's
    build (packaging/); in a source checkout, asked of git; else unknown."""
    from importlib import resources

    try:
        return resources.files("orchestra").joinpath("BUILD").read_text().strip()
    except OSError:
        pass
    import subprocess

    checkout = Path(str(resources.files("orchestra"))).parents[1]  # src/orchestra → the root
    if not (checkout / ".git").exists():
        return "unknown"
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=checkout,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"orchestra {__version__} (build {_build()})")
        ctx.exit()


class _Commands(click.Group):
    """The CLI's group: what ends a command from outside is told by its exit code, as shells
    do (click's own made both exit 1, which says a task failed): Ctrl-C 130, a reader that
    stopped reading (``| head``) 141 with nothing said, a full disk a one-line error."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        """The command's context, its options read: Ctrl-C meanwhile was click's "Aborted!",
        exit 1."""
        try:
            return super().make_context(info_name, args, parent, **extra)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            raise click.exceptions.Exit(128 + signal.SIGINT) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            served = ctx.invoked_subcommand in (None, "serve")
            said = "" if served else " (what the server was asked to do goes on there)"
            click.echo(f"\ninterrupted{said}", err=True)
            ctx.exit(128 + signal.SIGINT)
        except BrokenPipeError:
            # Nothing more reaches the reader; the interpreter's last flush must not fail too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(128 + signal.SIGPIPE)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EFBIG):
                raise
            raise CliError(f"cannot write the output: {exc.strerror}") from None


@click.group(cls=_Commands, invoke_without_command=True)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show the version and the build, and exit.",
)
@config_option
@click.option(
    "--url",
    help="Server URL for the client commands, as their own --url (which wins over it); "
    "before the command, as -c is.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    envvar="ORCHESTRA_TIMEOUT",
    show_default=True,
    help="Seconds the client commands wait for the server to answer a request (long polls "
    "and uploads have their own); also ORCHESTRA_TIMEOUT.",
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None, url: str | None, timeout: float) -> None:
    """AI Task Orchestra: run AI tasks from YAML templates. Without a command, serve."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve, config_path=config_path)


@main.command()
@config_option
@click.option("--host", help="Override [server] host.")
@click.option("--port", type=click.IntRange(0, 65535), help="Override [server] port.")
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    help="Override [server] processes: serve from N processes sharing the port and database.",
)
@click.option("--no-api", is_flag=True, help="Run workers only; answer /health and /metrics alone.")
@click.option("--no-workers", is_flag=True, help="Serve the API only; run no tasks.")
def serve(
    config_path: str | None,
    host: str | None = None,
    port: int | None = None,
    processes: int | None = None,
    no_api: bool = False,
    no_workers: bool = False,
) -> None:
    """Serve the HTTP API and run the workers: in this process, or in N processes
    (--processes) under this one."""
    # SIGHUP reloads the templates once the service runs; until then (its imports take a
    # second), its default would end the service: a reload asked before the templates are
    # read needs nothing (they are read as the service starts).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from orchestra import serve_checks
    from orchestra.supervisor import Supervisor, run_service, startup_message

    settings = _serve_settings(settings_of(config_path), host, port, processes, no_api, no_workers)
    logs.setup(settings.logging)
    try:
        serve_checks.check(settings, given_path(config_path))
        if settings.server.processes > 1:
            sys.exit(Supervisor(settings).run())

        def show_key(key: ApiKey, token: str) -> None:
            show_bootstrap_key(key, token, settings.server.host)

        run_service(settings, show_key=show_key)
    except OrchestraError as exc:
        raise click.ClickException(startup_message(exc)) from None


def _serve_settings(
    settings: Settings,
    host: str | None,
    port: int | None,
    processes: int | None,
    no_api: bool,
    no_workers: bool,
) -> Settings:
    """The settings with ``serve``'s options over ``[server]``."""
    if no_api and no_workers:
        raise click.UsageError("--no-api and --no-workers together leave nothing to run")
    s = settings.server
    overrides = {
        "host": host or s.host,
        "port": s.port if port is None else port,
        "processes": processes or s.processes,
        "api": s.api and not no_api,
        "workers": s.workers and not no_workers,
    }
    if no_api and not s.workers:
        raise click.UsageError("--no-api: [server] workers is false, so nothing would run")
    if no_workers and not s.api:
        raise click.UsageError("--no-workers: [server] api is false, so nothing would run")
    return msgspec.structs.replace(settings, server=msgspec.structs.replace(s, **overrides))


def show_bootstrap_key(key: ApiKey, token: str, host: str) -> None:
    """Show the admin key a first start made, this once: as a log event, and plainly on
    stderr for a person reading ``podman logs`` (whatever the log format)."""
    logs.get("orchestra.auth").warning(
        "auth.bootstrap_key_created",
        key_id=key.id,
        name=key.name,
        scope=key.scope,
        host=host,
        token=token,
        hint=(
            "shown only this once: send it as 'Authorization: Bearer <token>'; make your own "
            "keys with 'orchestra keys create', then revoke this one with "
            f"'orchestra keys revoke {key.name}'"
        ),
    )
    rule = "=" * 72
    click.echo(
        f"\n{rule}\n"
        f"No API key existed and Orchestra listens on {host}, so it made an admin key.\n"
        "It is shown only this once (only its SHA-256 is kept):\n\n"
        f"    {token}\n\n"
        "Send it as 'Authorization: Bearer <key>' (the CLI reads ORCHESTRA_API_KEY).\n"
        "Make your own keys with 'orchestra keys create --name NAME --scope SCOPE',\n"
        f"then revoke this one with 'orchestra keys revoke {key.name}'.\n"
        f"{rule}\n",
        err=True,
    )


@main.command()
@click.argument("template")
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="NAME=VALUE",
    help="A parameter; @FILE reads the value from a file, @- from standard input; @@ starts "
    "a value with @. Repeatable.",
)
@click.option("--wait/--no-wait", default=False, help="Wait for the result and print it.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the task as JSON (with --wait: the finished task) instead of its id (result).",
)
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--model", help="Use this model instead of the template's.")
@click.option("--delay", type=float, help="Seconds to wait before the task may start.")
@click.option("--idempotency-key", help="Submitting again with this key returns the same task.")
@url_option
@config_option
def submit(
    template: str,
    params: tuple[str, ...],
    wait: bool,
    as_json: bool,
    priority: int,
    model: str | None,
    delay: float | None,
    idempotency_key: str | None,
    url: str | None,
    config_path: str | None,
) -> None:
    """Submit a task to a running server and print its id (ID=$(orchestra submit …)); with
    --wait, print its result once it has finished (exit 1 if it failed or was cancelled)."""
    queued: int | None = None
    try:
        with client_for(url, config_path) as client:
            values = param_values(params, client.get_template(template).parameters)
            task = client.submit(
                template,
                values,
                priority=priority,
                model=model,
                delay=delay,
                idempotency_key=idempotency_key,
            )
            queued = task.id
            click.echo(f"task {task.id} {task.status}", err=True)
            if wait:
                _show_progress(client, task.id)
                task = client.wait(task.id)  # at once when the stream saw it end; else polled
    except CliError as exc:
        if queued is None:
            raise
        # The wait failed, not the task: say which one to look for (same exit code).
        told = type(exc)(
            f"{exc.message}\ntask {queued} was queued and may still run: "
            f"orchestra tasks show {queued}"
        )
        raise told from None
    if as_json:
        click.echo(to_json(task))
    elif not wait:
        click.echo(task.id)
    if wait and task.status != "succeeded":
        message = task.error.message if task.error else None
        raise CliError(f"task {task.id} {task.status}: {message}")
    if wait and not as_json:
        result = task.result
        click.echo(result if isinstance(result, str) else json.dumps(result, indent=2))


#: What an attempt that ended without a result is told as, on its own line (the text the
#: next attempt streams begins again).
_ATTEMPT_ENDED: dict[str, str] = {
    EventType.TASK_LEASE_EXPIRED.value: "lost: its worker stopped answering",
    EventType.TASK_HANDED_BACK.value: "handed back: its service stopped; it runs again",
}


def _show_progress(client: Client, task_id: int) -> None:
    """Follow the task's event stream, writing its streamed text to stderr as it arrives."""
    from orchestra.client import ApiError

    streamed = False
    line_open_by: str | None = None  # the step whose text the current line holds
    try:
        for event in client.task_events(task_id):
            if event.type == EventType.STEP_TOKENS:
                step = event.data.get("step")
                if line_open_by is not None and step != line_open_by:
                    click.echo("", err=True)  # each step's text on lines of its own
                click.echo(shown(event.data["text"], lines=True), err=True, nl=False)
                streamed, line_open_by = True, step
            elif event.type == EventType.TASK_RETRYING:
                message = event.data.get("error", {}).get("message")
                click.echo(f"\n[retrying: {shown(str(message))}]", err=True)
                line_open_by = None
            elif event.type in _ATTEMPT_ENDED:  # the next attempt's text starts afresh
                attempt = event.data.get("attempt", "?")
                click.echo(f"\n[attempt {attempt} {_ATTEMPT_ENDED[event.type]}]", err=True)
                line_open_by = None
    except ApiError:
        pass  # no stream (an old server, a proxy): the result is still waited for
    finally:
        if streamed:  # the text's line ends (an error then is not glued to it)
            click.echo("", err=True)


@main.group()
def templates() -> None:
    """Templates: a running server's (list, register, reload), or files (validate, list
    --local)."""


@templates.command("list")
@click.option(
    "--local",
    is_flag=True,
    help="The templates this machine's settings load (built-ins, then [templates] dirs), "
    "without asking a server.",
)
@json_option
@url_option
@config_option
def templates_list(local: bool, as_json: bool, url: str | None, config_path: str | None) -> None:
    """List the templates a running server offers, registered ones included (NAME, VERSION,
    ORIGIN: builtin, file or api, and the description's first line; ``--json``: name,
    version, origin and description)."""
    if local:
        settings = settings_of(config_path)
        from orchestra.templating.registry import TemplateRegistry  # not for the others

        registry = TemplateRegistry(settings.templates.dirs, limits=settings.limits)
        try:
            registry.load()
        except TemplateError as exc:
            raise _template_failure(exc) from None
        rows: list[tuple[str, int, str, str]] = [
            (t.name, t.version, t.origin, t.description) for t in registry.all()
        ]
    else:
        with client_for(url, config_path) as client:
            listed = client.list_templates()
        rows = [(t.name, t.version, t.origin, t.description) for t in listed]
    for name, version, origin, description in rows:
        item = {"name": name, "version": version, "origin": origin, "description": description}
        say(item, _template_line, as_json)


def _template_line(t: dict[str, Any]) -> str:
    summary = t["description"].splitlines()[0] if t["description"] else ""
    return f"{t['name']:<20} v{t['version']:<3} {t['origin']:<8} {summary}".rstrip()


@templates.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@config_option
def templates_validate(files: tuple[Path, ...], config_path: str | None) -> None:
    """Check template files (a folder: its *.yaml and *.yml) under the configured [limits],
    and their names (a built-in's, or one given twice); print every problem as
    FILE:LINE:COLUMN: PATH: MESSAGE."""
    from orchestra.templating.loader import load_template, name_problem
    from orchestra.templating.model import Template
    from orchestra.templating.registry import (
        builtin_names,
        defined_twice,
        held_by,
        template_files,
    )

    limits = settings_of(config_path).limits
    builtins = builtin_names()
    seen: dict[str, Template] = {}
    failed = False
    # Each file once, however often it is named (a folder and a file in it).
    unique: dict[Path, Path] = {}
    for given in files:
        found = template_files(given) if given.is_dir() else [given]
        if not found:  # a CI check of an empty folder passed, checking nothing
            click.echo(f"{given}: no template files (*.yaml, *.yml) in this folder", err=True)
            failed = True
        for one in found:
            unique.setdefault(one.resolve(), one)
    for file in unique.values():
        try:
            template = load_template(file, limits)
        except TemplateError as exc:
            failed = True
            for problem in exc.problems:
                click.echo(str(problem), err=True)
            continue
        # A name one service cannot hold twice: a built-in's, or another file's here.
        name, held = template.name, builtins.get(template.name)
        if held is not None and held.resolve() != file.resolve():
            clash = f"{held_by(name, 'builtin', '')}; name yours otherwise"
        elif name in seen:
            clash = defined_twice(name, seen[name].source)
        else:
            seen[name] = template
            click.echo(f"{file}: ok ({name} v{template.version})")
            continue
        failed = True
        click.echo(str(name_problem(template, clash)), err=True)
    if failed:
        sys.exit(1)


@templates.command("register")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@url_option
@config_option
def templates_register(file: Path, url: str | None, config_path: str | None) -> None:
    """Register a template file with a running server (a new version if it changed)."""
    with client_for(url, config_path) as client, _template_problems(file):
        done = client.register_template(file)
    state = "registered" if done.created else "unchanged"
    click.echo(f"{done.template.name} v{done.template.version} {state}")


@templates.command("reload")
@url_option
@config_option
def templates_reload(url: str | None, config_path: str | None) -> None:
    """Make a running server read its template folders again."""
    with client_for(url, config_path) as client, _template_problems(None):
        loaded = client.reload_templates()
    click.echo(f"{len(loaded)} templates")


@contextmanager
def _template_problems(file: Path | None) -> Iterator[None]:
    """An error answer about templates as one message: how many problems, then each as
    FILE:LINE:COLUMN: PATH: MESSAGE, FILE being ``file`` (the one sent) or, for the service's
    own files (a reload), the file the answer names for each."""
    from orchestra.client import ApiError

    try:
        yield
    except ApiError as exc:
        if not exc.problems:
            raise  # client_for's message
        # As validate prints them (a problem with no path, a YAML error: no ": :").
        places = [
            f"{file or p.file or '<unnamed>'}:"
            + (f"{p.line}:{p.column}:" if p.line else "")
            + (f" {p.path}:" if p.path else "")
            + f" {p.message}"
            for p in exc.problems
        ]
        # The answer's message names the first problem again (as <request>:LINE:COLUMN).
        where = file if file is not None else "the service's template files"
        lines = [f"{len(exc.problems)} problem(s) in {where}:", *places]
        raise CliError("\n".join(lines)) from None


main.add_command(keys)
main.add_command(schedules)
main.add_command(tasks)
main.add_command(batch)
cli_start.done()  # loaded: Ctrl-C is the command's group's to say (_Commands)
