"""An expression's value as plain JSON data, which is what steps, maps and results hold.

Jinja gives lazy values: ``map``, ``select``, ``unique`` and ``batch`` give generators,
``range`` a range, ``dict.keys()`` a view. Stored as they are, they could not be encoded (the
task failed as "internal"); here they become lists, as ``| list`` would make them. Objects
that are not data (a ``cycler``, a ``namespace``, a function such as ``lipsum``) are refused
with a reason naming what they are.

The copy is bounded: items and characters are counted as they are copied, and a value over
``[limits] max_result_bytes`` (no result may be larger) is refused before it is built, so a
list holding one long string many times cannot grow to gigabytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jinja2 import Undefined

from orchestra.errors import RenderError
from orchestra.templating import sandbox

#: Keys JSON can take (msgspec writes numbers and booleans as their text).
_KEYS = (str, int, float, bool)
#: Items copied between two checks of the render's deadline.
_TICK_EVERY = 1024


class _Counter:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0

    def add(self, size: int) -> None:
        self.size += size
        if self.size > self.cap:
            raise RenderError(f"the value is over {self.cap} bytes ([limits] max_result_bytes)")
        if self.size % _TICK_EVERY < size:
            sandbox.tick()


def _what(value: Any) -> str:
    if callable(value):
        return f"a function ({getattr(value, '__name__', type(value).__name__)})"
    return f"a {type(value).__name__}"


def plain(value: Any) -> Any:
    """``value`` as JSON data: lazy sequences become lists, Markup becomes str.

    Raises:
        RenderError: something in it is not data (with a hint), or it is over the cap.
    """
    if value is None or isinstance(value, bool | int | float) or type(value) is str:
        return value  # the common case, with nothing to copy
    return _copy(value, _Counter(sandbox.max_value_size()))


def _copy(value: Any, count: _Counter) -> Any:
    if isinstance(value, Undefined):  # a missing name inside a list: as one outside it
        value._fail_with_undefined_error()
    if value is None or isinstance(value, bool | int | float):
        count.add(1)
        return value
    if isinstance(value, str):  # Markup (lipsum's text, escape's) too
        count.add(len(value) + 2)
        return value if type(value) is str else str.__str__(value)
    if isinstance(value, Mapping):
        count.add(2)
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if not isinstance(key, _KEYS):
                raise RenderError(f"a mapping key is {_what(key)}, not JSON data")
            out[str.__str__(key) if isinstance(key, str) else key] = _copy(item, count)
        return out
    if isinstance(value, list | tuple | range | set | frozenset) or isinstance(value, Iterator):
        count.add(2)
        return [_copy(item, count) for item in value]
    if isinstance(value, Iterable) and type(value).__module__ == "builtins":
        # dict views, map, filter, zip, reversed: lazy builtins
        count.add(2)
        return [_copy(item, count) for item in value]
    raise RenderError(
        f"the value is {_what(value)}, which is not JSON data; an expression's value must be "
        "text, a number, a boolean, null, a list or a mapping (add `| list` to a lazy "
        "sequence, or `| string` to write an object as text)"
    )
