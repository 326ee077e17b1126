"""Checking a task's parameters against its template: every problem at once."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, cast

import jsonschema
import msgspec
from referencing.exceptions import Unresolvable

from orchestra.config import LimitSettings
from orchestra.errors import FieldProblem, InvalidParams
from orchestra.templating.fast_params import quick_check
from orchestra.templating.model import Template
from orchestra.templating.regex import validator as local_validator
from orchestra.templating.source import format_path

# Templates hold dicts, so they are not hashable: cache each one's validator by identity.
_validators: dict[int, tuple[Template, jsonschema.Draft202012Validator]] = {}


def _validator(template: Template) -> jsonschema.Draft202012Validator:
    """The template's parameters as a JSON Schema validator whose patterns run on RE2."""
    cached = _validators.get(id(template))
    if cached is not None and cached[0] is template:
        return cached[1]
    if len(_validators) > 1024:
        _validators.clear()
    validator = local_validator(template.params_schema())
    _validators[id(template)] = (template, validator)
    return validator


def _field(path: Any) -> str:
    return format_path(("params", *path))


#: The most problems a refusal lists (300,000 bad items made a 21 MB answer).
MAX_PROBLEMS = 100

_SURROGATE = re.compile("[\ud800-\udfff]")


def _text_problem(text: str, max_length: int) -> str | None:
    if len(text) > max_length:
        return f"is {len(text)} characters; the limit is {max_length} ([limits] max_string_length)"
    if "\x00" in text:
        # Stored text must survive a move to PostgreSQL, whose text type refuses NUL.
        return "contains a NUL character (\\u0000), which is not accepted"
    if _SURROGATE.search(text):
        return "contains a lone UTF-16 surrogate, which is not text"
    return None


def check_input(params: dict[str, Any], limits: LimitSettings) -> None:
    """The limits every task's parameters are held to, whatever the template: nesting depth,
    the length of each string (keys too), no NUL or lone surrogates, the total JSON size.

    Raises:
        InvalidParams: naming the field and the limit.
    """
    problems: list[FieldProblem] = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(params, ())]
    while stack and len(problems) < 20:
        value, path = stack.pop()
        if len(path) > limits.max_params_depth:
            problems.append(
                FieldProblem(
                    _field(path),
                    f"nests deeper than {limits.max_params_depth} levels "
                    "([limits] max_params_depth)",
                )
            )
            continue
        if isinstance(value, str):
            why = _text_problem(value, limits.max_string_length)
            if why:
                problems.append(FieldProblem(_field(path), why))
        elif isinstance(value, dict):
            for key, item in value.items():
                why = _text_problem(str(key), limits.max_string_length)
                if why:
                    problems.append(FieldProblem(_field((*path, key)), f"its name {why}"))
                else:
                    stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
    if not problems:
        size = len(msgspec.json.encode(params))
        if size > limits.max_params_bytes:
            problems.append(
                FieldProblem(
                    "params",
                    f"is {size} bytes of JSON; the limit is {limits.max_params_bytes} "
                    "([limits] max_params_bytes)",
                )
            )
    if problems:
        problems.sort(key=lambda p: p.field)
        raise InvalidParams(f"{len(problems)} invalid parameter(s)", problems)


#: The smallest integer no 64-bit float holds (floats stop short of 2**1024, about 1.8e308).
_NO_FLOAT = 2**1024


def non_finite(params: dict[str, Any]) -> list[FieldProblem]:
    """A problem for each NaN or Infinity anywhere in ``params``: JSON has neither (they would
    be stored as null), and a schema's minimum and maximum do not catch NaN. An integer no
    double holds (400 digits) is refused too, as ``1e400`` is: most JSON readers cannot
    read it back."""
    problems: list[FieldProblem] = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(params, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(
                FieldProblem(
                    _field(path), f"is {value}, not a finite number (NaN and Infinity are refused)"
                )
            )
        elif type(value) is int and not -_NO_FLOAT < value < _NO_FLOAT:
            digits = len(str(abs(value))) if abs(value).bit_length() < 14_000 else "over 4,000"
            problems.append(
                FieldProblem(
                    _field(path),
                    f"is an integer of {digits} digits, out of range: a number must fit a "
                    "64-bit float (up to about ±1.8e308)",
                )
            )
        elif isinstance(value, dict):
            stack.extend((item, (*path, key)) for key, item in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
    return problems


def validate_params(
    template: Template, params: dict[str, Any], limits: LimitSettings | None = None
) -> dict[str, Any]:
    """Apply defaults and check ``params`` (within ``limits``, the defaults when None);
    returns the complete parameters.

    Raises:
        InvalidParams: listing every bad field (``params.<name>``) with its reason.
    """
    check_input(params, limits or LimitSettings())
    full = dict(params)
    for p in template.parameters.values():
        if p.name not in full and p.default is not msgspec.UNSET:
            full[p.name] = p.default
    # Defaults too: a template's YAML may hold .nan.
    problems = non_finite(full)
    quick = quick_check(template)
    if not problems and quick is not None and quick(full):
        return full  # surely valid: the JSON Schema walk below would find nothing
    named = {p.field for p in problems}
    try:
        errors = list(itertools.islice(_validator(template).iter_errors(full), MAX_PROBLEMS + 1))
    except (Unresolvable, RecursionError) as exc:  # the checks at load should prevent both
        why = f"cannot be checked against the template's schema: {type(exc).__name__}"
        raise InvalidParams(why, [FieldProblem("params", why)]) from None
    for err in errors:
        if _field(err.absolute_path) not in named:  # "inf is greater than the maximum": no
            problems += _problems(template, err)
    if problems:
        problems.sort(key=lambda p: p.field)
        count = f"{len(problems)}"
        # One error may be many problems (every unknown key of an object).
        if len(errors) > MAX_PROBLEMS or len(problems) > MAX_PROBLEMS:
            problems = problems[:MAX_PROBLEMS]
            count = f"more than {MAX_PROBLEMS} (the first {MAX_PROBLEMS} are listed)"
        raise InvalidParams(
            f"{count} invalid parameter(s) for template {template.name!r}", problems
        )
    return _integers(template, full)


def _problems(template: Template, err: jsonschema.ValidationError) -> list[FieldProblem]:
    """What one schema error says, named at the field it is about: a missing or unknown key
    at the key (of a parameter, or of an object within one)."""
    path, schema = list(err.absolute_path), err.schema
    if err.validator == "required" and isinstance(err.instance, dict):
        missing = [n for n in cast(list[str], err.validator_value) if n not in err.instance]
        return [FieldProblem(_field([*path, n]), "is required") for n in missing]
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        if not path:
            known, what = list(template.parameters), "parameter (the template takes"
        elif isinstance(schema, dict) and "patternProperties" not in schema:
            known, what = list(schema.get("properties") or ()), "key (its keys are"
        else:  # which keys the patterns allow is said by the error itself
            return [FieldProblem(_field(path), schema_reason(err))]
        extra = sorted(n for n in err.instance if n not in known)
        allowed = ", ".join(known) or "none"
        return [FieldProblem(_field([*path, n]), f"unknown {what}: {allowed})") for n in extra]
    return [FieldProblem(_field(path), schema_reason(err))]


def _integers(template: Template, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with an ``integer`` parameter given as a whole float (``2.0``, which JSON
    Schema counts as an integer) stored and rendered as the integer (``2``, not ``2.0``)."""
    for p in template.parameters.values():
        value = params.get(p.name)
        if p.type == "integer" and type(value) is float and value.is_integer():
            params[p.name] = int(value)
    return params


#: Longest value a problem's message quotes; a longer one is cut, with its length said.
_QUOTED = 80


def schema_reason(err: jsonschema.ValidationError) -> str:
    """A schema error's reason, naming the limit, never echoing a long value whole
    (jsonschema's own message quotes the value: a 200,000-character text came back in the
    422)."""
    rule, limit, value = err.validator, err.validator_value, err.instance
    if rule in ("maxLength", "minLength") and isinstance(value, str):
        bound = "at most" if rule == "maxLength" else "at least"
        return f"is {len(value)} characters; the template allows {bound} {limit}"
    if rule in ("maxItems", "minItems") and isinstance(value, list):
        bound = "at most" if rule == "maxItems" else "at least"
        return f"has {len(value)} items; the template allows {bound} {limit}"
    message = err.message
    quoted = repr(value)
    if (value is None or isinstance(value, bool)) and message.startswith(quoted + " "):
        # The value as the caller wrote it, in JSON: null, true, false (not None, True).
        message = msgspec.json.encode(value).decode() + message[len(quoted) :]
    if len(quoted) > _QUOTED and quoted in message:
        message = message.replace(quoted, f"{quoted[:_QUOTED]}… ({len(quoted)} characters)")
    return message
