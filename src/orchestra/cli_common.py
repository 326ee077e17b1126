"""What the CLI's commands share: the --config and --url options, the settings, and an HTTP
client for a running server that turns its error answers into one clear message."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import httpx

from orchestra.config import Settings
from orchestra.config_file import load
from orchestra.errors import ConfigError

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
    if config_path is None:
        ctx = click.get_current_context(silent=True)
        config_path = ctx.find_root().params.get("config_path") if ctx is not None else None
    try:
        return load(config_path)
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None


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


url_option = click.option(
    "--url", envvar="ORCHESTRA_URL", help="Server URL (default: from the settings)."
)


@contextmanager
def client_for(url: str | None, config_path: str | None) -> Iterator[httpx.Client]:
    """An HTTP client for the server, sending the key in ORCHESTRA_API_KEY if set; a
    connection failure becomes one clear line."""
    base = base_url(url, config_path)
    key = os.environ.get("ORCHESTRA_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=base, timeout=90, headers=headers) as client:
            yield client
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the server at {base}: {exc}") from None


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    response = client.request(method, path, **kwargs)
    if response.status_code != 200:
        raise failure(response)
    return response.json()


def failure(response: httpx.Response) -> click.ClickException:
    try:
        body = response.json()
        lines = [body.get("message", response.text)]
        lines += [f"  {f['field']}: {f['message']}" for f in body.get("fields", [])]
        return click.ClickException("\n".join(lines))
    except (ValueError, KeyError, TypeError, AttributeError):
        return click.ClickException(f"{response.status_code}: {response.text[:500]}")
