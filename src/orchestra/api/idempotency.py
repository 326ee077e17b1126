"""The Idempotency-Key header and the body's idempotency_key: read, checked, reconciled.

HTTP hands header values over as bytes, which the ASGI layer turns into text as Latin-1.
A key typed in a terminal (``curl -H 'Idempotency-Key: café'``) or sent by the Python
client is UTF-8, so the header's bytes are read again as UTF-8: the same key in the header
and in a JSON body is the same key, and the database keeps it as typed. Bytes that are not
UTF-8 are refused, naming the header, rather than kept as mojibake.
"""

from __future__ import annotations

from typing import Any

from orchestra.domain import CONTROL
from orchestra.errors import FieldProblem, InvalidRequest
from orchestra.wire.tasks import MAX_IDEMPOTENCY_KEY

HEADER = "Idempotency-Key"
#: What the OpenAPI document says of the header (its checks are here: Litestar's own
#: errors would name the handler's parameter, not the header).
HEADER_DESCRIPTION = (
    f"1 to {MAX_IDEMPOTENCY_KEY} characters, UTF-8, no control characters. "
    "Sending again with the same key answers with what the first request made."
)


def _refuse(field: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{field} {problem}", [FieldProblem(field, problem)])


def _no_control(field: str, value: str) -> None:
    found = CONTROL.search(value)  # refused in keys as params refuse NUL
    if found:
        raise _refuse(
            field, f"contains a control character (U+{ord(found.group()):04X}), not accepted"
        )


def sent_once(headers: Any) -> None:
    """Refuse a request that sends the Idempotency-Key header more than once (its first
    value was taken, the others dropped: a proxy's or a library's key beside the caller's
    defeated the de-duplication without a word).

    Raises:
        InvalidRequest: naming the header.
    """
    if len(headers.getall(HEADER.lower(), [])) > 1:
        raise _refuse(HEADER, "is sent more than once; send one key")


def header_key(raw: str | None) -> str | None:
    """The Idempotency-Key header's value as its sender meant it (UTF-8), checked.

    Raises:
        InvalidRequest: naming the header: not UTF-8, empty, over 255 characters, or
            holding a control character.
    """
    if raw is None:
        return None
    try:
        key = raw.encode("latin-1").decode("utf-8")
    except UnicodeError:  # a character past U+00FF (not from the wire) or bytes not UTF-8
        raise _refuse(HEADER, "is not UTF-8 text") from None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise _refuse(
            HEADER,
            "is empty"
            if not key
            else f"is {len(key)} characters; the limit is {MAX_IDEMPOTENCY_KEY}",
        )
    _no_control(HEADER, key)
    return key


def request_key(body: str | None, header: str | None) -> str | None:
    """The request's idempotency key, from the body field or the header (equal when both).

    Raises:
        InvalidRequest: the header is refused by :func:`header_key`, the body's key holds a
            control character, or the two differ.
    """
    key = header_key(header)
    if body is not None:
        _no_control("idempotency_key", body)
    if key is None:
        return body
    if body is not None and body != key:
        raise InvalidRequest(
            f"the {HEADER} header and idempotency_key differ",
            [FieldProblem("idempotency_key", f"differs from the {HEADER} header")],
        )
    return key
