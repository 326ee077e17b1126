"""Checking a task's parameters against its template: every problem at once."""

from __future__ import annotations

from typing import Any

import jsonschema
import msgspec

from orchestra.errors import FieldProblem, InvalidParams
from orchestra.templating.model import Template
from orchestra.templating.source import format_path

# Templates hold dicts, so they are not hashable: cache each one's validator by identity.
_validators: dict[int, tuple[Template, jsonschema.Draft202012Validator]] = {}


def _validator(template: Template) -> jsonschema.Draft202012Validator:
    cached = _validators.get(id(template))
    if cached is not None and cached[0] is template:
        return cached[1]
    if len(_validators) > 1024:
        _validators.clear()
    validator = jsonschema.Draft202012Validator(template.params_schema())
    _validators[id(template)] = (template, validator)
    return validator


def _field(path: Any) -> str:
    return format_path(("params", *path))


def validate_params(template: Template, params: dict[str, Any]) -> dict[str, Any]:
    """Apply defaults and check ``params``; returns the complete parameters.

    Raises:
        InvalidParams: listing every bad field (``params.<name>``) with its reason.
    """
    full = dict(params)
    for p in template.parameters.values():
        if p.name not in full and p.default is not msgspec.UNSET:
            full[p.name] = p.default
    problems: list[FieldProblem] = []
    for err in _validator(template).iter_errors(full):
        if err.validator == "required":
            missing = [n for n in err.validator_value if n not in err.instance]
            problems += [FieldProblem(_field([n]), "is required") for n in missing]
        elif err.validator == "additionalProperties":
            known = template.parameters
            extra = sorted(n for n in err.instance if n not in known)
            allowed = ", ".join(known) or "none"
            problems += [
                FieldProblem(_field([n]), f"unknown parameter (the template takes: {allowed})")
                for n in extra
            ]
        else:
            problems.append(FieldProblem(_field(err.absolute_path), err.message))
    if problems:
        problems.sort(key=lambda p: p.field)
        raise InvalidParams(
            f"{len(problems)} invalid parameter(s) for template {template.name!r}", problems
        )
    return full
