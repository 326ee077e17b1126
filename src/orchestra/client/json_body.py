"""Request bodies as JSON, refusing what JSON cannot carry instead of changing it.

msgspec writes a NaN or an infinity as ``null`` and bytes as base64 text, and raises a bare
``UnicodeEncodeError`` on a string holding a lone surrogate (UTF-8 has no form for one). A
parameter would then arrive as something else than was given (a NaN as "null is not of type
'number'", or unseen where the parameter is optional), or the caller would not learn which
value was wrong. :func:`encode` raises :class:`~orchestra.client.errors.UnsendableValue` (a
``ValueError``) naming the value's place instead
(``params.scores[2] is nan, which JSON cannot carry``), before anything is sent.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import msgspec

from orchestra.client.errors import UnsendableValue

#: A Decimal as a JSON number, not a string (a ``number`` parameter given Decimal("1.5")).
_encode = msgspec.json.Encoder(decimal_format="number").encode
#: Kept as they are by ``to_builtins``, so that the check below sees them.
_RAW = (bytes, bytearray, memoryview)
_KEPT = (*_RAW, Decimal)


def encode(value: Any, root: str = "the body") -> bytes:
    """``value`` (a struct, or dicts and lists) as JSON.

    Raises:
        UnsendableValue: a NaN or infinite float (or Decimal), bytes, a key of bytes or NaN,
            or a string (or key) with a lone surrogate, named by its place in ``value``
            (``root`` for the value itself). A finite Decimal goes as a JSON number.
    """
    plain = msgspec.to_builtins(value, builtin_types=_KEPT)
    problem = _unsendable(plain, "", root, strings=False)
    if problem is None:
        try:
            return _encode(plain)
        except UnicodeEncodeError:
            # Strings are looked at only now: the usual body holds none of these.
            problem = _unsendable(plain, "", root, strings=True)
    raise UnsendableValue(problem or "the body cannot be written as JSON")


def _unsendable(value: Any, at: str, root: str, *, strings: bool) -> str | None:
    """What in ``value`` (at the place ``at``) JSON cannot carry, said; None: nothing."""
    if isinstance(value, (float, Decimal)):
        if not (value.is_finite() if isinstance(value, Decimal) else math.isfinite(value)):
            return f"{at or root} is {value!r}, which JSON cannot carry"
    elif isinstance(value, _RAW):
        return f"{at or root} is bytes, which JSON cannot carry; decode them to text first"
    elif isinstance(value, str):
        if strings and (index := _surrogate(value)) is not None:
            return (
                f"{at or root} holds a lone surrogate ({value[index]!r} at {index}), "
                "which UTF-8 cannot carry"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, _RAW) or (isinstance(key, float) and not math.isfinite(key)):
                return f"{at or root} holds a key JSON cannot carry ({key!r})"
            if strings and isinstance(key, str) and _surrogate(key) is not None:
                return f"{at or root} holds a key with a lone surrogate ({key!r})"
            found = _unsendable(item, f"{at}.{key}" if at else str(key), root, strings=strings)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):  # to_builtins leaves tuples as they are
        for index, item in enumerate(value):
            found = _unsendable(item, f"{at or root}[{index}]", root, strings=strings)
            if found is not None:
                return found
    return None


def _surrogate(text: str) -> int | None:
    """Where ``text`` holds a lone surrogate, if it does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None
