"""Query strings read as written, before Litestar converts them.

Litestar converts a query value with msgspec's lenient string conversion, which read
``limit=1e3`` as 1000, ``limit=5.0`` as 5 and ``after=null`` as no value at all; and a
parameter given twice (``limit=1&limit=2``) kept one of its values without a word. An
integer is written in digits, "null" is no word for "absent" in a query (leave the
parameter out), and a parameter that takes one value is given once. The problems are
raised as Litestar's own validation error, so they read as every other field's
(``limit: must be an integer, not '1e3'``).
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple, NoReturn, get_args, get_origin

import msgspec
from litestar import Request
from litestar.exceptions import ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.params import QueryParameter

#: An integer as a query writes it: ASCII digits, negative with a minus.
_INTEGER = re.compile(r"-?[0-9]+")

#: The text that lenient conversion takes for "no value" where ``None`` is allowed.
_NULL = "null"


class _Rule(NamedTuple):
    """What one query parameter of a handler takes."""

    key: str  # as the query names it (``type`` for the parameter ``types``)
    kind: Any  # its type without ``None``
    many: bool  # a list: given as often as it has values
    optional: bool


def strict_query(request: Request[Any, Any, Any]) -> None:
    """Litestar's ``before_request`` hook: refuse a query value that lenient conversion would
    read as something other than what it says, and a single-valued parameter given twice."""
    query = request.query_params
    for rule in _rules(request.route_handler):
        values = query.getall(rule.key, [])
        if not values:
            continue
        if len(values) > 1 and not rule.many:
            _refuse(rule.key, f"is given {len(values)} times; send it once")
        raw = values[0]
        if rule.kind is int and not _INTEGER.fullmatch(raw):
            _refuse(rule.key, "Expected `int`, got `str`")
        if rule.optional and raw == _NULL and rule.kind is not str:
            try:
                msgspec.convert(raw, rule.kind, strict=False)
            except msgspec.ValidationError as e:
                _refuse(rule.key, str(e))


@functools.cache
def _rules(handler: HTTPRouteHandler) -> tuple[_Rule, ...]:
    """The query parameters ``handler`` declares, read once per handler."""
    rules = []
    for name, field in handler.parsed_fn_signature.parameters.items():
        declared = field.kwarg_definition
        if not isinstance(declared, QueryParameter):
            continue
        kinds = [k for k in get_args(field.annotation) if k is not type(None)]
        optional = len(kinds) < len(get_args(field.annotation))
        kind = kinds[0] if optional and len(kinds) == 1 else field.annotation
        many = get_origin(kind) in (list, tuple, set, frozenset)
        rules.append(_Rule(declared.name or name, kind, many, optional))
    return tuple(rules)


def _refuse(key: str, message: str) -> NoReturn:
    """Raise the problem as Litestar's validation error of the query parameter ``key``."""
    raise ValidationException(
        detail=f"Validation failed for {key}",
        extra=[{"key": key, "source": "query", "message": message}],
    )
