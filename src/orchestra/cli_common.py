"""What the CLI's commands share: the --config and --url options, the settings, and a
client (:class:`orchestra.client.Client`) for a running server whose errors become one clear
message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestra.config import Settings
from orchestra.config_file import load
from orchestra.errors import ConfigError

if TYPE_CHECKING:  # imported when a command calls a server: the others start faster
    from orchestra.client import ApiError, Client

config_option = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Settings file (default: $ORCHESTRA_CONFIG, else ./orchestra.toml if present).",
)


def settings_of(config_path: str | None) -> Settings:
    """The settings from the command's --config, else the one given before the command
    (``orchestra -c FILE tasks show 1``), else where :func:`load` looks."""
    try:
        return load(given_path(config_path))
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None


def given_path(config_path: str | None) -> str | None:
    """The command's --config, else the one given before the command (``orchestra -c FILE
    tasks show 1``); None: neither, and :func:`load` looks for one."""
    if config_path is None:
        ctx = click.get_current_context(silent=True)
        config_path = ctx.find_root().params.get("config_path") if ctx is not None else None
    return config_path


def base_url(url: str | None, config_path: str | None) -> str:
    if url:
        return url.rstrip("/")
    s = settings_of(config_path).server
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    return f"http://{host}:{s.port}"


def coerce(name: str, raw: str, schema: dict[str, Any]) -> Any:
    """Turn -p name=value text into the parameter's declared type."""
    if raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"{name}: cannot read {raw[1:]}: {exc.strerror}") from None
    kind = schema.get("properties", {}).get(name, {}).get("type", "string")
    if kind == "string":
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        raise click.BadParameter(f"{name}: expected {kind} (as JSON), got {raw!r}") from None


def param_values(items: tuple[str, ...], schema: dict[str, Any]) -> dict[str, Any]:
    """-p NAME=VALUE options as parameters, each in the type ``schema`` declares."""
    values: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: write NAME=VALUE")
        values[name] = coerce(name, raw, schema)
    return values


url_option = click.option(
    "--url", envvar="ORCHESTRA_URL", help="Server URL (default: from the settings)."
)


@contextmanager
def client_for(url: str | None, config_path: str | None) -> Iterator[Client]:
    """A client for the server, sending the key in ORCHESTRA_API_KEY if set; an error answer
    or a connection failure becomes one clear message."""
    from orchestra.client import ApiError, Client, ConnectionFailed

    base = base_url(url, config_path)
    try:
        with Client(base, timeout=90) as client:
            yield client
    except ConnectionFailed as exc:
        raise click.ClickException(f"cannot reach the server at {base}: {exc.reason}") from None
    except ApiError as exc:
        raise failure(exc) from None


def failure(exc: ApiError) -> click.ClickException:
    """The API's message, then each bad field on a line of its own."""
    lines = [exc.message, *(f"  {f.field}: {f.message}" for f in exc.fields)]
    return click.ClickException("\n".join(lines))
