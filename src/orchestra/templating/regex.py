"""Regular expressions written in templates, matched by RE2 in time linear in the text.

A parameter's ``pattern``, and the ``pattern`` and ``patternProperties`` keywords of the JSON
Schemas a template gives (an llm step's ``format``, a parse_json step's ``schema``, an array
parameter's ``items``), run here and never on Python's ``re``: a backtracking engine takes
time that doubles with each character on a pattern such as ``^(a+)+$``, and one such check
would hold the event loop. RE2 has no backreferences, lookarounds or possessive quantifiers;
a pattern that uses them is refused when its template is validated.

The semantics are JSON Schema's: a pattern matches anywhere in the string unless it anchors
itself with ``^`` and ``$``. As in ECMA-262 (and unlike Python's ``re``), ``\\d`` and ``\\w``
match ASCII only and ``$`` matches only at the very end. ``\\uXXXX`` escapes and Python's
``\\Z`` are accepted.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import re2  # type: ignore[import-untyped]
from jsonschema.exceptions import ValidationError
from referencing import Registry
from referencing.exceptions import NoSuchResource

from orchestra.templating.source import Path_

#: Memory RE2 may use for one compiled pattern (its program and its match caches). It also
#: bounds how long compiling one pattern can take and how large its program can grow.
MAX_MEM = 1 << 20
#: The RE2 program instructions that all the patterns of one template (or one schema) may
#: compile to in all: the work of validating a template full of large patterns stays bounded.
MAX_TOTAL_SIZE = 250_000
#: What a pattern that RE2 found too large is counted as, against ``MAX_TOTAL_SIZE``.
_TOO_LARGE_SIZE = 50_000

_OPTIONS = re2.Options()
_OPTIONS.max_mem = MAX_MEM
_OPTIONS.log_errors = False  # RE2 would write each refused pattern to stderr

#: The escapes that JSON Schema authors write (ECMA-262's \uXXXX, Python's \U and \Z) and RE2
#: spells otherwise, and any other escape, skipped whole so that ``\\u`` stays a backslash
#: and a "u".
_ESCAPE = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(Z)|.)", re.DOTALL)


class PatternError(ValueError):
    """A pattern RE2 cannot take; the message says why."""


class Regex:
    """One compiled pattern and the size of its RE2 program."""

    __slots__ = ("pattern", "size", "_compiled")

    def __init__(self, pattern: str, compiled: Any) -> None:
        self.pattern = pattern
        self._compiled = compiled
        self.size: int = compiled._regexp.ProgramSize()

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in ``text``."""
        # As bytes: a lone surrogate (JSON allows "\ud800") is not valid UTF-8 text.
        return self._compiled.search(text.encode("utf-8", "surrogatepass")) is not None


def _spelled_for_re2(pattern: str) -> str:
    def swap(m: re.Match[str]) -> str:
        code = m.group(1) or m.group(2)
        if code:
            return f"\\x{{{code}}}"
        return "\\z" if m.group(3) else m.group(0)

    return _ESCAPE.sub(swap, pattern)


def _reason(error: str) -> str:
    if "too large" in error:
        return (
            f"is too large for RE2 ({error}): a counted repetition such as {{1,100}} copies "
            "what it repeats; use + or * and a length limit instead"
        )
    return (
        f"is not a valid regular expression for RE2 ({error}); patterns run in linear time, "
        "so backreferences, lookarounds and possessive quantifiers are not supported"
    )


@functools.lru_cache(maxsize=128)
def _compile(pattern: str) -> Regex | PatternError:
    try:
        return Regex(pattern, re2.compile(_spelled_for_re2(pattern), _OPTIONS))
    except re2.error as exc:
        raw = exc.args[0] if exc.args else exc
        error = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return PatternError(_reason(error))


def compile_pattern(pattern: str) -> Regex:
    """``pattern`` compiled by RE2 (cached: each pattern is compiled once).

    Raises:
        PatternError: RE2 cannot take the pattern (a backreference, a lookaround, too large).
    """
    compiled = _compile(pattern)
    if isinstance(compiled, PatternError):
        raise compiled
    return compiled


def search(pattern: str, text: str) -> bool:
    """Whether ``pattern`` matches anywhere in ``text`` (JSON Schema's ``pattern``).

    Raises:
        PatternError: RE2 cannot take the pattern.
    """
    return compile_pattern(pattern).search(text)


class PatternBudget:
    """Checks the patterns of one template or schema, within ``MAX_TOTAL_SIZE`` in all."""

    def __init__(self, total: int = MAX_TOTAL_SIZE) -> None:
        self.left = total
        self._seen: dict[str, str | None] = {}

    def problem(self, pattern: str) -> str | None:
        """Why ``pattern`` cannot be used (to follow "pattern "), or None when it can."""
        if pattern in self._seen:
            return self._seen[pattern]
        if self.left <= 0:
            why: str | None = (
                f"is one too many: the patterns here compile to over {MAX_TOTAL_SIZE} RE2 "
                "instructions in all; make them smaller or fewer"
            )
        else:
            compiled = _compile(pattern)
            if isinstance(compiled, PatternError):
                why = str(compiled)
                self.left -= _TOO_LARGE_SIZE if "too large" in why else len(pattern)
            else:
                why = None
                self.left -= compiled.size
        self._seen[pattern] = why
        return why


#: JSON Schema keywords whose value is a schema, a mapping of schemas, or a list of schemas.
_ONE = (
    "additionalProperties",
    "unevaluatedProperties",
    "items",
    "additionalItems",
    "unevaluatedItems",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
    "contentSchema",
)
_MAPPING = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")


def subschemas(schema: dict[str, Any], path: Path_) -> Iterator[tuple[Any, Path_]]:
    """Each schema directly inside ``schema`` (a mapping), with its path."""
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            yield schema[key], (*path, key)
    for key in _MAPPING:
        if isinstance(schema.get(key), dict):
            yield from ((v, (*path, key, k)) for k, v in schema[key].items())
    for key in _LIST:
        if isinstance(schema.get(key), list):
            yield from ((v, (*path, key, i)) for i, v in enumerate(schema[key]))


def schema_problems(
    schema: Any, path: Path_ = (), budget: PatternBudget | None = None
) -> list[tuple[Path_, str, bool]]:
    """The patterns in a JSON Schema that cannot be used: (path, why, whether the path names
    a key of ``patternProperties`` rather than a value), in the order they were found.

    Only keywords are looked at: a ``pattern`` inside ``enum``, ``const`` or ``default`` data
    is not a pattern.
    """
    budget = budget or PatternBudget()
    problems: list[tuple[Path_, str, bool]] = []
    unevaluated: Path_ | None = None
    keyed: list[Path_] = []
    stack: list[tuple[Any, Path_]] = [(schema, path)]
    while stack:
        node, where = stack.pop()
        if not isinstance(node, dict):
            continue
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            why = budget.problem(pattern)
            if why:
                problems.append(((*where, "pattern"), f"pattern {why}", False))
        if isinstance(node.get("patternProperties"), dict):
            for key in node["patternProperties"]:
                at: Path_ = (*where, "patternProperties", key)
                keyed.append(at)
                why = budget.problem(str(key))
                if why:
                    problems.append((at, f"pattern {why}", True))
        if "unevaluatedProperties" in node and unevaluated is None:
            unevaluated = (*where, "unevaluatedProperties")
        stack.extend(reversed(list(subschemas(node, where))))
    if unevaluated is not None and keyed:
        # jsonschema matches patternProperties with Python's re when it works out which
        # properties are unevaluated, and that code cannot be pointed at RE2.
        problems.append(
            (
                unevaluated,
                "unevaluatedProperties cannot be combined with patternProperties (it would "
                "match their patterns without RE2); use additionalProperties instead",
                False,
            )
        )
    return problems


def _matches(pattern: str, text: str) -> bool | PatternError:
    try:
        return search(pattern, text)
    except PatternError as exc:
        return exc


def _unusable(pattern: str, why: PatternError) -> ValidationError:
    return ValidationError(f"pattern {pattern!r} cannot be used: {why}")


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "string"):
        return
    found = _matches(pattern, instance)
    if isinstance(found, PatternError):
        yield _unusable(pattern, found)
    elif not found:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: Any
) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            found = _matches(pattern, key)
            if isinstance(found, PatternError):
                yield _unusable(pattern, found)
                break
            if found:
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, extra: Any, instance: Any, schema: Any) -> Iterator[Any]:
    # jsonschema's own, with patternProperties matched by RE2 (an unusable pattern matches
    # nothing here; patternProperties reports it).
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    extras = [
        key
        for key in instance
        if key not in properties and not any(_matches(p, key) is True for p in patterns)
    ]
    if validator.is_type(extra, "object"):
        for key in extras:
            yield from validator.descend(instance[key], extra, path=key)
    elif not extra and extras:
        if patterns:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras))
            listed = ", ".join(repr(each) for each in sorted(patterns))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {listed}")
        else:
            verb = "was" if len(extras) == 1 else "were"
            joined = ", ".join(repr(each) for each in sorted(extras, key=str))
            yield ValidationError(
                f"Additional properties are not allowed ({joined} {verb} unexpected)"
            )


def _same(value: Any) -> Any:
    """A hashable stand-in for a JSON value, equal for values JSON Schema counts as equal
    (``1`` and ``1.0``; not ``true`` and ``1``; objects whatever their keys' order)."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, dict):
        return ("object", frozenset((key, _same(item)) for key, item in value.items()))
    if isinstance(value, list | tuple):
        return ("array", tuple(_same(item) for item in value))
    return value  # a string or a number (hash(1) == hash(1.0), as equality has it)


def _unique_items(
    validator: Any, unique: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    """``uniqueItems`` in one pass over the items (jsonschema's compares every pair of
    objects: 4,000 of them held the event loop 12 s); names the first two equal items,
    not the whole array."""
    if not unique or not validator.is_type(instance, "array"):
        return
    first: dict[Any, int] = {}
    for index, item in enumerate(instance):
        seen = first.setdefault(_same(item), index)
        if seen != index:
            yield ValidationError(f"has non-unique elements (items {seen} and {index} are equal)")
            return


def _schema_formats() -> jsonschema.FormatChecker:
    formats = jsonschema.FormatChecker(formats=())
    formats.checkers = dict(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers)
    formats.checkers["regex"] = (lambda _: True, ())
    return formats


_SCHEMA_FORMATS = _schema_formats()


def check_schema(schema: Any) -> None:
    """Check that ``schema`` is a valid JSON Schema (draft 2020-12), except for its patterns:
    :func:`schema_problems` checks those with RE2. (jsonschema's own check compiles each
    pattern with Python's ``re``, which raises RecursionError on a thousand nested groups.)

    Raises:
        jsonschema.SchemaError: the first problem found.
    """
    jsonschema.Draft202012Validator.check_schema(schema, format_checker=_SCHEMA_FORMATS)


#: Draft 2020-12 validation with every regex matched by RE2, and ``uniqueItems`` in linear time.
SchemaValidator: type[jsonschema.Draft202012Validator] = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
    jsonschema.Draft202012Validator,
    {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
        "uniqueItems": _unique_items,
    },
)


def _no_retrieval(uri: str) -> Any:
    raise NoSuchResource(ref=uri)  # type: ignore[call-arg]


#: The only resources a ``$ref`` may reach: the schema's own. jsonschema's default fetches a
#: URL it does not know (``schema_refs`` refuses such references first; this holds whatever
#: gets past it).
_LOCAL: Registry[Any] = Registry(retrieve=_no_retrieval)  # type: ignore[call-arg]


def validator(schema: Any) -> jsonschema.Draft202012Validator:
    """A :data:`SchemaValidator` for ``schema`` that never fetches anything: a reference it
    cannot resolve in the schema raises ``referencing.exceptions.Unresolvable``."""
    return SchemaValidator(schema, registry=_LOCAL)
