"""Loading a template from YAML: every problem found at once, each with file, line and column.

The YAML is read with ruamel's round-trip loader, which remembers where every key and value
stands; the tree is turned into plain Python while the positions are kept by path, so each
problem points at the offending value (1-based line and column).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
import jsonschema
import msgspec
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean
from ruamel.yaml.scalarstring import FoldedScalarString, LiteralScalarString

from orchestra.domain import RetryPolicy, parse_duration
from orchestra.errors import TemplateError
from orchestra.templating.model import PARAM_TYPES, LlmStep, Parameter, StepSpec, Template
from orchestra.templating.render import compile_output, compile_text

Path_ = tuple[str | int, ...]

NAME = re.compile(r"^[a-z0-9_-]+$")
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

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
)
LLM_KEYS = ("id", "kind", "prompt", "system", "model", "options", "timeout")
STEP_KINDS = ("llm",)


class TemplateProblem(msgspec.Struct, frozen=True):
    """One thing wrong with a template, and where (1-based line and column)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f" {self.path}:" if self.path else ""
        return f"{self.file}:{self.line}:{self.column}:{where} {self.message}"


def format_path(path: Path_) -> str:
    """("steps", 2, "prompt") -> "steps[2].prompt"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Source:
    """The YAML text, its plain data, and the position of every value by path."""

    def __init__(self, text: str, file: str) -> None:
        self.text = text
        self.file = file
        self.lines = text.splitlines()
        self.positions: dict[Path_, tuple[int, int]] = {(): (0, 0)}
        self.key_positions: dict[Path_, tuple[int, int]] = {}
        self.block_scalars: set[Path_] = set()
        self.data = self._plain(YAML(typ="rt").load(text), ())

    def _plain(self, node: Any, path: Path_) -> Any:
        if isinstance(node, CommentedMap):
            out: dict[Any, Any] = {}
            for key in node:
                self.positions[(*path, key)] = node.lc.value(key)
                self.key_positions[(*path, key)] = node.lc.key(key)
                out[key] = self._plain(node[key], (*path, key))
            return out
        if isinstance(node, CommentedSeq):
            items = []
            for index, item in enumerate(node):
                self.positions[(*path, index)] = node.lc.item(index)
                items.append(self._plain(item, (*path, index)))
            return items
        if isinstance(node, LiteralScalarString | FoldedScalarString):
            self.block_scalars.add(path)
            return str(node)
        if isinstance(node, ScalarBoolean):
            return bool(node)
        if isinstance(node, str):
            return str(node)
        if isinstance(node, bool):
            return node
        if isinstance(node, int):
            return int(node)
        if isinstance(node, float):
            return float(node)
        return node

    def where(self, path: Path_) -> tuple[int, int]:
        """1-based (line, column) of the value at ``path``, or of its nearest known parent."""
        while path not in self.positions:
            path = path[:-1]
        line, col = self.positions[path]
        return line + 1, col + 1

    def where_key(self, path: Path_) -> tuple[int, int]:
        """1-based (line, column) of the key that holds the value at ``path``."""
        if path in self.key_positions:
            line, col = self.key_positions[path]
            return line + 1, col + 1
        return self.where(path)

    def where_in_value(self, path: Path_, lineno: int) -> tuple[int, int]:
        """Position of line ``lineno`` (1-based) inside the string value at ``path``."""
        line, col = self.where(path)
        if path in self.block_scalars:
            # A block scalar's text starts on the line after its | or > indicator.
            line = line + lineno
            text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
            return line, len(text) - len(text.lstrip()) + 1
        if lineno > 1:
            return line + lineno - 1, 1
        return line, col


class _Checker:
    """Collects problems while walking the template."""

    def __init__(self, source: _Source) -> None:
        self.src = source
        self.problems: list[TemplateProblem] = []

    def add(self, path: Path_, message: str, at: tuple[int, int] | None = None) -> None:
        line, col = at or self.src.where(path)
        self.problems.append(TemplateProblem(self.src.file, line, col, format_path(path), message))

    def mapping(self, value: Any, path: Path_, what: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.add(path, f"{what} must be a mapping, got {_kind(value)}")
        return None

    def keys(self, data: dict[str, Any], path: Path_, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                self.add(
                    (*path, key),
                    f"unknown field {key!r}{suggestion} (allowed: {', '.join(allowed)})",
                    at=self.src.where_key((*path, key)),
                )

    def string(self, data: dict[str, Any], path: Path_, key: str, required: bool = False) -> Any:
        value = data.get(key)
        if value is None:
            if required:
                self.add(path, f"{key!r} is required")
            return None
        if not isinstance(value, str):
            self.add((*path, key), f"{key!r} must be a string, got {_kind(value)}")
            return None
        return value

    def duration(self, data: dict[str, Any], path: Path_, key: str) -> float | None:
        if key not in data:
            return None
        try:
            seconds = parse_duration(data[key])
        except ValueError as exc:
            self.add((*path, key), f"{key}: {exc}")
            return None
        if seconds <= 0:
            self.add((*path, key), f"{key} must be more than 0")
            return None
        return seconds

    def jinja(self, path: Path_, text: str) -> None:
        # Compile, not just parse: unknown filters and tests are compile-time errors.
        try:
            compile_text(text)
        except jinja2.TemplateSyntaxError as exc:
            self.add(
                path,
                f"Jinja syntax error: {exc.message}",
                at=self.src.where_in_value(path, exc.lineno or 1),
            )


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _parameters(c: _Checker, value: Any) -> dict[str, Parameter]:
    out: dict[str, Parameter] = {}
    data = c.mapping(value, ("parameters",), "'parameters'") if value is not None else {}
    for name, spec in (data or {}).items():
        path: Path_ = ("parameters", name)
        if not isinstance(name, str) or not IDENT.match(name):
            c.add(
                path,
                f"parameter name {name!r} must be a letter or _ followed by letters, digits or _",
            )
            continue
        fields = c.mapping(spec, path, f"parameter {name!r}")
        if fields is None:
            continue
        c.keys(fields, path, PARAM_KEYS)
        ptype = fields.get("type")
        if ptype not in PARAM_TYPES:
            c.add((*path, "type"), f"type must be one of {', '.join(PARAM_TYPES)}; got {ptype!r}")
            continue
        known = {k: v for k, v in fields.items() if k in PARAM_KEYS}
        try:
            param = msgspec.convert({**known, "name": name}, Parameter)
        except msgspec.ValidationError as exc:
            bad = re.search(r"\$\.(\w+)", str(exc))
            key = bad.group(1) if bad else "type"
            reason = str(exc).split(" - at ")[0].replace("`", "")
            c.add((*path, key), f"{key}: {reason[0].lower()}{reason[1:]}")
            continue
        if param.pattern is not None:
            try:
                re.compile(param.pattern)
            except re.error as exc:
                c.add((*path, "pattern"), f"pattern is not a valid regular expression: {exc}")
                continue
        for key, ok in (
            ("minimum", ptype in ("integer", "number")),
            ("maximum", ptype in ("integer", "number")),
            ("min_length", ptype in ("string", "array")),
            ("max_length", ptype in ("string", "array")),
            ("pattern", ptype == "string"),
            ("items", ptype == "array"),
        ):
            if key in fields and not ok:
                c.add((*path, key), f"{key} does not apply to a parameter of type {ptype}")
        if param.items is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(param.items)
            except jsonschema.SchemaError as exc:
                c.add((*path, "items"), f"items is not a valid JSON Schema: {exc.message}")
                continue
        schema = param.json_schema()
        if param.default is not msgspec.UNSET:
            if param.required:
                c.add((*path, "default"), "a required parameter cannot have a default")
            for err in jsonschema.Draft202012Validator(schema).iter_errors(param.default):
                c.add((*path, "default"), f"default does not fit the parameter: {err.message}")
        for index, choice in enumerate(param.enum or []):
            item_schema = {k: v for k, v in schema.items() if k not in ("enum", "default")}
            for err in jsonschema.Draft202012Validator(item_schema).iter_errors(choice):
                c.add((*path, "enum", index), f"enum value does not fit the type: {err.message}")
        out[name] = param
    return out


def _steps(c: _Checker, value: Any) -> list[StepSpec]:
    if not isinstance(value, list) or not value:
        c.add(("steps",), "'steps' must be a non-empty list of steps")
        return []
    out: list[StepSpec] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(value):
        path: Path_ = ("steps", index)
        data = c.mapping(raw, path, "a step")
        if data is None:
            continue
        kind = data.get("kind", "llm")
        if kind not in STEP_KINDS:
            c.add((*path, "kind"), f"unknown step kind {kind!r} (known: {', '.join(STEP_KINDS)})")
            continue
        c.keys(data, path, LLM_KEYS)
        step_id = c.string(data, path, "id", required=True)
        if step_id is not None:
            if not IDENT.match(step_id):
                c.add(
                    (*path, "id"),
                    f"step id {step_id!r} must be a letter or _ followed by letters, digits or _",
                )
            elif step_id in seen:
                c.add((*path, "id"), f"duplicate step id {step_id!r} (also steps[{seen[step_id]}])")
            else:
                seen[step_id] = index
        prompt = c.string(data, path, "prompt", required=True)
        system = c.string(data, path, "system")
        model = c.string(data, path, "model")
        for key, text in (("prompt", prompt), ("system", system)):
            if text is not None:
                c.jinja((*path, key), text)
        options = data.get("options", {})
        if not isinstance(options, dict):
            c.add((*path, "options"), f"'options' must be a mapping, got {_kind(options)}")
            options = {}
        timeout = c.duration(data, path, "timeout")
        if step_id is not None and prompt is not None:
            out.append(
                LlmStep(
                    id=step_id,
                    prompt=prompt,
                    system=system,
                    model=model,
                    options=options,
                    timeout=timeout,
                )
            )
    return out


def _retry(c: _Checker, value: Any) -> RetryPolicy | None:
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
        seconds = c.duration(data, ("retry",), key)
        if seconds is not None:
            fields[key] = seconds
    policy = RetryPolicy(**fields)
    if policy.max_delay < policy.initial_delay:
        c.add(("retry", "max_delay"), "max_delay must not be shorter than initial_delay")
    return policy


def _output(c: _Checker, value: Any) -> str | dict[str, str] | None:
    if value is None:
        return None
    entries: Iterator[tuple[Path_, Any]]
    if isinstance(value, str):
        entries = iter([(("output",), value)])
    elif isinstance(value, dict):
        entries = ((("output", k), v) for k, v in value.items())
    else:
        c.add(("output",), f"'output' must be a string or a mapping of strings, got {_kind(value)}")
        return None
    for path, text in entries:
        if not isinstance(text, str):
            c.add(path, f"output values must be strings, got {_kind(text)}")
            continue
        try:
            compile_output(text)
        except jinja2.TemplateSyntaxError as exc:
            c.add(
                path,
                f"Jinja syntax error: {exc.message}",
                at=c.src.where_in_value(path, exc.lineno or 1),
            )
    output: str | dict[str, str] = value
    return output


def parse_template(text: str, file: str = "<string>") -> Template:
    """Validate YAML text as a template.

    Raises:
        TemplateError: carrying every :class:`TemplateProblem` found.
    """
    try:
        src = _Source(text, file)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        reason = " ".join(p for p in (exc.context, exc.problem) if p)
        raise TemplateError([TemplateProblem(file, line, col, "", f"YAML: {reason}")]) from None
    except YAMLError as exc:
        raise TemplateError([TemplateProblem(file, 1, 1, "", f"YAML: {exc}")]) from None
    c = _Checker(src)
    data = c.mapping(src.data, (), "a template")
    if data is None:
        raise TemplateError(c.problems)
    c.keys(data, (), TOP_KEYS)
    name = c.string(data, (), "name", required=True)
    if name is not None and not NAME.match(name):
        c.add(("name",), f"name {name!r} may hold only a-z, 0-9, _ and -")
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        c.add(("version",), f"version must be a whole number >= 1, got {version!r}")
    description = c.string(data, (), "description") or ""
    model = c.string(data, (), "model")
    parameters = _parameters(c, data.get("parameters"))
    steps = _steps(c, data.get("steps"))
    output = _output(c, data.get("output"))
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
    )


def load_template(path: Path) -> Template:
    """Read and validate one template file.

    Raises:
        TemplateError: the file cannot be read or is not a valid template.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        problem = TemplateProblem(str(path), 1, 1, "", f"cannot read: {reason}")
        raise TemplateError([problem]) from None
    return parse_template(text, str(path))
