"""A run form generated from a template's parameter JSON Schema, and its answers read back.

Each parameter becomes one control: a text input (or a textarea for long text), a number input
with its bounds, a checkbox, a select for an enum, a textarea with one item per line for an
array, or a JSON textarea for an object. Answers are turned back into typed values as far as
they parse; whatever does not parse is passed on as typed, so the service's own validation
names the problem, in the API's words, beside the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from orchestra.domain import MAX_ID
from orchestra.errors import FieldProblem, InvalidRequest

#: Strings whose description or bounds suggest long text get a textarea.
_LONG = 200


class Field(msgspec.Struct, frozen=True):
    """One control of a run form."""

    name: str
    #: text, textarea, number, checkbox, select, lines (one item per line) or json.
    control: str
    type: str
    required: bool
    value: str = ""
    checked: bool = False
    description: str = ""
    #: For a select: (value as sent, label) pairs; the value is the option's JSON.
    options: list[tuple[str, str]] = msgspec.field(default_factory=list)
    minimum: int | float | None = None
    maximum: int | float | None = None
    step: str = "any"
    min_length: int | None = None
    max_length: int | None = None
    errors: list[str] = msgspec.field(default_factory=list)


def _bound(value: Any, kind: str) -> int | float | None:
    """A number input's ``min``/``max``: an integer parameter's bound as an integer (the
    loader keeps bounds as floats; ``min="1.0"`` would read oddly beside ``step="1"``)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if kind == "integer" and float(value).is_integer():
        return int(value)
    return value


class AsTyped(str):
    """A field's text as it was typed, shown again as it is (a JSON field's, whatever it
    parses to: a JSON string shown parsed lost its quotes, a number its spelling)."""


def as_typed(schema: Mapping[str, Any], form: Mapping[str, list[str]]) -> dict[str, AsTyped]:
    """The JSON (object) fields of a filled run form, as typed: what the form shows again."""
    return {
        name: AsTyped(form[name][-1])
        for name, prop in schema.get("properties", {}).items()
        if prop.get("type") == "object" and "enum" not in prop and form.get(name)
    }


def _shown(value: Any, schema: Mapping[str, Any]) -> str:
    """A value as the control shows it."""
    if value is None:
        return ""
    if isinstance(value, AsTyped):
        return str(value)
    kind = schema.get("type")
    if kind == "array" and isinstance(value, list):
        return "\n".join(v if isinstance(v, str) else json.dumps(v) for v in value)
    if kind == "object":
        return json.dumps(value, indent=2, ensure_ascii=False)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def fields(
    schema: Mapping[str, Any],
    values: Mapping[str, Any] | None = None,
    problems: list[FieldProblem] | None = None,
) -> list[Field]:
    """The controls for a parameters schema, filled with ``values`` (else the defaults), with
    each problem beside the field it names."""
    values = values or {}
    by_field: dict[str, list[str]] = {}
    for problem in problems or []:
        inner = inner_path(problem.field)
        message = f"{inner}: {problem.message}" if inner else problem.message
        by_field.setdefault(field_of(problem.field), []).append(message)
    required = set(schema.get("required", []))
    out = []
    for name, prop in schema.get("properties", {}).items():
        kind = prop.get("type", "string")
        value = values.get(name, prop.get("default"))
        common: dict[str, Any] = {
            "name": name,
            "type": kind,
            "required": name in required,
            "description": prop.get("description") or "",
            "errors": by_field.get(name, []),
        }
        if "enum" in prop:
            options = [
                (json.dumps(v), v if isinstance(v, str) else json.dumps(v)) for v in prop["enum"]
            ]
            if name not in required:
                options.insert(0, ("", "—"))
            chosen = "" if value is None else json.dumps(value)
            out.append(Field(control="select", options=options, value=chosen, **common))
        elif kind == "boolean":
            out.append(Field(control="checkbox", checked=bool(value), **common))
        elif kind in ("integer", "number"):
            out.append(
                Field(
                    control="number",
                    value=_shown(value, prop),
                    minimum=_bound(prop.get("minimum"), kind),
                    maximum=_bound(prop.get("maximum"), kind),
                    step="1" if kind == "integer" else "any",
                    **common,
                )
            )
        elif kind == "array":
            out.append(Field(control="lines", value=_shown(value, prop), **common))
        elif kind == "object":
            out.append(Field(control="json", value=_shown(value, prop), **common))
        else:
            long = (prop.get("maxLength") or 10**9) > _LONG and not prop.get("pattern")
            out.append(
                Field(
                    control="textarea" if long else "text",
                    value=_shown(value, prop),
                    min_length=prop.get("minLength"),
                    max_length=prop.get("maxLength"),
                    **common,
                )
            )
    return out


_TOP = re.compile(r"^params\.([^.\[]+)")


def field_of(path: str) -> str:
    """The form field a problem's path names: ``params.items[2]`` is ``items``."""
    match = _TOP.match(path)
    return match.group(1) if match else path


def inner_path(path: str) -> str:
    """Where inside its form field a problem's path is: ``params.people[1].name`` is
    ``[1].name``, ``params.meta.owner`` is ``owner`` ("" for the field itself)."""
    match = _TOP.match(path)
    return path[match.end() :].removeprefix(".") if match else ""


def _number(text: str, kind: str) -> Any:
    """``text`` as an int or a float; as typed when it is not a number or not a finite one
    (JSON has no NaN or Infinity, and bounds do not catch them: validation must name them)."""
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            pass
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    if kind == "integer" and number.is_integer():
        return int(number)  # "3.0" and "1e3" are whole numbers
    return number


def _item(text: str, item_type: str | None) -> Any:
    if item_type in ("integer", "number"):
        return _number(text, item_type)
    if item_type in ("boolean", "object", "array"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def params_from_form(
    schema: Mapping[str, Any], form: Mapping[str, list[str]]
) -> tuple[dict[str, Any], list[FieldProblem]]:
    """The parameters a filled run form gives, and the JSON fields whose text does not parse
    (each kept as typed, and named with where it stops). Empty optional fields are left out
    (their defaults apply); other values that do not parse are passed on as typed for
    validation to name."""
    params: dict[str, Any] = {}
    unreadable: list[FieldProblem] = []
    for name, prop in schema.get("properties", {}).items():
        kind = prop.get("type", "string")
        given = form.get(name, [])
        if kind == "boolean" and "enum" not in prop:
            params[name] = bool(given) and given[-1] not in ("", "false", "off")
            continue
        text = given[-1] if given else ""
        if "enum" in prop:
            if text:
                try:
                    params[name] = json.loads(text)
                except ValueError:
                    params[name] = text
            continue
        if text.strip() == "" and kind != "string":
            continue
        if text == "" and kind == "string":
            continue
        if kind in ("integer", "number"):
            params[name] = _number(text.strip(), kind)
        elif kind == "array":
            item_type = (prop.get("items") or {}).get("type")
            lines = [line.strip() for line in text.splitlines()]
            params[name] = [_item(line, item_type) for line in lines if line]
        elif kind == "object":
            try:
                params[name] = json.loads(text)
            except json.JSONDecodeError as exc:
                params[name] = text
                where = f"line {exc.lineno} column {exc.colno}"
                unreadable.append(
                    FieldProblem(f"params.{name}", f"not valid JSON: {exc.msg} ({where})")
                )
        else:
            params[name] = text
    return params, unreadable


def whole(text: str, field: str, *, least: int = 1) -> int:
    """A number given as text: an id (from 1), or with ``least=0`` an event number or a count.

    Raises:
        InvalidRequest: ``text`` is not ASCII digits, or the number is below ``least`` or
            above :data:`~orchestra.domain.MAX_ID` (it would overflow SQLite's INTEGER).
    """
    # isdigit() alone lets "²" through; the length check keeps int() from huge strings.
    digits = text.isascii() and text.isdigit() and len(text) <= len(str(MAX_ID))
    number = int(text) if digits else -1
    if not least <= number <= MAX_ID:
        raise InvalidRequest(
            f"{field}: {text!r} is not a whole number from {least} to {MAX_ID}",
            [FieldProblem(field, "not a whole number in range")],
        )
    return number
