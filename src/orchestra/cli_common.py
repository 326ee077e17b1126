"""What the CLI's commands share: the --config and --url options, the settings, a client
(:class:`orchestra.client.Client`) for a running server whose errors become one clear message
and an exit code of their own, JSON output, and lines for people that show a terminal's
control characters escaped (:func:`shown`).

Exit codes (docs/install.md, "Exit codes"):

====  =====================================================================================
0     done
1     the task failed or was cancelled (``submit --wait``); any other error (invalid
      template parameters, a conflict, a template's problems, the settings, a missing
      database)
2     a usage error (click's own: an unknown option, a bad value; a malformed ``-p``)
3     the server cannot be reached (refused, timed out, an event stream that stayed down)
4     the API key is missing or refused (401), or its scope is too small (403), or it
      cannot be sent (not printable ASCII)
5     not found (404: a task, a template, a schedule; ``keys revoke``: no such active key)
6     the request went out and no answer came (a timeout, a broken connection): it may
      have been carried out, so check before sending it again
130   interrupted (Ctrl-C); 141: the output's reader stopped reading (``| head``)
====  =====================================================================================
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec
from click.core import ParameterSource

from orchestra.config import Settings
from orchestra.config_file import load
from orchestra.errors import ConfigError

if TYPE_CHECKING:  # imported when a command calls a server: the others start faster
    from orchestra.client import ApiError, Client


class ExitCode(IntEnum):
    """What the CLI's exit status says (see the module's docstring)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    AUTH = 4
    NOT_FOUND = 5
    UNKNOWN = 6


class CliError(click.ClickException):
    """A command failed: its message is printed as ``Error: …`` and it exits 1."""

    exit_code = ExitCode.FAILED

    def format_message(self) -> str:
        """The message, its control characters escaped (it may quote a server's words)."""
        return shown(self.message, lines=True)


class ServerUnreachable(CliError):
    """Nothing answered at the server's URL (exit 3)."""

    exit_code = ExitCode.UNREACHABLE


class OutcomeUnknown(CliError):
    """A request that changes something went out, and no answer came: it may have been
    carried out (exit 6; exit 3 would tell a script it is safe to send it again)."""

    exit_code = ExitCode.UNKNOWN


class KeyRefused(CliError):
    """The server refused the API key sent, or its lack (401), or its scope (403) (exit 4)."""

    exit_code = ExitCode.AUTH


class NothingFound(CliError):
    """What the command names does not exist (exit 5)."""

    exit_code = ExitCode.NOT_FOUND


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


def given_url(url: str | None) -> str | None:
    """The command's --url, else the one given before the command (``orchestra --url URL
    tasks list``), else ORCHESTRA_URL (which click gives as the command's)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return url
    before = ctx.find_root().params.get("url")
    from_env = ctx.get_parameter_source("url") in (ParameterSource.ENVIRONMENT, None)
    return before if before and (url is None or from_env) else url


def base_url(url: str | None, config_path: str | None) -> str:
    """The server's URL: ``--url`` (after or before the command, or ``ORCHESTRA_URL``), else
    the settings' host and port.

    Raises:
        click.BadParameter: ``--url`` is not an http(s) URL.
    """
    url = given_url(url)
    if url:
        scheme, _, rest = url.partition("://")
        if scheme.lower() not in ("http", "https") or not rest.strip("/") or not _parses(url):
            raise click.BadParameter(
                f"{url!r} is not a URL such as http://127.0.0.1:8000", param_hint="'--url'"
            )
        if extra := _beyond_the_server(url):
            from orchestra.redact import redact_url  # its password is not printed

            raise click.BadParameter(f"{redact_url(url)!r} {extra}", param_hint="'--url'")
        return url.rstrip("/")
    s = settings_of(config_path).server
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    if _is_ipv6(host):  # a URL holds an IPv6 address in brackets (http://[::1]:8000)
        host = f"[{host}]"
    return f"http://{host}:{s.port}"


def _is_ipv6(host: str) -> bool:
    """Whether ``host`` is an IPv6 address (``::1``; with a zone, ``fe80::1%eth0``)."""
    import ipaddress

    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _beyond_the_server(url: str) -> str | None:
    """What ``--url`` holds that the CLI would not send as meant: a query or a fragment (a
    query replaced the API's path: every request went to ``/``), or a user and password (sent
    as Basic auth over the API key's header)."""
    import httpx

    parts = httpx.URL(url)
    if parts.userinfo:
        return (
            "holds a user and password: the CLI sends the API key in ORCHESTRA_API_KEY; give "
            "the URL without them"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "holds a query or a fragment: give the server's URL alone (and a path prefix)"
    return None


def _parses(url: str) -> bool:
    """Whether ``url`` is one httpx can send to (a port of digits, a closed bracket, no
    control character): a bad one was a traceback from the first request. Its port is one
    of TCP's (1 to 65535): a larger one wrapped (87837 reached 22301)."""
    import httpx

    try:
        parts = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return False
    return bool(parts.host) and (parts.port is None or 0 < parts.port <= 65535)


def coerce(name: str, raw: str, schema: dict[str, Any]) -> Any:
    """Turn -p name=value text into the parameter's declared type.

    ``@FILE`` is the file's text, ``@-`` standard input's, and ``@@…`` the text ``@…`` (a
    value that starts with ``@``, a mention say).

    Raises:
        click.BadParameter: ``@FILE`` cannot be read (a usage error: exit 2).
        CliError: the value is not of the parameter's type (an invalid parameter, as the
            server's 422: exit 1).
    """
    if raw.startswith("@@"):
        raw = raw[1:]
    elif raw == "@-":
        try:
            raw = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise click.BadParameter(f"{name}: standard input is not UTF-8 text") from exc
    elif raw.startswith("@"):
        try:
            raw = Path(raw[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise click.BadParameter(f"{name}: cannot read {raw[1:]}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start]
            raise click.BadParameter(
                f"{name}: {raw[1:]} is not UTF-8 text (byte {exc.start}: {bad:#04x})"
            ) from None
    kind = schema.get("properties", {}).get(name, {}).get("type", "string")
    if kind == "string":
        return raw
    try:
        return json.loads(raw, parse_constant=_not_finite, parse_float=_finite)
    except _NotFinite as exc:
        raise CliError(
            f"invalid parameter {name}: {exc} in {raw!r} cannot be sent (JSON has no NaN or "
            "infinity)"
        ) from None
    except ValueError:
        raise CliError(
            f"invalid parameter {name}: expected {kind} (as JSON), got {raw!r}"
        ) from None


class _NotFinite(ValueError):
    """A number JSON cannot carry, which Python's json reads (NaN, Infinity, 1e999)."""


def _not_finite(word: str) -> float:
    raise _NotFinite(word)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


def param_values(items: tuple[str, ...], schema: dict[str, Any]) -> dict[str, Any]:
    """-p NAME=VALUE options as parameters, each in the type ``schema`` declares."""
    values: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: write NAME=VALUE")
        if name in values:
            raise click.BadParameter(f"{name} is given twice: give each parameter once")
        values[name] = coerce(name, raw, schema)
    return values


url_option = click.option(
    "--url",
    envvar="ORCHESTRA_URL",
    help="Server URL, such as http://127.0.0.1:8000 (default: $ORCHESTRA_URL, else the "
    "settings' [server] host and port).",
)


#: Seconds a client command waits for an answer (``orchestra --timeout``), as the client.
DEFAULT_TIMEOUT = 30.0


def _timeout() -> float:
    """``orchestra --timeout`` (or ORCHESTRA_TIMEOUT), given before the command."""
    ctx = click.get_current_context(silent=True)
    given = ctx.find_root().params.get("timeout") if ctx is not None else None
    return float(given) if given is not None else DEFAULT_TIMEOUT


@contextmanager
def client_for(url: str | None, config_path: str | None) -> Iterator[Client]:
    """A client for the server, sending the key in ORCHESTRA_API_KEY if set; an error answer
    or a connection failure becomes one clear message."""
    import httpx

    from orchestra.client import (
        ApiError,
        Client,
        ConnectionFailed,
        InvalidApiKey,
        UnsendableValue,
    )

    base = base_url(url, config_path)
    timeout = _timeout()
    try:
        with Client(base, timeout=timeout) as client:
            yield client
    except InvalidApiKey as exc:
        raise KeyRefused(str(exc)) from None
    except UnsendableValue as exc:
        if "surrogate" not in str(exc):  # a NaN or an infinity (--delay nan), say
            raise CliError(str(exc)) from None
        raise CliError(  # a lone surrogate: an argument that is not UTF-8
            f"{exc}: an argument (or a file read with @) is not UTF-8; give its text as UTF-8"
        ) from None
    except ConnectionFailed as exc:
        if exc.broke:  # first: a POST's timeout is one too, and it may have been done
            raise OutcomeUnknown(
                f"{exc}; see whether it was (orchestra tasks list) before sending it again"
            ) from None
        if isinstance(exc.__cause__, httpx.TimeoutException):
            raise ServerUnreachable(
                f"the server at {base} did not answer within {timeout:g} s "
                "(orchestra --timeout SECONDS, or ORCHESTRA_TIMEOUT, waits longer)"
            ) from None
        if exc.cut:
            raise ServerUnreachable(str(exc)) from None
        raise ServerUnreachable(f"cannot reach the server at {base}: {exc.reason}") from None
    except ApiError as exc:
        raise failure(exc, base) from None


#: The API's advice on a 401, for HTTP callers; a CLI user is told how to give the key.
_HTTP_ADVICE = ": send it as 'Authorization: Bearer <key>'"


def failure(exc: ApiError, base: str | None = None) -> CliError:
    """The API's message, then each bad field on a line of its own (unless the message says
    it already); its exit code by status (401 and 403: how the CLI sends a key). An answer
    without Orchestra's error body (another web server at ``base``) says to check --url."""
    message = exc.message.replace(_HTTP_ADVICE, "")
    lines = [
        message,
        *(
            f"  {f.field}: {f.message}"
            for f in exc.fields
            if f"{f.field}: {f.message}" not in message
        ),
    ]
    if exc.code == "http_error" and base is not None:
        lines.append(
            f"the server at {base} did not answer as Orchestra does: is --url (or "
            "ORCHESTRA_URL) the Orchestra service's address, and is no proxy in the way?"
        )
    if exc.code == "not_found" and base is not None and base.rstrip("/").endswith("/api/v1"):
        lines.append(
            "--url (or ORCHESTRA_URL) is the service's address without /api/v1: "
            f"--url {base.rstrip('/').removesuffix('/api/v1')}"
        )
    if exc.status == 401:
        lines.append(key_advice(os.environ.get("ORCHESTRA_API_KEY")))
        return KeyRefused("\n".join(lines))
    if exc.status == 403:
        lines.append(
            "the key in ORCHESTRA_API_KEY lacks that scope: use a key that has it"
            if os.environ.get("ORCHESTRA_API_KEY")
            else "no key was sent: set ORCHESTRA_API_KEY to a key with that scope"
        )
        return KeyRefused("\n".join(lines))
    if exc.status == 404 and not exc.code.endswith("_not_found"):
        # Not a task or a schedule missing: nothing of Orchestra's at that URL (another web
        # server's 404, or a path under the service's). Exit 5 told scripts the task was gone.
        return ServerUnreachable("\n".join(lines))
    return (NothingFound if exc.status == 404 else CliError)("\n".join(lines))


def key_advice(sent: str | None) -> str:
    """How to give the CLI a key, after a 401 (``sent``: the key it sent, if any)."""
    make = "make one with 'orchestra keys create --name NAME --scope SCOPE' where the server runs"
    if sent:
        return (
            "the key in ORCHESTRA_API_KEY was refused (revoked, mistyped, or another "
            f"server's): set ORCHESTRA_API_KEY to a key of this server ({make})"
        )
    return f"the CLI sends the key in ORCHESTRA_API_KEY: export ORCHESTRA_API_KEY=orc_… ({make})"


def to_json(value: Any, *, indent: int | None = None) -> str:
    """An answer struct as JSON, its milliseconds (``*_ms`` floats) rounded to 0.1 ms: a
    ``duration_ms`` is a difference of two clock readings (1019.2300000000001)."""
    return json.dumps(_rounded(msgspec.to_builtins(value)), indent=indent)


def _rounded(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _rounded(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, key) for v in value]
    if isinstance(value, float) and key.endswith("_ms"):
        return round(value, 1)
    return value


#: ``--json``: what a command prints, as JSON (a list: one object per line), for scripts.
json_option = click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON instead: one object per line (a list's items, or the one answer).",
)


#: What a terminal acts on instead of showing: C0 and C1 controls (an escape sequence sets
#: colours or the window's title), DEL, and the bidi embeddings, overrides and isolates
#: (text shown in another order than it is).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
#: The same, but for line ends and tabs (text shown as lines: a model's streamed text).
_CONTROL_IN_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


#: The controls written as Python writes them.
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped(match: re.Match[str]) -> str:
    if (named := _NAMED.get(match.group())) is not None:
        return named
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def shown(text: str, *, lines: bool = False) -> str:
    """``text`` for a line for people: each control character (C0, DEL, C1, bidi controls)
    written as its Python escape (``\\x1b``, ``\\u202e``), so a string someone else wrote (a
    template's description, a task's error) cannot drive the terminal it is printed on,
    nor break its line. ``lines``: text shown as lines keeps its line ends (LF) and tabs."""
    return (_CONTROL_IN_LINES if lines else _CONTROL).sub(_escaped, text)


def say(item: Any, line: Callable[[Any], str], as_json: bool) -> None:
    """Print one answer: as JSON (``--json``: data, as the API sent it) or as the command's
    line for people (:func:`shown`)."""
    click.echo(to_json(item) if as_json else shown(line(item)))


def say_none(what: str) -> None:
    """Say on stderr that a list is empty (stdout stays empty, for scripts)."""
    click.echo(f"no {what}", err=True)
