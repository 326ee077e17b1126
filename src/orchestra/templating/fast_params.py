"""A quick yes to a template's parameters, for the common case where they are valid.

:func:`~orchestra.templating.params.validate_params` checks parameters with a JSON Schema
validator, which walks the schema keyword by keyword for every value: most of the time of a
batch's rows check (each row is a submit). Most rows are valid, and most templates' parameters
are scalars with bounds, so this module compiles such a template's parameters once into plain
Python checks that say **valid** or **not sure**. Only "not sure" goes on to the JSON Schema
validator, which then finds every problem with its usual message: the answers and the messages
are the JSON Schema validator's in every case; only the time differs.

It answers valid only when the JSON Schema would: each check below is the same comparison the
JSON Schema keyword makes, on exactly the JSON types (``True`` is not an integer here, and
``1.0`` is not sure rather than an integer). A template with a parameter it does not cover (an
array, an object, a pattern, an enum of other than strings) gets no quick check at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestra.templating.model import Parameter, Template

#: A compiled check: True when the parameters are surely valid; False when not sure.
Check = Callable[[dict[str, Any]], bool]

#: The Python types of each JSON Schema type, exactly (a bool is not an int here).
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}

# Templates hold dicts, so they are not hashable: cache each one's check by identity (None:
# the template has no quick check).
_checks: dict[int, tuple[Template, Check | None]] = {}


def quick_check(template: Template) -> Check | None:
    """The template's compiled check, or None when its parameters are not all covered."""
    cached = _checks.get(id(template))
    if cached is not None and cached[0] is template:
        return cached[1]
    if len(_checks) > 1024:
        _checks.clear()
    check = _compile(template)
    _checks[id(template)] = (template, check)
    return check


def _compile(template: Template) -> Check | None:
    params = list(template.parameters.values())
    if any(name != p.name for name, p in template.parameters.items()):
        return None
    values = [_value_check(p) for p in params]
    if any(v is None for v in values):
        return None
    checks = {p.name: v for p, v in zip(params, values, strict=True) if v is not None}
    required = tuple(p.name for p in params if p.required)

    def check(given: dict[str, Any]) -> bool:
        for name in required:
            if name not in given:
                return False
        for name, value in given.items():
            one = checks.get(name)
            if one is None or not one(value):  # an unknown parameter, or not sure
                return False
        return True

    return check


def _value_check(p: Parameter) -> Callable[[Any], bool] | None:
    """One parameter's check, as its JSON Schema (:meth:`Parameter.json_schema`) makes it."""
    types = _TYPES.get(p.type)
    if types is None or p.pattern is not None or p.items is not None or p.unique_items:
        return None
    enum: frozenset[str] | None = None
    if p.enum is not None:
        if p.type != "string" or not all(type(e) is str for e in p.enum):
            return None
        enum = frozenset(p.enum)
    low, high = p.minimum, p.maximum
    shortest, longest = p.min_length, p.max_length
    is_string = p.type == "string"

    def check(value: Any) -> bool:
        if type(value) not in types:
            return False
        if is_string:
            if shortest is not None and len(value) < shortest:
                return False
            if longest is not None and len(value) > longest:
                return False
            return enum is None or value in enum
        if type(value) is bool:
            return True
        if low is not None and value < low:
            return False
        return high is None or not value > high

    return check
