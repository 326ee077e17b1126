"""How big what a task stores may be: a value's size as JSON, measured without encoding a
string already known to be too long, and the error that names the limit it passed.

The limits are ``[limits] max_step_output_bytes`` (one step's output; a ``map`` step's items
together) and ``max_result_bytes`` (the task's result). Error messages, which listings show,
are clipped to :data:`MAX_ERROR_CHARS`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from orchestra.errors import HALF_SURROGATE, InvalidOutput

#: Longest error message stored on a task or a step, in characters; the rest is cut off.
MAX_ERROR_CHARS = 2000

_encode = msgspec.json.Encoder().encode


def json_size(value: Any, limit: int) -> int:
    """The bytes of ``value``'s JSON encoding (msgspec's, as stored).

    Exact when at most ``limit``. Over it, possibly a lower bound: a string longer than the
    limit is not encoded at all (each character is at least one byte).

    Raises:
        InvalidOutput: the value holds a lone UTF-16 surrogate, which JSON cannot encode.
    """
    if isinstance(value, str) and len(value) + 2 > limit:
        return len(value) + 2
    try:
        return len(_encode(value))
    except UnicodeEncodeError as exc:
        # '\ud800' in a Jinja string, or a JSON escape of one: no text can hold it, so the
        # value could never be stored (it failed the task as an internal error).
        code = ord(str(exc.object)[exc.start])
        raise InvalidOutput(
            f"the value holds \\u{code:04x}, {HALF_SURROGATE} and cannot be stored"
        ) from None


def check_size(value: Any, limit: int, what: str, key: str) -> int:
    """The JSON size of ``value``.

    Raises:
        InvalidOutput: it is over ``limit``, named as ``[limits] key``.
    """
    try:
        size = json_size(value, limit)
    except InvalidOutput as exc:
        raise InvalidOutput(f"{what}: {exc.message}") from None
    if size > limit:
        raise too_large(what, size, limit, key)
    return size


def too_large(what: str, size: int, limit: int, key: str, more: str = "") -> InvalidOutput:
    """The error for ``what`` being ``size`` bytes against a limit of ``limit`` bytes:
    "the step's output is 1.9 MiB; the limit is 1 MiB ([limits] max_step_output_bytes)"."""
    shown, cap = human_bytes(size), human_bytes(limit)
    if shown == cap:  # just over: rounding would show the same figure twice
        shown, cap = f"{size:,} bytes", f"{limit:,} bytes"
    return InvalidOutput(f"{what} is {shown}{more}; the limit is {cap} ([limits] {key})")


def human_bytes(n: int) -> str:
    """``n`` bytes in binary units, to one decimal: 512 bytes, 1.5 KiB, 1 MiB, 3.2 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n:,} bytes"


def clip_message(message: str) -> str:
    """An error message as stored: at most :data:`MAX_ERROR_CHARS` characters."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return message[: MAX_ERROR_CHARS - 1] + "…"
