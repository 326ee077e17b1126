"""``orchestra keys``: API keys, read and written straight in the database the settings name
(not over HTTP: a key is needed to call the API at all).

These are the CLI's only commands that open the database. They work on the service's own
database or not at all: they never create one. A SQLite file that does not exist is refused
with its path and how to name the right one (``orchestra keys create`` run in the wrong folder
used to make a fresh ``./orchestra.db`` and print a key the service never saw), and each
says on stderr which database it used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import click

from orchestra.auth import SCOPES, ApiKey, Scope, is_loopback
from orchestra.cli_common import (
    CliError,
    NothingFound,
    config_option,
    given_path,
    json_option,
    say_none,
    settings_of,
    shown,
    to_json,
)
from orchestra.config_file import origin
from orchestra.errors import SURROGATE, ConfigError, NotFoundError, OrchestraError

if TYPE_CHECKING:  # the database's modules load SQLAlchemy: only for these commands
    from orchestra.config import Settings
    from orchestra.db.keys import KeyStore

T = TypeVar("T")


@click.group()
def keys() -> None:
    """API keys (stored in the database the settings name; never creates one)."""


def database_of(settings: Settings, config_path: str | None) -> str:
    """Where the settings' database is, for messages: a SQLite file's absolute path, or a
    PostgreSQL server and database (never the password).

    Raises:
        CliError: the URL is not usable, or its SQLite file does not exist.
    """
    from orchestra.db.engine import SQLITE, check_url, parse_url, server_where

    url = settings.database.url
    source = origin("database.url", given_path(config_path))
    try:
        parsed = parse_url(url)
    except ConfigError as exc:
        raise CliError(f"{exc.message} (from {source})") from None
    if parsed.get_backend_name() != SQLITE:
        return server_where(url)
    path = check_url(url).absolute()
    if not path.is_file():
        raise CliError(
            f"no database at {path}\n"
            f"  database.url = {url!r} (from {source})\n"
            "The keys commands work on the service's own database and never create one: run\n"
            "them where the service runs, or name its database with --config FILE ([database]\n"
            "url) or ORCHESTRA_DATABASE__URL=sqlite+aiosqlite:////absolute/path/orchestra.db.\n"
            "('orchestra serve' creates its database on its first start.)"
        )
    return str(path)


def _key_store_call(config_path: str | None, work: Callable[[KeyStore], Awaitable[T]]) -> T:
    """``work`` done on the key store of the settings' database, which must exist; says on
    stderr which database it is."""
    settings = settings_of(config_path)
    where = database_of(settings, config_path)
    click.echo(f"database: {where}", err=True)

    from orchestra.db.engine import Database
    from orchestra.db.keys import KeyStore
    from orchestra.db.schema import LATEST
    from orchestra.db.strangers import recorded_version

    async def run() -> T:
        db = Database(settings.database.url, **settings.database.engine_options())
        try:
            # Never migrated here: a wrong database.url must not get Orchestra's schema, and
            # a newer CLI must not upgrade the database under an older running service.
            version = await recorded_version(db)
            if version == 0:
                raise CliError(
                    f"{where} holds no Orchestra database yet: 'orchestra serve' makes it on "
                    "its first start (or name the service's database with --config FILE or "
                    "ORCHESTRA_DATABASE__URL)"
                )
            if version > LATEST:
                raise CliError(
                    f"{where} is at schema version {version}, a newer orchestra's than this "
                    f"one (version {LATEST}): use the keys commands of the service's own version"
                )
            if version != LATEST:
                raise CliError(
                    f"{where} is at schema version {version}, and this orchestra works on "
                    f"version {LATEST}: use the keys commands of the service's own version "
                    "(this version's 'orchestra serve' migrates it)"
                )
            return await work(KeyStore(db))
        finally:
            await db.close()

    try:
        return asyncio.run(run())
    except NotFoundError as exc:
        raise NothingFound(exc.message) from None
    except OrchestraError as exc:
        raise CliError(exc.message) from None


@keys.command("create")
@click.option("--name", required=True, help="Who or what the key is for (unique).")
@click.option(
    "--scope",
    type=click.Choice(SCOPES),
    default="submit",
    show_default=True,
    help=(
        "read: GET endpoints (webhooks' need admin); submit: also create, cancel, retry "
        "tasks; admin: everything."
    ),
)
@config_option
def keys_create(name: str, scope: Scope, config_path: str | None) -> None:
    """Make a key and print it. It is shown this once: only its SHA-256 is kept."""

    async def create(store: KeyStore) -> tuple[ApiKey, str, int]:
        key, token = await store.create(name, scope)
        return key, token, len(await store.active_digests())

    key, token, active = _key_store_call(config_path, create)
    click.echo(token)
    click.echo(f"key {key.id} ({key.name}, {key.scope}) created; store it now", err=True)
    if active == 1 and not settings_of(config_path).auth.allow_anonymous:
        click.echo(first_key_warning(key.scope), err=True)


def first_key_warning(scope: Scope) -> str:
    """What the first active key changes, said as it is made (the dashboard asks first)."""
    told = (
        "warning: this is the only active key, so from now on (within 2 s on a running "
        "service) every request needs a key: Authorization: Bearer orc_… (the CLI's client "
        "commands read ORCHESTRA_API_KEY)"
    )
    if scope != "admin":
        told += (
            f"; a {scope} key cannot register templates or manage the service: make an "
            "admin key too (orchestra keys create --name admin --scope admin)"
        )
    return told


def key_table(keys: list[ApiKey]) -> list[str]:
    """The keys as aligned columns: id, name, scope, created, state (a header first)."""
    rows = [("ID", "NAME", "SCOPE", "CREATED", "STATE")]
    for key in keys:
        state = f"revoked {key.revoked_at}" if key.revoked_at else "active"
        rows.append((key.id, key.name, key.scope, key.created_at, state))
    cells = [[shown(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


@keys.command("list")
@json_option
@config_option
def keys_list(as_json: bool, config_path: str | None) -> None:
    """Every key: id, name, scope, created, and active or when it was revoked (``--json``:
    one object per key, ``revoked_at`` null while active; never a secret)."""
    found = _key_store_call(config_path, lambda store: store.all())
    if not found:
        say_none("keys")
        return
    for line in (to_json(key) for key in found) if as_json else key_table(found):
        click.echo(line)


def _text(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """The argument, if it is text: one that is not UTF-8 (a lone surrogate here) was a
    traceback from the database's driver."""
    if SURROGATE.search(value):
        raise click.BadParameter(f"{value!r} is not UTF-8: give the key's name or id as typed")
    return value


@keys.command("revoke")
@click.argument("name_or_id", callback=_text)
@config_option
def keys_revoke(name_or_id: str, config_path: str | None) -> None:
    """Revoke a key by name or id; a running service stops accepting it within seconds."""

    async def revoke(store: KeyStore) -> tuple[ApiKey, bool]:
        try:
            key = await store.revoke(name_or_id)
            return key, not await store.active_digests()
        except NotFoundError:
            gone = [k for k in await store.all() if name_or_id in (k.id, k.name)]
            gone.sort(key=lambda k: k.id != name_or_id)  # an id names its key first
            if gone and gone[0].revoked_at:
                key = gone[0]
                message = f"key {key.id} ({key.name}) was revoked already, at {key.revoked_at}"
                raise NotFoundError(message) from None
            raise NotFoundError(f"no key with id or name {name_or_id!r}") from None

    key, none_left = _key_store_call(config_path, revoke)
    click.echo(f"key {key.id} ({key.name}) revoked")
    settings = settings_of(config_path)
    if none_left and not settings.auth.allow_anonymous:  # (allowed, nothing changes)
        click.echo(no_key_left_warning(settings.server.host), err=True)


def no_key_left_warning(host: str) -> str:
    """What the last active key's revoke changes for a service listening on ``host``."""
    if is_loopback(host):
        return (
            "warning: no active key is left, so the service needs none again: requests from "
            "this machine (on a loopback address, not through a proxy) are served as admin. "
            "Make a key (orchestra keys create) to close it."
        )
    return (
        f"warning: no active key is left: a service listening on {host} refuses every "
        "request until it starts again, which makes a new admin key (printed in its log). "
        "Make a key now (orchestra keys create --scope admin) to keep access."
    )
