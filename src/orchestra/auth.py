"""API keys: how they look, how they are checked, what each scope allows.

A key is ``orc_<id>_<secret>``: ``id`` (8 characters) names the key in listings and finds its
row; ``secret`` (43 characters, 256 random bits) is never stored. The database keeps the
SHA-256 of the whole key, and a presented key is compared with it in constant time
(``hmac.compare_digest``), so neither the table nor the timing of an answer gives a key away.

Scopes are ordered: ``read`` (GET endpoints, but webhooks') < ``submit`` (create, cancel, retry
tasks; validate templates) < ``admin`` (register, delete and reload templates; webhooks).
A key allows its own scope and those below it.

A service that listens beyond this machine with no active key makes one admin key when it
starts (:func:`bootstrap_key`) and shows its token once, as Jupyter does with its token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import string
from typing import TYPE_CHECKING, Literal

import msgspec

from orchestra.config import AuthSettings

if TYPE_CHECKING:  # db.keys imports this module: the store is only named for the types
    from orchestra.db.keys import KeyStore

Scope = Literal["read", "submit", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "submit", "admin")
PREFIX = "orc_"
_ID_CHARS = string.ascii_lowercase + string.digits
#: The name of the key a first start beyond this machine makes.
BOOTSTRAP_NAME = "bootstrap"


class ApiKey(msgspec.Struct, frozen=True):
    """A stored key, without its secret."""

    id: str
    name: str
    scope: Scope
    created_at: str
    revoked_at: str | None = None


class Caller(msgspec.Struct, frozen=True):
    """Who made a request: a key's name, or ``anonymous``; and what they may do."""

    name: str
    scope: Scope
    key_id: str | None = None


def new_token() -> tuple[str, str]:
    """A fresh key: (its public id, the whole token to hand out once)."""
    key_id = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def digest(token: str) -> str:
    """The SHA-256 (hex) stored for a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_of(token: str) -> str | None:
    """The public id in a token shaped like ours, else None."""
    if not token.startswith(PREFIX):
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not sep or len(key_id) != 8 or not secret:
        return None
    return key_id


def matches(token: str, stored_digest: str) -> bool:
    """Whether ``token`` is the key whose digest is stored (constant time)."""
    return hmac.compare_digest(digest(token), stored_digest)


def allows(have: Scope, need: Scope) -> bool:
    """Whether a caller with scope ``have`` may do what needs ``need``."""
    return SCOPES.index(have) >= SCOPES.index(need)


def is_loopback(host: str) -> bool:
    """Whether a listen address only reaches this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def bootstrap_key(
    store: KeyStore, host: str, settings: AuthSettings
) -> tuple[ApiKey, str] | None:
    """On a start beyond this machine with no active key, make an admin key.

    Listening on ``host`` beyond loopback (0.0.0.0 in a container) with no active key and
    ``allow_anonymous`` off, every request would be refused and nobody could make a key over
    HTTP. So an ``admin`` key named :data:`BOOTSTRAP_NAME` is made (only its digest is
    stored); the caller shows its token once (``orchestra serve`` logs it and prints it). The
    next start finds the key and makes none. Revoked keys do not count: with every key
    revoked, a start makes a new one. On loopback, or with ``allow_anonymous``, nothing is
    made.

    Returns:
        The key made and its token, or None.
    """
    if is_loopback(host) or settings.allow_anonymous:
        return None
    return await store.create_if_none_active(BOOTSTRAP_NAME, "admin")
