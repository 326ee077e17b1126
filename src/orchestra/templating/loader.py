"""Loading a template from YAML: every problem found at once, each with file, line and column.

This module checks the top level, the parameters, the output and the retry policy; the steps
are checked by ``step_loader`` and positions come from ``source``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import jsonschema
import msgspec
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError

from orchestra.config import LimitSettings
from orchestra.domain import MAX_RETRY_DELAY, RetryPolicy
from orchestra.errors import PayloadTooLarge, TemplateError
from orchestra.templating.model import PARAM_TYPES, Parameter, Template
from orchestra.templating.params import non_finite, schema_reason
from orchestra.templating.regex import (
    PatternBudget,
    check_schema,
    schema_problems,
    validator,
)
from orchestra.templating.schema_refs import ref_problems
from orchestra.templating.source import (
    IDENT,
    IDENT_RULE,
    Checker,
    Path_,
    Source,
    TemplateProblem,
    describe,
    merge_loop,
)
from orchestra.templating.step_loader import Scope, read_steps
from orchestra.templating.yaml_guard import check_shape, check_size

# Always matched with fullmatch: with match, "$" also matches before a final newline, and
# "nl3\n" was a name. The anchors stay for the API's JSON Schema (openapi), whose patterns
# are not anchored otherwise.
NAME = re.compile(r"^[a-z0-9_-]{1,100}$")

#: The largest ``version`` a template file may give: the largest integer a JSON client such
#: as JavaScript holds exactly (2**53 - 1), well within the database's 64-bit integers.
MAX_VERSION = 2**53 - 1

TOP_KEYS = (
    "name",
    "version",
    "description",
    "model",
    "parameters",
    "steps",
    "output",
    "retry",
    "timeout",
)
RETRY_KEYS = ("max_attempts", "backoff", "initial_delay", "max_delay")
PARAM_KEYS = (
    "type",
    "required",
    "description",
    "default",
    "enum",
    "minimum",
    "maximum",
    "min_length",
    "max_length",
    "pattern",
    "items",
    "unique_items",
)
#: JSON Schema's spellings of parameter keys, with what to write instead: difflib's nearest key
#: misled there (``minItems``: "did you mean 'items'?", the item schema).
_JSON_SCHEMA_KEYS = {
    **{
        schema: f"JSON Schema's name; here it is {ours!r}"
        for schema, ours in (
            ("minItems", "min_length"),
            ("maxItems", "max_length"),
            ("minLength", "min_length"),
            ("maxLength", "max_length"),
            ("uniqueItems", "unique_items"),
        )
    },
    **dict.fromkeys(
        ("exclusiveMinimum", "exclusiveMaximum"),
        "exclusive bounds are not supported; 'minimum' and 'maximum' are inclusive "
        "(for an integer, write the bound plus or minus 1)",
    ),
    "const": "not supported; write 'enum' with the one value",
    "multipleOf": "not supported",
}
#: What each parameter key takes, in words (for a value of the wrong type).
_PARAM_TAKES = {
    "required": "true or false",
    "unique_items": "true or false",
    "description": "a string",
    "pattern": "a string",
    "minimum": "a number",
    "maximum": "a number",
    "min_length": "a whole number",
    "max_length": "a whole number",
    "enum": "a list",
    "items": "a mapping (a JSON Schema)",
}


def _patterns(c: Checker, path: Path_, schema: Any, budget: PatternBudget) -> bool:
    """Report each pattern in the JSON Schema at ``path`` that RE2 cannot take, and each
    ``$ref`` that is remote, unresolvable or loops (``schema_refs``); True if none."""
    problems = schema_problems(schema, path, budget)
    for where, why, at_key in problems:
        c.add(where, why, at=c.src.where_key(where) if at_key else None)
    refs = ref_problems(schema, path)
    for where, why in refs:
        c.add(where, why)
    return not problems and not refs


def _step_schemas(value: Any, path: Path_) -> Iterator[tuple[Path_, dict[str, Any]]]:
    """The JSON Schemas written in steps (``format``, ``schema``), a map's inner step too."""
    raws = enumerate(value) if isinstance(value, list) else ()
    for index, raw in raws:
        at: Path_ = (*path, index)
        while isinstance(raw, dict):
            for key in ("format", "schema"):
                if isinstance(raw.get(key), dict):
                    yield (*at, key), raw[key]
            raw, at = raw.get("step"), (*at, "step")


def _declared(value: Any) -> frozenset[str]:
    """The names ``parameters`` declares (its keys that are names), valid or not."""
    if not isinstance(value, dict):
        return frozenset()
    return frozenset(k for k in value if isinstance(k, str) and IDENT.fullmatch(k))


def _parameters(c: Checker, value: Any, budget: PatternBudget) -> dict[str, Parameter]:
    out: dict[str, Parameter] = {}
    data = c.mapping(value, ("parameters",), "'parameters'") if value is not None else {}
    # Typed as text, but YAML keys may be anything (true, 12).
    for name, spec in cast("dict[Any, Any]", data or {}).items():
        path: Path_ = ("parameters", name)
        if not isinstance(name, str):
            # YAML reads an unquoted true, null or 12 as a value, not a name.
            # (By identity: 1 == True, and a dict lookup took the key 1 for true.)
            written = "true" if name is True else "false" if name is False else str(name)
            written = "null" if name is None else written
            c.add(path, f"parameter name {written} is read by YAML as {describe(name)}; quote it")
            continue
        if not IDENT.fullmatch(name):
            c.add(path, f"parameter name {name!r} {IDENT_RULE}")
            continue
        fields = c.mapping(spec, path, f"parameter {name!r}")
        if fields is None:
            continue
        c.keys(fields, path, PARAM_KEYS, _JSON_SCHEMA_KEYS)
        ptype = fields.get("type")
        if ptype not in PARAM_TYPES:
            got = "it is missing" if "type" not in fields else f"got {ptype!r}"
            c.add((*path, "type"), f"type must be one of {', '.join(PARAM_TYPES)}; {got}")
            continue
        known = {k: v for k, v in fields.items() if k in PARAM_KEYS}
        try:
            param = msgspec.convert({**known, "name": name}, Parameter)
        except msgspec.ValidationError as exc:
            # Every key of the wrong type, not the first alone.
            bad = []
            for key, given in known.items():
                try:
                    msgspec.convert({"name": name, "type": ptype, key: given}, Parameter)
                except msgspec.ValidationError:
                    bad.append(key)
                    takes = _PARAM_TAKES.get(key, "another type")
                    c.add((*path, key), f"{key} must be {takes}, got {describe(given)}")
            if not bad:  # wrong together only: never dropped in silence
                c.add(path, str(exc).replace("`", ""))
            continue
        if ptype == "integer":
            param = _whole(param)
        if param.pattern is not None:
            why = budget.problem(param.pattern)
            if why:
                c.add((*path, "pattern"), f"pattern {why}")
                out[name] = param  # known, so that steps using it are not reported too
                continue
        for key, ok in (
            ("minimum", ptype in ("integer", "number")),
            ("maximum", ptype in ("integer", "number")),
            ("min_length", ptype in ("string", "array")),
            ("max_length", ptype in ("string", "array")),
            ("pattern", ptype == "string"),
            ("items", ptype == "array"),
            ("unique_items", ptype == "array"),
        ):
            if key in fields and not ok:
                c.add((*path, key), f"{key} does not apply to a parameter of type {ptype}")
        infinite = [
            k for k in ("default", "enum", "minimum", "maximum") if non_finite({k: fields.get(k)})
        ]
        for key in infinite:
            # YAML's .inf and .nan: JSON has neither, so no caller could send or match them.
            c.add(
                (*path, key),
                f"{key} holds .inf or .nan, or a number past ±1.8e308: only finite numbers that a "
                "64-bit float holds can be used",
            )
        if infinite:
            out[name] = param  # known, so that steps using it are not reported too
            continue
        if not _bounds_fit(c, path, param):
            out[name] = param  # known, so that steps using it are not reported too
            continue
        if param.items is not None:
            if not _patterns(c, (*path, "items"), param.items, budget):
                out[name] = param
                continue
            try:
                check_schema(param.items)
            except jsonschema.SchemaError as exc:
                c.add((*path, "items"), f"items is not a valid JSON Schema: {exc.message}")
                continue
        schema = param.json_schema()
        if param.default is not msgspec.UNSET:
            if param.required:
                c.add((*path, "default"), "a required parameter cannot have a default")
            for err in validator(schema).iter_errors(param.default):
                c.add(
                    (*path, "default"), f"default does not fit the parameter: {schema_reason(err)}"
                )
        for index, choice in enumerate(param.enum or []):
            item_schema = {k: v for k, v in schema.items() if k not in ("enum", "default")}
            for err in validator(item_schema).iter_errors(choice):
                c.add(
                    (*path, "enum", index),
                    f"enum value does not fit the type: {schema_reason(err)}",
                )
        out[name] = param
    return out


def _whole(param: Parameter) -> Parameter:
    """An integer parameter with its numbers written as floats (YAML reads ``1e3`` and
    ``10.0`` so) made whole: a default of 1000.0 reached the template as a float, and
    ``range(params.n)`` failed; the published schema said ``maximum: 10.0``."""

    def whole(value: Any) -> Any:
        return int(value) if isinstance(value, float) and value.is_integer() else value

    return msgspec.structs.replace(
        param,
        minimum=whole(param.minimum),
        maximum=whole(param.maximum),
        default=whole(param.default),
        enum=None if param.enum is None else [whole(e) for e in param.enum],
    )


def _bounds_fit(c: Checker, path: Path_, param: Parameter) -> bool:
    """Whether some value meets the parameter's bounds (each problem added): lengths of 0
    or more, a low bound not above the high one, an integer between an integer's bounds, and
    an ``enum`` with a value. (A negative length or an empty enum was taken: no value was
    accepted, and the published schema was no valid JSON Schema.)"""
    ok = True
    for key in ("min_length", "max_length"):
        length = getattr(param, key)
        if length is not None and length < 0:
            c.add((*path, key), f"{key} must be 0 or more, not {length}")
            ok = False
    for low, high in (("minimum", "maximum"), ("min_length", "max_length")):
        below, above = getattr(param, low), getattr(param, high)
        if below is not None and above is not None and above < below:
            c.add((*path, high), f"{high} {above} is below {low} {below}: no value fits")
            ok = False
        elif (
            param.type == "integer"
            and low == "minimum"
            and below is not None
            and above is not None
            and math.ceil(below) > math.floor(above)
        ):
            c.add(
                (*path, high),
                f"no integer lies from {low} {below} to {high} {above}: no value fits",
            )
            ok = False
    if param.enum is not None and not param.enum:
        c.add((*path, "enum"), "enum must list at least one value (none: leave it out)")
        ok = False
    return ok


def _retry(c: Checker, value: Any) -> RetryPolicy | None:
    if value is None:
        return None
    data = c.mapping(value, ("retry",), "'retry'")
    if data is None:
        return None
    c.keys(data, ("retry",), RETRY_KEYS)
    fields: dict[str, Any] = {}
    attempts = data.get("max_attempts", 3)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 100:
        c.add(("retry", "max_attempts"), f"max_attempts must be 1 to 100, got {attempts!r}")
    else:
        fields["max_attempts"] = attempts
    backoff = data.get("backoff", "exponential")
    if backoff not in ("exponential", "fixed"):
        c.add(("retry", "backoff"), f"backoff must be exponential or fixed, got {backoff!r}")
    else:
        fields["backoff"] = backoff
    for key in ("initial_delay", "max_delay"):
        seconds = c.duration(data, ("retry",), key, maximum=MAX_RETRY_DELAY)
        if seconds is not None:
            fields[key] = seconds
    policy = RetryPolicy(**fields)
    if policy.max_delay < policy.initial_delay:
        c.add(("retry", "max_delay"), "max_delay must not be shorter than initial_delay")
    return policy


def _output(c: Checker, value: Any, scope: Scope) -> str | dict[str, str] | None:
    if value is None:
        return None
    entries: Iterator[tuple[Path_, Any]]
    if isinstance(value, str):
        entries = iter([(("output",), value)])
    elif isinstance(value, dict):
        entries = ((("output", k), v) for k, v in value.items())
    else:
        c.add(
            ("output",), f"'output' must be a string or a mapping of strings, got {describe(value)}"
        )
        return None
    for path, text in entries:
        if not isinstance(text, str):
            c.add(path, f"output values must be strings, got {describe(text)}")
            continue
        scope.check(c, path, text)
    output: str | dict[str, str] = value
    return output


def parse_template(
    text: str, file: str = "<string>", limits: LimitSettings | None = None
) -> Template:
    """Validate YAML text as a template, within ``limits`` (the defaults when None).

    The same text, file and limits give the same (frozen) template: recent answers are kept
    (:data:`PARSED`), so a reload, or another process's registration learned again, parses
    only what changed.

    Raises:
        PayloadTooLarge: the text is over ``limits.max_template_bytes``.
        TemplateError: carrying every :class:`TemplateProblem` found.
    """
    return _parse(text, file, limits or LimitSettings())


#: How many parsed templates are kept (at most this many times max_template_bytes of text).
PARSED = 64


@functools.lru_cache(maxsize=PARSED)
def _parse(text: str, file: str, limits: LimitSettings) -> Template:
    check_size(text, limits.max_template_bytes)
    check_shape(text, file, max_nodes=limits.yaml_max_nodes, max_depth=limits.yaml_max_depth)
    try:
        src = Source(text, file)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        reason = " ".join(p for p in (exc.context, exc.problem) if p)
        if "'\\t'" in reason:
            reason += " (YAML takes spaces there, not tabs)"
        raise TemplateError([TemplateProblem(file, line, col, "", f"YAML: {reason}")]) from None
    except ReaderError as exc:  # a character YAML does not take (NUL, other controls)
        line, col = _place(text, exc.position)
        raise TemplateError(
            [TemplateProblem(file, line, col, "", f"YAML: {_refused_character(exc)}")]
        ) from None
    except YAMLError as exc:
        raise TemplateError([TemplateProblem(file, 1, 1, "", f"YAML: {exc}")]) from None
    except Exception as exc:  # noqa: BLE001 - ruamel's own failures on odd YAML
        raise TemplateError([_unreadable(text, file, exc)]) from None
    try:
        return _check(src, text, file)
    except (TemplateError, PayloadTooLarge):
        raise
    except RecursionError:
        problem = TemplateProblem(file, 1, 1, "", "the template nests too deeply to be checked")
        raise TemplateError([problem]) from None
    except Exception as exc:  # noqa: BLE001 - a malformed template must never be a crash
        problem = TemplateProblem(
            file, 1, 1, "", f"the template could not be checked: {type(exc).__name__}: {exc}"
        )
        raise TemplateError([problem]) from None


def _refused_character(exc: ReaderError) -> str:
    """What YAML's reader refused, by its code point (the character itself may not print)."""
    code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or " ")
    return f"the character U+{code:04X} is not allowed in YAML ({exc.reason})"


def _place(text: str, position: int) -> tuple[int, int]:
    """The line and column (from 1) of the character at ``position`` in ``text``."""
    before = text[:position]
    return before.count("\n") + 1, position - (before.rfind("\n") + 1) + 1


def _unreadable(text: str, file: str, exc: Exception) -> TemplateProblem:
    """The problem for YAML that ruamel failed to build with an error of its own (not a
    YAMLError): at the merge key that merges a mapping into itself when there is one."""
    loop = merge_loop(text)
    if loop is not None:
        message = (
            "YAML: this merge key (<<) brings in a mapping that holds it "
            "(an anchor merged into itself)"
        )
        return TemplateProblem(file, *loop, "", message)
    if isinstance(exc, RecursionError):
        return TemplateProblem(file, 1, 1, "", "YAML: the document nests too deeply to be read")
    return TemplateProblem(file, 1, 1, "", f"YAML: cannot be read: {type(exc).__name__}: {exc}")


def _check(src: Source, text: str, file: str) -> Template:
    """Every check of a template whose YAML was read (``src``).

    Raises:
        TemplateError: carrying every problem found.
    """
    c = Checker(src)
    data = c.mapping(src.data, (), "a template")
    if data is None:
        raise TemplateError(c.problems)
    c.keys(data, (), TOP_KEYS)
    name = c.string(data, (), "name", required=True)
    if name is not None and not NAME.fullmatch(name):
        shown = repr(name) if len(name) <= 60 else repr(name[:60]) + "…"
        c.add(("name",), f"name {shown} may hold only a-z, 0-9, _ and -, up to 100 of them")
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MAX_VERSION:
        shown = repr(version) if len(repr(version)) <= 40 else repr(version)[:40] + "…"
        c.add(("version",), f"version must be a whole number from 1 to {MAX_VERSION}, got {shown}")
    description = c.string(data, (), "description") or ""
    model = c.model(data, ())
    # Regexes run on RE2; one budget bounds the work of compiling all of the template's.
    budget = PatternBudget()
    parameters = _parameters(c, data.get("parameters"), budget)
    # The names declared, a definition with problems of its own too (its problems are said;
    # "unknown parameter 'x'" at each use would be a second, false one).
    declared = frozenset(parameters) | _declared(data.get("parameters"))
    steps = read_steps(c, data.get("steps"), declared)
    for path, schema in _step_schemas(data.get("steps"), ("steps",)):
        _patterns(c, path, schema, budget)
    order = {s.id: i for i, s in enumerate(steps)}
    output = _output(c, data.get("output"), Scope(params=declared, order=order))
    retry = _retry(c, data.get("retry"))
    timeout = c.duration(data, (), "timeout")
    if c.problems:
        raise TemplateError(sorted(c.problems, key=lambda p: (p.line, p.column)))
    return Template(
        name=name,
        version=version,
        description=description.strip(),
        model=model,
        parameters=parameters,
        steps=tuple(steps),
        output=output,
        retry=retry,
        timeout=timeout,
        source=file,
        text=text,
    )


#: A top-level ``name:`` key written plainly (block style), up to its value.
_NAME_KEY = re.compile(r"^name[ \t]*:[ \t]*", re.MULTILINE)


def name_problem(template: Template, message: str) -> TemplateProblem:
    """A problem with ``template``'s name (a clash), at its ``name:`` value when written as
    a plain top-level key, else at the first line."""
    found = _NAME_KEY.search(template.text)
    if found is None:
        return TemplateProblem(template.source, 1, 1, "name", message)
    line = template.text.count("\n", 0, found.start()) + 1
    return TemplateProblem(template.source, line, found.end() - found.start() + 1, "name", message)


def load_template(path: Path, limits: LimitSettings | None = None) -> Template:
    """Read and validate one template file, within ``limits`` (the defaults when None).

    Raises:
        TemplateError: the file cannot be read, is over a limit or is not a valid template.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        problem = TemplateProblem(str(path), 1, 1, "", f"cannot read: {reason}")
        raise TemplateError([problem]) from None
    try:
        return parse_template(text, str(path), limits)
    except PayloadTooLarge as exc:
        raise TemplateError([TemplateProblem(str(path), 1, 1, "", exc.message)]) from None
