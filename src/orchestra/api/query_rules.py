"""Query strings read as written, before Litestar converts them.

Litestar converts a query value with msgspec's lenient string conversion, which read
``limit=1e3`` as 1000, ``limit=5.0`` as 5 and ``after=null`` (or ``NULL``) as no value at
all; and a parameter given twice (``limit=1&limit=2``) kept one of its values without a word.
An integer is written in digits, "null" is no word for "absent" in a query (leave the
parameter out; where a parameter is text, ``null`` is the text), and a parameter that takes
one value is given once (one that takes a list, such as the event feed's ``type``, is
repeated, and each of its values read so). The problems are raised as Litestar's own
validation error, so they read as every other field's (``limit: must be an integer, not
'1e3'``).

The query parameters are the ones Litestar itself reads for the route (its kwargs model), so
none escapes the rules, however it is declared. The hook is the app's ``before_request``: a
router, controller or handler that set its own would replace it for its routes
(``tests/unit/test_query_rules.py`` checks that none does).
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple, NoReturn, cast, get_args, get_origin

import msgspec
from litestar import Request
from litestar.exceptions import ValidationException
from litestar.handlers import HTTPRouteHandler

#: An integer as a query writes it: ASCII digits, negative with a minus (as msgspec reads it).
_INTEGER = re.compile(r"-?[0-9]+")
#: An integer with a leading zero ("00005"), which msgspec does not read as one.
_LEADING_ZERO = re.compile(r"-?0[0-9]+")

#: What lenient conversion takes for "no value" where ``None`` is allowed, in any case.
_NULL = "null"

#: The collections a query parameter repeated fills.
_SEQUENCES = (list, tuple, set, frozenset)


class _Rule(NamedTuple):
    """What one query parameter of a handler takes."""

    key: str  # as the query names it (``type`` for the parameter ``types``)
    kind: Any  # the type of each value: without ``None``, a list's items' type
    many: bool  # a list: given as often as it has values


async def strict_query(request: Request[Any, Any, Any]) -> None:
    """Litestar's ``before_request`` hook: refuse a query value that lenient conversion would
    read as something other than what it says, and a single-valued parameter given twice.
    A coroutine function, though it awaits nothing: Litestar runs a plain function's hook in
    a worker thread, a thread hop on every request."""
    query = request.query_params
    for rule in _rules(request.route_handler, frozenset(request.path_params)):
        values = query.getall(rule.key, [])
        if len(values) > 1 and not rule.many:
            _refuse(rule.key, f"is given {len(values)} times; send it once")
        for raw in values:
            if rule.kind is int and not _INTEGER.fullmatch(raw):
                _refuse(rule.key, "Expected `int`, got `str`")
            if rule.kind is int and _LEADING_ZERO.fullmatch(raw):  # msgspec refuses it so
                plain = str(int(raw))
                _refuse(rule.key, f"must be written without leading zeros ({plain}, not {raw})")
            if raw.lower() == _NULL and rule.kind is not str:
                try:
                    msgspec.convert(raw, rule.kind, strict=False)
                except msgspec.ValidationError as e:
                    _refuse(rule.key, str(e))


@functools.cache
def _rules(handler: HTTPRouteHandler, path: frozenset[str]) -> tuple[_Rule, ...]:
    """The query parameters of ``handler`` (on a route with the path parameters ``path``), as
    Litestar reads them; worked out once per handler."""
    model = handler.create_kwargs_model(cast(Any, dict.fromkeys(path)))
    declared = handler.parsed_fn_signature.parameters
    rules = []
    for param in model.expected_query_params:
        field = declared.get(param.field_name)
        kind = _value_type(field.annotation) if field is not None else str
        many = bool(param.is_sequence)
        if many and get_origin(kind) in _SEQUENCES:
            kind = next(iter(get_args(kind)), str)
        rules.append(_Rule(param.field_alias, kind, many))
    return tuple(rules)


def _value_type(annotation: Any) -> Any:
    """``annotation`` without ``None`` (``int | None``: ``int``)."""
    kinds = [k for k in get_args(annotation) if k is not type(None)]
    if len(kinds) == 1 and len(get_args(annotation)) == 2:
        return kinds[0]
    return annotation


def _refuse(key: str, message: str) -> NoReturn:
    """Raise the problem as Litestar's validation error of the query parameter ``key``."""
    raise ValidationException(
        detail=f"Validation failed for {key}",
        extra=[{"key": key, "source": "query", "message": message}],
    )
