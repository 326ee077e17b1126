"""URLs as they may be shown: without a password or a key.

A provider URL may carry credentials: userinfo (``http://admin:secret@host:11434``, which httpx
sends as Basic auth) or a key in its query (``?key=…``, ``?api_key=…``). :func:`redact_url`
masks them and keeps the rest (scheme, host, port, path), so a reader still sees which server
is meant; :func:`redact_text` does the same to every URL in a text (an error message, a log
line). Everything the service shows or logs about a provider passes through one of them: the
providers build their messages from the redacted URL, and the log formatter
(:mod:`orchestra.logs`) redacts every line it writes, other libraries' (httpx's) included.

A server may also repeat a credential outside any URL: an error body that echoes the
``Authorization`` header it was sent ("invalid api key: Bearer sk-…", or Basic auth's
base64). :func:`secret_values` lists what a provider sends that is secret (its API key; its
URL's password, also as Basic auth; its URL's secret query values), and :func:`scrub` masks
each of them wherever it appears in a text.

This module imports nothing of the service's, so anything may use it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

#: What stands in for a secret.
MASK = "***"
#: Query parameters that carry a secret (compared in lower case, with ``-`` as ``_``).
SECRET_PARAMS = frozenset(
    {
        "key",
        "api_key",
        "apikey",
        "access_key",
        "access_token",
        "auth",
        "token",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "sig",
        "signature",
    }
)

# A URL in free text: a scheme, "://", and everything up to white space or a quote (a URL in
# a JSON string, a repr or a log line ends there), less a last ".", ",", ":", ";" or ")" (the
# sentence's, as in "cannot connect to http://host:1: refused").
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>`]*[^\s\"'<>`.,:;)]")
_AUTHORITY_END = re.compile(r"[/?#]")
_QUERY_START = re.compile(r"[?#]")
# What an authority without userinfo looks like: a host (or [IPv6]) and an optional port.
_HOST_PORT = re.compile(r"(\[[^\]]*\]|[^:@]*)(:[0-9]*)?")


def redact_url(url: str) -> str:
    """``url`` with its userinfo and its secret query values masked.

    ``http://admin:secret@host:11434/api`` is ``http://***@host:11434/api``;
    ``https://host/v1?key=abc&x=1`` is ``https://host/v1?key=***&x=1``. Anything else is
    kept as written, and a text without ``://`` is returned unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The authority ends at the first "/", "?" or "#"; its userinfo at its last "@" (a
    # password with an unescaped "@" is still all masked).
    authority = _AUTHORITY_END.split(rest, maxsplit=1)[0]
    if "@" not in authority and not _HOST_PORT.fullmatch(authority):
        # Not a host and port, so perhaps a password with an unescaped "/" ("admin:pa/ss@h"):
        # such a URL cannot work, but its password must not show either, so the userinfo
        # runs to the last "@" before the query.
        userinfo, at, _ = _QUERY_START.split(rest, maxsplit=1)[0].rpartition("@")
        if at:
            host = _AUTHORITY_END.split(rest[len(userinfo) + 1 :], maxsplit=1)[0]
            authority = f"{userinfo}@{host}"
    tail = rest[len(authority) :]
    if "@" in authority:
        authority = f"{MASK}@{authority.rpartition('@')[2]}"
    return f"{scheme}://{authority}{_redact_query(tail)}"


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact_url`."""
    if "://" not in text:  # the common case, and cheap: most log lines name no URL
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


#: Secrets shorter than this are not looked for in texts: masking every "ab" of a message
#: would garble it, and so short a value protects nothing anyway.
MIN_SECRET = 4


def secret_values(api_key: str | None = None, url: str = "") -> tuple[str, ...]:
    """What a provider sends that is secret, longest first: ``api_key``; the password of
    ``url``'s userinfo as written, percent-decoded, and as the Basic auth credentials httpx
    makes of it (base64 of ``user:password``); the values of its :data:`SECRET_PARAMS`.
    Values shorter than :data:`MIN_SECRET` are left out."""
    found = {api_key or ""}
    try:
        parts = urlsplit(url)
        password, username = parts.password, parts.username
    except ValueError:  # a URL that cannot be parsed cannot have been used either
        parts, password, username = None, None, None
    if password:
        user, secret = unquote(username or ""), unquote(password)
        basic = base64.b64encode(f"{user}:{secret}".encode()).decode()
        found |= {password, secret, basic}
    if parts is not None:
        for name, value in parse_qsl(parts.query, keep_blank_values=False):
            if name.lower().replace("-", "_") in SECRET_PARAMS:
                found |= {value, unquote(value)}
    return tuple(sorted((v for v in found if len(v) >= MIN_SECRET), key=len, reverse=True))


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` in it masked, and every URL's credentials
    (:func:`redact_text`). Give the longest first (:func:`secret_values` does): one that
    contains another is masked whole."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return redact_text(text)


def _redact_query(tail: str) -> str:
    """A path, query and fragment with the values of :data:`SECRET_PARAMS` masked."""
    path, sep, query = tail.partition("?")
    if not sep:
        return tail
    query, hash_, fragment = query.partition("#")
    fields = []
    for field in query.split("&"):
        name, eq, _value = field.partition("=")
        secret = name.lower().replace("-", "_") in SECRET_PARAMS
        fields.append(f"{name}={MASK}" if eq and secret else field)
    return f"{path}?{'&'.join(fields)}{hash_}{fragment}"
