"""API keys: how they look, how they are checked, what each scope allows.

A key is ``orc_<id>_<secret>``: ``id`` (8 characters) names the key in listings and finds its
row; ``secret`` (43 characters, 256 random bits) is never stored. The database keeps the
SHA-256 of the whole key, and a presented key is compared with it in constant time
(``hmac.compare_digest``), so neither the table nor the timing of an answer gives a key away.

Scopes are ordered: ``read`` (GET endpoints) < ``submit`` (create, cancel, retry tasks;
validate templates) < ``admin`` (register, delete and reload templates). A key allows its
own scope and those below it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import string
from typing import Literal

import msgspec

Scope = Literal["read", "submit", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "submit", "admin")
PREFIX = "orc_"
_ID_CHARS = string.ascii_lowercase + string.digits


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
